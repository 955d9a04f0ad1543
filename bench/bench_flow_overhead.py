"""Prefect's share of a full night: the nightly flow through Prefect versus the same core functions
called in a plain loop, on the same inputs, in one run.

A democam night (9 CCDs of 1024x2048, two amplifiers each) is simulated once and ingested into four
fresh repositories. Then, one after the other:

* ``prefect``: the ``nightly-calibs`` flow (subflows per build, process tasks over groups of one
  exposure's detectors sized by :func:`flows.build.detector_batches`, one combine task per detector,
  thread runner sized to the cores) on an embedded Prefect API;
* ``prefect, 1 detector/task``: the same with one process task per (exposure, detector), the
  granularity before the grouping (kept to show what it costs);
* ``plain, same threads``: the same build bodies (:func:`flows.build.run_build`) and the same task
  functions (``task.fn``, Prefect bypassed) on a ``concurrent.futures`` pool of the same size, in
  the same dependency order;
* ``plain, serial``: the same with one thread (a plain for-loop).

The products must be identical (same calib ids and pixels) or the run is void. Prefect's
ephemeral-server start is reported separately (paid once per process, not per build).

Usage: ``python bench/bench_flow_overhead.py [--out bench/results/flow_overhead.md] [--small]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_TASKS_DEFAULT_NO_CACHE", "true")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib_core.buildplan import BuildRequest  # noqa: E402
from calib_core.camera import load_camera  # noqa: E402
from calib_core.repository import Datastore, Registry, ingest_files, list_calibs  # noqa: E402
from calib_core.simulate.night import simulate_night  # noqa: E402

NIGHT = "2026-11-20"


class PlainRunner:
    """Prefect's ``submit(task, parameters)`` on a ``concurrent.futures`` pool, calling ``task.fn``."""

    def __init__(self, workers: int):
        self.workers = workers

    def __enter__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        return self

    def __exit__(self, *exc):
        self.pool.shutdown()

    def submit(self, task, parameters):
        return self.pool.submit(task.fn, **parameters)


def plain_night(repo: Path, camera: str, workers: int, detectors_per_task: int | None = None) -> None:
    from flows.build import run_build
    from flows.nightly import NightlyPolicy, plan_night

    policy = NightlyPolicy()
    store = Datastore(repo)
    registry = Registry.open(store.default_registry_url)
    log = logging.getLogger("plain")
    for step in plan_night(registry, camera, NIGHT, policy):
        if step["action"] != "build":
            continue
        request = BuildRequest(calib_type=step["type"], camera=camera, night=NIGHT, filter=step["filter"],
                               repo=str(store.root), validity_days_before=policy.validity_days_before,
                               validity_days_after=policy.validity_days_after, on_bad_input=policy.on_bad_input,
                               detectors_per_task=detectors_per_task)
        run_build(request, task_runner=PlainRunner(workers), log=log, artifacts=False)


def products(repo: Path) -> dict[str, str]:
    """calib id -> sha256 of every HDU's pixels (headers carry creation times, so file checksums differ)."""
    import hashlib

    from astropy.io import fits

    reg = Registry.open(Datastore(repo).default_registry_url)
    out = {}
    for p in list_calibs(reg):
        h = hashlib.sha256()
        with fits.open(p.path) as hdul:
            for hdu in hdul:
                if hdu.data is not None:
                    h.update(hdu.data.tobytes())
        out[p.calib_id] = h.hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "flow_overhead.md")
    ap.add_argument("--small", action="store_true", help="democam_mini instead of democam (a quick check)")
    args = ap.parse_args()
    camera = "democam_mini" if args.small else "democam"
    cam = load_camera(camera)
    workers = os.cpu_count() or 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
    try:
        t = time.perf_counter()
        sim = simulate_night(cam, tmp / "sim", seed=4, night=NIGHT, n_bias=5, n_dark=3, n_flat=3, n_science=6,
                             filters=("r", "z"))
        print(f"simulated {len(sim.exposures)} exposures in {time.perf_counter() - t:.0f} s", flush=True)
        files = sorted((tmp / "sim" / "raw").glob("*.fits"))
        repos = {}
        legs = ("prefect", "prefect-1", "plain-threads", "plain-serial")
        for name in legs:
            store = Datastore(tmp / name)
            reg = Registry.open(store.default_registry_url)
            reg.upgrade()
            assert ingest_files(files, cam, reg, store, transfer="symlink").ok
            repos[name] = store.root
        load = os.getloadavg()[0]

        from prefect import flow

        from flows.nightly import nightly

        t = time.perf_counter()

        @flow(name="warm-up")
        def warm():          # starts the embedded API: paid once per process
            return 1

        warm()
        startup = time.perf_counter() - t

        times, results = {}, {}
        for name in legs:
            t = time.perf_counter()
            if name.startswith("prefect"):
                summary = nightly(night=NIGHT, camera=camera, repo=str(repos[name]),
                                  detectors_per_task=1 if name == "prefect-1" else None)
            else:
                # the plain loop gets the same task grouping as the default flow
                plain_night(repos[name], camera, workers if name == "plain-threads" else 1)
            times[name] = time.perf_counter() - t
            print(f"{name}: {times[name]:.1f} s", flush=True)
            results[name] = products(repos[name])
            shutil.rmtree(repos[name] / "work", ignore_errors=True)    # intermediates: ~5 GB per leg
        ref = results["prefect"]
        same = all(results[n] == ref for n in legs)
        n_tasks = sum(len(s.get("products", [])) for s in summary["steps"])
        lines = [
            "# Prefect overhead: the nightly flow vs the same functions in a plain loop", "",
            f"Machine: {platform.machine()}, {workers} cores, Python {platform.python_version()}. "
            f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Load average at start: {load:.1f}. "
            f"Camera {camera} ({len(cam.detectors)} CCDs); night: 5 bias, 3 dark, 3 flats and 6 science "
            f"exposures in each of r and z -> {len(ref)} products (bias, dark, flat r/z, fringe z, sky r/z). "
            f"One run; products identical across the four: **{'yes' if same else 'NO'}**.", "",
            "| path | wall s | ratio to plain (same threads) |", "|---|---|---|",
            f"| Prefect nightly flow ({workers} threads) | {times['prefect']:.1f} | "
            f"{times['prefect'] / times['plain-threads']:.3f} |",
            f"| Prefect nightly flow, one process task per (exposure, detector) | {times['prefect-1']:.1f} | "
            f"{times['prefect-1'] / times['plain-threads']:.3f} |",
            f"| plain loop, same functions, {workers} threads | {times['plain-threads']:.1f} | 1.000 |",
            f"| plain loop, serial | {times['plain-serial']:.1f} | "
            f"{times['plain-serial'] / times['plain-threads']:.3f} |", "",
            f"Prefect's share: {100 * (times['prefect'] - times['plain-threads']) / times['prefect']:.1f} % of the "
            f"flow's wall time ({times['prefect'] - times['plain-threads']:.1f} s over {n_tasks} products, "
            "7 subflows, process tasks over groups of detectors and one combine task per detector); with one "
            f"process task per (exposure, detector) it was "
            f"{100 * (times['prefect-1'] - times['plain-threads']) / times['prefect-1']:.1f} %. The embedded Prefect API "
            f"started in {startup:.1f} s before the run (once per process; not included above).",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        if not same:
            sys.exit("products differ between the Prefect and plain runs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
