"""Compile the numba kernels ahead of the first build: ``python -m calibflow.warmup``.

The kernels are compiled with ``cache=True``: the first process that calls one compiles it (seconds
each, about 20 s for a night's set on 2 cores) and writes the machine code next to the source
(the ``__pycache__`` folders of ``calib_core``'s packages); every later process loads it. Without this step that first process
is the user's first build. ``make install`` (and so ``make demo`` and ``make test`` in a fresh
clone) runs it once per environment.

It builds a small simulated night of ``democam_mini`` (3x3 CCDs of 256x512) in a temporary
folder with every calib type of the nightly flow, through the build bodies in a plain loop (no
Prefect server): the kernels are compiled for exactly the array types a night passes them, which a
list of hand-made calls could miss. Nothing is left behind but the caches.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

NIGHT = "2026-11-20"


class _Serial:
    """Prefect's ``submit(task, parameters)`` run at once in this thread (``task.fn``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, task, parameters):
        future = concurrent.futures.Future()
        try:
            future.set_result(task.fn(**parameters))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def warm_up(camera: str = "democam_mini") -> float:
    """Build a small simulated night of ``camera`` in a temporary folder; returns the seconds taken."""
    from calib_core.buildplan import BuildRequest
    from calib_core.camera import load_camera
    from calib_core.repository import Datastore, Registry, ingest_files
    from calib_core.simulate.night import simulate_night
    from flows.build import run_build
    from flows.nightly import NightlyPolicy, plan_night

    t0 = time.perf_counter()
    cam = load_camera(camera)
    tmp = Path(tempfile.mkdtemp(prefix="calibflow-warmup-"))
    try:
        simulate_night(cam, tmp / "sim", seed=0, night=NIGHT, n_bias=3, n_dark=3, n_flat=3, n_science=5)
        store = Datastore(tmp / "repo")
        registry = Registry.open(store.default_registry_url)
        registry.upgrade()
        report = ingest_files(sorted((tmp / "sim" / "raw").glob("*.fits*")), cam, registry, store,
                              transfer="symlink")
        if report.failed:
            raise RuntimeError(f"warm-up: ingest failed: {report.failed[0]}")
        policy = NightlyPolicy()
        log = logging.getLogger("calibflow.warmup")
        for step in plan_night(registry, cam.name, NIGHT, policy):
            if step["action"] != "build":
                continue
            run_build(BuildRequest(calib_type=step["type"], camera=cam.name, night=NIGHT, filter=step["filter"],
                                   repo=str(store.root), on_bad_input=policy.on_bad_input),
                      task_runner=_Serial(), log=log, artifacts=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _warm_what_the_small_night_misses()
    return time.perf_counter() - t0


def _warm_what_the_small_night_misses() -> None:
    """The spline fill of object removal (:meth:`~calib_core.stats.background.BackgroundModel.fill`)
    needs four 256-px bins a side, more than a ``democam_mini`` CCD has: one CCD-sized image
    compiles it, with the array types the sky build passes."""
    import numpy as np

    from calib_core.maskedimage import MaskedImage, mask_bits
    from calib_core.sky.objectmask import remove_objects

    rng = np.random.default_rng(0)
    mi = MaskedImage(rng.normal(100.0, 1.0, (1024, 1024)), np.zeros((1024, 1024), np.int32),
                     np.ones((1024, 1024)))
    mi.mask[100:110, 100:110] = mask_bits(["DETECTED"])
    remove_objects(mi)


def main() -> None:
    seconds = warm_up()
    print(f"numba kernels compiled and cached in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
