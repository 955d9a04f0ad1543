"""Writing new files over the cached pages of retired intermediates (docs/architecture.md#recycled-files).

A night writes about 8 GB of intermediates and removes each build's once its products are registered.
On a virtual machine whose free memory goes back to the host (the balloon's free-page reporting, as on
the machines calibflow is measured on), every page of a new file costs a host fault when it is first
written: writing into fresh page cache took 1.2-6 CPU s per GB there, against 0.25 s per GB to
write over a file whose pages are still cached. That was 47 of the democam demo's 322 CPU seconds.

So, while a build or a night holds a pool open (:func:`recycling`), a retired intermediate is not
deleted but renamed into the pool folder (``work/.recycle``), up to :data:`LIMIT_ENV` megabytes
(default 2048); :func:`~calib_core.io.products.write_hdulist` then takes a pool file of at least the
size it needs (:func:`claim`), writes over it, cuts it to length and renames it into place, as it
renames a fresh temporary. Writing over a file changes the data under anyone who has it open (where
deleting it would not): only files nothing reads any more go into the pool, the intermediates that
retention removes once no build that may read them is running. The pool is emptied when the
outermost :func:`recycling` block ends, so a night leaves no more on disk than before. Pool files
carry :func:`~calib_core.io.atomic.private_name` names: those of a killed process are swept like any
other temporary (``calibflow prune``, the next build). The pool is per process, so the flows open
one only on the ``threads`` runner: tasks in other processes (the ``processes`` and ``dask``
runners) could not take its files.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from calib_core.io import env_megabytes
from calib_core.io.atomic import private_name, sweep_stale

__all__ = ["recycling", "discard", "claim", "active", "stats", "LIMIT_ENV", "POOL_DIRNAME"]

LIMIT_ENV = "CALIBFLOW_RECYCLE_MB"
DEFAULT_LIMIT_MB = 2048
POOL_DIRNAME = ".recycle"

_lock = threading.Lock()
_folder: Path | None = None
_depth = 0
_limit = 0
_files: dict[Path, int] = {}          # pool file -> size in bytes
_devices: dict[Path, bool] = {}       # destination folder -> same file system as the pool
_stats = {"retired": 0, "retired_bytes": 0, "claimed": 0, "claimed_bytes": 0}


def stats() -> dict[str, int]:
    """Since the process started: files (and bytes) retired into a pool, and files (and their pool
    sizes in bytes) written over."""
    with _lock:
        return dict(_stats)


@contextmanager
def recycling(work: str | Path):
    """Keep a pool of retired files in ``work/.recycle`` for this process while the block runs.

    Nested blocks (a night's builds) share the outermost block's pool; when it ends the pool's files
    are deleted. A limit of 0 (``CALIBFLOW_RECYCLE_MB=0``) turns recycling off."""
    global _folder, _depth, _limit
    limit = env_megabytes(LIMIT_ENV, DEFAULT_LIMIT_MB)
    with _lock:
        if _folder is None and limit > 0:
            folder = Path(work) / POOL_DIRNAME  # made at the first retired file: a failed build leaves nothing
            if folder.is_dir():
                sweep_stale(folder)              # the pools of killed processes
            _folder, _limit = folder, limit
            _files.clear()
            _devices.clear()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _folder is not None:
                for p in _files:
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass
                _files.clear()
                try:
                    _folder.rmdir()
                except OSError:                  # another process's pool files, or not empty
                    pass
                _folder = None


def active() -> bool:
    """Whether this process holds a pool open."""
    return _folder is not None


def discard(path: Path) -> int | None:
    """Remove ``path`` (a retired intermediate): into the pool while one is open and has room, else
    deleted. Returns its size in bytes; None when it did not exist."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    with _lock:
        folder = _folder
        room = folder is not None and size > 0 and sum(_files.values()) + size <= _limit
        if room:
            target = private_name(folder / "file", "tmp")
            try:
                folder.mkdir(exist_ok=True)
            except OSError:
                room = False
            else:
                try:
                    os.replace(path, target)
                except FileNotFoundError:
                    return None
                except OSError:                  # another file system: delete instead
                    room = False
                else:
                    _files[target] = size
                    _stats["retired"] += 1
                    _stats["retired_bytes"] += size
    if not room:
        try:
            path.unlink()
        except FileNotFoundError:
            return None
    return size


def claim(dest: Path, nbytes: int) -> Path | None:
    """A pool file renamed to a private temporary beside ``dest`` to be written over: the smallest of
    at least ``nbytes`` (else the largest). None when no pool is open, it is empty, or ``dest`` is on
    another file system."""
    dest = Path(dest)
    with _lock:
        if _folder is None or not _files:
            return None
        parent = dest.parent
        same = _devices.get(parent)
        if same is None:
            try:
                same = os.stat(parent).st_dev == os.stat(_folder).st_dev
            except OSError:
                same = False
            _devices[parent] = same
        if not same:
            return None
        fits_ = [(s, p) for p, s in _files.items() if s >= nbytes]
        size, pick = min(fits_) if fits_ else max((s, p) for p, s in _files.items())
        del _files[pick]
        _stats["claimed"] += 1
        _stats["claimed_bytes"] += size
    tmp = private_name(dest, "tmp")
    try:
        os.replace(pick, tmp)
    except OSError:                              # removed under us (a prune): write a fresh file
        return None
    return tmp
