"""calibflow: calibration frames for mosaic CCD cameras as Prefect flows over a pluggable numeric core."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("calibflow")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.1.0"

# One BLAS thread per calling thread: a build already keeps every core busy with its own threads
# (tasks, numba), and OpenBLAS's extra threads spin while they wait (6 % of the fringe build's CPU in
# `perf`; with one thread its CPU fell from 53.5-54.6 s to 49.8-50.7 s, two runs each). Read when the
# BLAS library loads, so it is set here, before anything of calibflow imports numpy; a value in the
# environment wins (docs/prefect.md#memory-allocator).
import os as _os

_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
