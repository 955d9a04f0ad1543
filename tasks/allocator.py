"""glibc's allocator set for a build's array traffic (docs/prefect.md#memory-allocator).

A build allocates and frees tens of thousands of detector-sized arrays (8 MB for a 2 Mpix float32
plane): NumPy's and numba's temporaries, FITS reads, the planes of every intermediate. glibc serves
each allocation above its mmap threshold (128 kB at start, rising to at most 32 MB as it sees such
blocks freed) with a fresh ``mmap`` and returns it with ``munmap`` when freed, and frees memory at
the top of a heap as soon as 128 kB of it are unused; the kernel then zero-fills every 4 kB page of
the next array on first touch. On the democam night that was 7.3 million page faults and 95 of
its 408 CPU seconds in the kernel (``/usr/bin/time -v calibflow nightly``).

:func:`tune_allocator` raises the mmap threshold to its maximum (32 MiB: a 2 Mpix plane, or an
8 Mpix one in float32, then comes from the heap and is reused), keeps up to 1 GiB free at a heap's
top before giving it back, and grows a heap by 64 MiB at a time. Measured on the same night:
1.9 million page faults and 60 s in the kernel; the peak resident memory rose from 3.0 to 3.8 GB.

It also puts every thread on the one main heap (one arena). By default glibc gives threads heaps of
their own (arenas, up to eight per core, made of 64 MiB mappings): memory that one thread frees is
not reused by another, so the pool's task threads, new for every build, and the combine and
simulator threads each grew heaps and faulted their planes in anew. On the ``calibflow demo`` night
under ``perf``, the kernel's zero-filling of new pages fell from 4.7 % to 2.0 % of the samples, page
faults from 0.64 to 0.42 million, and the peak resident memory from 4.0 to 2.6 GB. The limit counts only where it is set
before the process starts its first thread: the ``calibflow`` command sets it first thing, a worker
process that already has threads keeps the heaps it has.

It is what ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` and
``MALLOC_ARENA_MAX`` in the environment do, so a setting already in the environment (or in
``GLIBC_TUNABLES``) is left as it is. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["tune_allocator", "ALLOCATOR_SETTINGS"]

# mallopt's parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8

#: (mallopt parameter, environment variable that sets it, value in bytes)
ALLOCATOR_SETTINGS = (
    (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 32 * 2 ** 20),   # glibc's largest allowed on 64-bit
    (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 2 ** 30),
    (_M_TOP_PAD, "MALLOC_TOP_PAD_", 64 * 2 ** 20),
    (_M_ARENA_MAX, "MALLOC_ARENA_MAX", 1),      # before the process starts its first thread (below)
)

_lock = threading.Lock()
_applied: dict[str, bool] | None = None       # what the first call applied


def tune_allocator() -> dict[str, bool]:
    """Set glibc's allocator for large arrays, once per process; cheap to call again.

    Returns which settings were applied (name of the environment variable -> True); empty where the
    C library is not glibc. Thread-safe; safe to call from any task."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return dict(_applied)


def _apply() -> dict[str, bool]:
    if not sys.platform.startswith("linux"):
        return {}
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has a mallopt that ignores everything
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    applied = {}
    for param, env, value in ALLOCATOR_SETTINGS:
        tunable = "glibc.malloc." + env.removeprefix("MALLOC_").rstrip("_").lower()
        if env in os.environ or tunable in tunables:
            continue
        applied[env] = bool(mallopt(param, value))
    return applied
