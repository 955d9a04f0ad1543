"""tasks.allocator.tune_allocator (docs/prefect.md#memory-allocator): detector-sized arrays are
reused from the heap instead of being mapped, zero-filled page by page and unmapped each time.

The truth is the kernel's count of minor page faults (``getrusage``) for the same array traffic in
two fresh processes, one tuned and one not: glibc's defaults fault on every page of every 8 MB
plane a thread allocates after a free (90-140 thousand faults here), the tuned process only where
an array is above glibc's largest mmap threshold (12-13 thousand)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = textwrap.dedent("""
    import json, resource, sys, threading
    import numpy as np
    from tasks.allocator import tune_allocator
    applied = tune_allocator() if sys.argv[1] == "tuned" else {}

    def work():
        # what a task does to memory: detector planes, a stack of them, a float64 temporary above
        # glibc's largest mmap threshold (mapped either way), small arrays
        for i in range(30):
            planes = [np.full((1024, 2048), i, np.float32) for _ in range(3)]
            cube = np.stack(planes)
            d = cube.astype(np.float64).mean(0)
            small = [np.ones(300_000, np.float64) for _ in range(4)]
            del planes, cube, d, small

    def arenas():
        # glibc's own account of its heaps: malloc_info writes one <heap nr="..."> per arena
        import ctypes, os, re, tempfile
        libc = ctypes.CDLL(None)
        libc.fdopen.restype = ctypes.c_void_p
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        with tempfile.TemporaryFile() as f:
            fp = libc.fdopen(os.dup(f.fileno()), b"w")
            libc.malloc_info(0, fp)
            libc.fclose(fp)
            f.seek(0)
            return len(re.findall(rb"<heap nr=", f.read()))

    t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    threads = [threading.Thread(target=work) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - t0, "applied": applied,
                      "arenas": arenas()}))
""")


def _run(mode: str, **env) -> dict:
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], cwd=ROOT, capture_output=True, text=True,
                         env={**clean, **env, "PYTHONPATH": str(ROOT)}, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="the allocator settings are glibc's")


@glibc
def test_tuned_process_reuses_detector_planes_instead_of_faulting_them_in_again():
    plain, tuned = _run("plain"), _run("tuned")
    assert tuned["applied"] == {"MALLOC_MMAP_THRESHOLD_": True, "MALLOC_TRIM_THRESHOLD_": True,
                                "MALLOC_TOP_PAD_": True, "MALLOC_ARENA_MAX": True}
    # untuned, each of the two threads got a heap (arena) of its own beside the main one; tuned, they
    # share the main heap, where the planes one thread frees are the next ones either allocates
    assert plain["arenas"] == 3 and tuned["arenas"] == 1, (plain, tuned)
    # 30 rounds x 2 threads of ~100 MB each: untuned, most pages are faulted in anew (90-140
    # thousand faults in ten runs here); tuned, only the 48 MB temporaries are (12-13 thousand)
    assert plain["faults"] > 40_000, plain
    assert tuned["faults"] < plain["faults"] / 3, (plain, tuned)


@glibc
def test_a_setting_from_the_environment_is_left_as_it_is():
    r = _run("tuned", MALLOC_MMAP_THRESHOLD_="131072")
    assert r["applied"] == {"MALLOC_TRIM_THRESHOLD_": True, "MALLOC_TOP_PAD_": True, "MALLOC_ARENA_MAX": True}
    r = _run("tuned", GLIBC_TUNABLES="glibc.malloc.top_pad=0")
    assert r["applied"] == {"MALLOC_MMAP_THRESHOLD_": True, "MALLOC_TRIM_THRESHOLD_": True,
                            "MALLOC_ARENA_MAX": True}
    r = _run("tuned", MALLOC_ARENA_MAX="4")
    assert r["applied"] == {"MALLOC_MMAP_THRESHOLD_": True, "MALLOC_TRIM_THRESHOLD_": True,
                            "MALLOC_TOP_PAD_": True}
    assert r["arenas"] == 3         # glibc's own reading of the variable: the two threads' heaps


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts no threads of its own on one core")
def test_calibflow_runs_blas_on_the_calling_thread_only():
    """``calibflow`` sets OPENBLAS_NUM_THREADS=1 before NumPy loads its BLAS (calibflow/__init__.py):
    NumPy alone starts OpenBLAS worker threads (one fewer than the cores), calibflow's process none;
    a value in the environment is kept."""
    code = ("import os, sys; exec(sys.argv[1]); import numpy; "
            "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}

    def threads(first: str, **env) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-c", code, first], cwd=ROOT, capture_output=True, text=True,
                             env={**clean, **env, "PYTHONPATH": str(ROOT)}, check=True, timeout=120)
        n, value = out.stdout.split()
        return int(n), value

    plain, _ = threads("pass")
    ours, value = threads("import calibflow")
    assert value == "1" and ours < plain, (plain, ours)
    assert threads("import calibflow", OPENBLAS_NUM_THREADS="2") == threads("pass", OPENBLAS_NUM_THREADS="2")
