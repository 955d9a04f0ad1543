"""Profile of a night: wall and CPU time per stage and per calib type, Mpix/s per core, bytes read and
written, and numba compile time, for the democam night of ``calibflow demo``; optionally the same
night with a baseline commit's code, side by side in one run.

The night is what ``calibflow demo`` simulates (democam, seed 1, 5 bias, 5 dark, 5 flats and 8 science
exposures in each of r and z) and it is built by the **plain loop** of ``bench/bench_flow_overhead.py``:
the nightly plan's builds, each :func:`flows.build.run_build` with the task functions (``task.fn``,
Prefect bypassed) on a thread pool of ``--workers`` threads (default: the cores). The builds are
scheduled as the tree's nightly flow schedules them: with ``flows.nightly.run_steps`` where the tree
has it (builds that need nothing of each other side by side, ``NightlyPolicy.parallel_builds``), one
after another otherwise.

Each leg runs in its own Python process with ``PYTHONPATH`` set to its source tree (this checkout, or
a worktree of the baseline commit), so its numba caches and imports are its own. Each leg starts as a
fresh clone would: the tree's numba caches are deleted, then the tree's set-up step runs if it has
one (``python -m calibflow.warmup``, which ``make demo`` runs once per environment), timed apart
from the night. The stage timings come from
wrappers this script puts around the functions both trees share, with no change to the code measured:

* the top-level stage is the Prefect task a call runs in (``process``, ``sky-pass``, ``combine``);
  work the build does in its own thread between them is ``scale`` (the flat scale solve, the sky
  build's focal-plane barrier), ``settle`` (the verification gate) and ``mosaic`` (the report);
* inside them, named steps: ISR, cosmic rays, persistent CR, read, write, stack, sky bins, fringe
  prep, continuum, screen, verify, raw checksum, defects; what a task does outside those steps is
  its ``(rest)``.

Times are **exclusive** (a step's time is not also counted in the stage around it) and are
thread-seconds: the wall time of the calls, summed over the threads that ran them; CPU is the calling
thread's CPU time (``time.thread_time``; numba's own worker threads in the MEANCLIP stack are not in
it). Bytes are the calling thread's ``rchar``/``wchar`` from ``/proc/thread-self/io``: what passed
through read/write system calls (page cache included, memory-mapped reads not). Mpix is the pixels
of the task a step serves (detectors x detector pixels for a process task, inputs x detector pixels
for a combine); Mpix/s per core of a step is those pixels over its CPU seconds: how fast that step
lets the night's pixels through one core (CPU, not wall: on a shared machine the wall time of a call
includes its wait for a core). Numba compile time is taken from numba's ``numba:compile`` events during the night.

A tree that removes each build's intermediates itself (its default retention) keeps them; for an
older tree they are deleted after each build (later builds read only products). A leg so needs the
raws (shared), its products and a build or two's intermediates on disk; each leg's repository is
deleted when it is measured.

Usage::

    git worktree add /work/wt-base c782287         # once: the baseline's code
    python bench/bench_night.py --base-tree /work/wt-base [--out bench/results/bench_night.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
NIGHT = "2026-11-20"
SEED = 1            # calibflow demo's defaults
N_SCIENCE = 8

#: (module, function, step) wrapped in a leg; a function absent from a tree is skipped
STEPS = [
    ("calib_core.isr.process", "run_isr", "ISR"),
    ("calib_core.isr.cosmicrays", "find_cosmic_rays", "cosmic rays"),
    ("calib_core.isr.persistent", "clear_persistent_cr", "persistent CR"),
    ("calib_core.io.products", "read_product", "read"),
    ("calib_core.io.raw", "read_raw", "read"),
    ("calib_core.io.products", "write_product", "write"),
    ("calib_core.io.products", "write_hdulist", "write"),
    ("calib_core.io.productmeta", "write_calib_product", "write"),
    ("calib_core.stats.stack", "stack_files", "stack"),
    ("calib_core.stats.stack", "stack_arrays", "stack"),
    ("calib_core.sky.frames", "bin_detector", "sky bins"),
    ("calib_core.sky.objectmask", "mask_objects", "object mask"),
    ("calib_core.sky.objectmask", "detect_sources", "detect sources"),
    ("calib_core.stats.background", "measure_background", "background"),
    ("calib_core.isr.process", "fit_fringe_scale", "fringe fit"),
    ("calib_core.isr.process", "interpolate_over", "interpolate"),
    ("calib_core.builds.fringe", "prepare_fringe", "fringe prep"),
    ("calib_core.builds.fringe", "remove_continuum", "continuum"),
    ("calib_core.quality.verify", "screen_input", "screen"),
    ("tasks.calib_tasks", "_verify", "verify"),
    ("calib_core.repository.datastore", "verify_raw", "raw checksum"),
    ("calib_core.builds.defects", "measure_defects", "defects"),
    ("calib_core.builds.bias_dark_flat", "solve_flat_scales", "scale"),
    ("flows.build", "_sky_second_pass", "scale"),
    ("flows.build", "_settle", "settle"),
    ("flows.build", "_report", "mosaic"),
]

#: where the modules of STEPS lived before calib_core was split into subpackages (baseline trees)
LEGACY_MODULES = {
    "calib_core.isr.process": "calib_core.isr", "calib_core.isr.cosmicrays": "calib_core.cosmicrays",
    "calib_core.isr.persistent": "calib_core.persistent", "calib_core.io.products": "calib_core.products",
    "calib_core.io.raw": "calib_core.rawio", "calib_core.io.productmeta": "calib_core.productmeta",
    "calib_core.stats.stack": "calib_core.stack", "calib_core.sky.frames": "calib_core.sky",
    "calib_core.sky.objectmask": "calib_core.objectmask", "calib_core.stats.background": "calib_core.background",
    "calib_core.builds.fringe": "calib_core.fringe", "calib_core.quality.verify": "calib_core.verify",
    "calib_core.repository.datastore": "calib_core.datastore", "calib_core.builds.defects": "calib_core.defects",
    "calib_core.builds.bias_dark_flat": "calib_core.calibs", "calib_core.repository.ingest": "calib_core.ingest",
    "calib_core.repository.registry": "calib_core.registry",
    "calib_core.repository.registry.calibs": "calib_core.registry.calibs",
}

# ---------------------------------------------------------------------------------------------------
# one leg (runs in a subprocess whose PYTHONPATH is the tree measured)
# ---------------------------------------------------------------------------------------------------


def _io() -> tuple[int, int]:
    try:
        with open("/proc/thread-self/io") as fh:
            d = dict(line.split(": ") for line in fh.read().splitlines())
        return int(d["rchar"]), int(d["wchar"])
    except OSError:
        return 0, 0


class Profile:
    """Exclusive wall, thread CPU and I/O per (build, stage, step), from nested timed calls."""

    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.rows: dict[tuple[str, str, str], dict] = {}
        self.compile_s = 0.0
        self.compiles: list[str] = []

    def _row(self, key):
        return self.rows.setdefault(key, {"wall": 0.0, "cpu": 0.0, "read": 0, "written": 0, "calls": 0, "pix": 0})

    def timed(self, step: str, fn, *, build: str | None = None, top: str | None = None, pixels: int = 0):
        """Call ``fn`` as ``step``; ``top`` starts a top-level stage of ``build`` serving ``pixels``."""
        stack = self.local.__dict__.setdefault("stack", [])
        if top is None and not stack:          # a step the build's own thread runs between the tasks
            top, build = step, self.local.__dict__.get("build", "?")
        frame = {"build": build if top else stack[-1]["build"], "top": top or stack[-1]["top"],
                 "step": "(rest)" if top else step, "child": [0.0, 0.0, 0, 0], "pixels": pixels,
                 "steps": set(), "t": time.perf_counter(), "c": time.thread_time(), "io": _io()}
        stack.append(frame)
        try:
            return fn()
        finally:
            stack.pop()
            r, w = _io()
            total = [time.perf_counter() - frame["t"], time.thread_time() - frame["c"],
                     r - frame["io"][0], w - frame["io"][1]]
            own = [a - b for a, b in zip(total, frame["child"])]
            with self.lock:
                row = self._row((frame["build"], frame["top"], frame["step"]))
                row["wall"] += own[0]
                row["cpu"] += own[1]
                row["read"] += own[2]
                row["written"] += own[3]
                row["calls"] += 1
                if top:
                    for s in frame["steps"] | {"(rest)"}:
                        self._row((frame["build"], frame["top"], s))["pix"] += pixels
            if stack:
                parent = stack[-1]
                parent["child"] = [a + b for a, b in zip(parent["child"], total)]
                stack[0]["steps"].add(frame["step"])


PROFILE = Profile()


def _in_tree(module_name: str) -> bool:
    """Whether the tree this leg measures has ``module_name``. An import alone cannot tell: an
    editable install of another checkout supplies the modules a baseline tree lacks."""
    import calib_core

    root = Path(calib_core.__file__).resolve().parents[1]
    rel = root.joinpath(*module_name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _wrap_everywhere(module_name: str, name: str, step: str) -> None:
    """Replace ``module.name`` by a timed wrapper in every loaded project module that holds it."""
    import functools
    import importlib

    if not _in_tree(module_name):       # a tree from before calib_core's subpackages (the baseline leg)
        module_name = LEGACY_MODULES.get(module_name, module_name)
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return
    orig = getattr(mod, name, None)
    if orig is None:
        return

    @functools.wraps(orig)
    def wrapper(*a, **k):
        return PROFILE.timed(step, lambda: orig(*a, **k))

    for m in list(sys.modules.values()):
        if getattr(m, "__name__", "").split(".")[0] in ("calib_core", "tasks", "flows"):
            for attr, value in list(vars(m).items()):
                if value is orig:
                    setattr(m, attr, wrapper)


class _CompileListener:
    """Sums the outermost ``numba:compile`` events (nested ones are inlined callees)."""

    def __init__(self):
        import numba.core.event as ev

        class L(ev.Listener):
            def on_start(inner, event):
                d = PROFILE.local.__dict__
                d["depth"] = d.get("depth", 0) + 1
                if d["depth"] == 1:
                    d["t_compile"] = time.perf_counter()

            def on_end(inner, event):
                d = PROFILE.local.__dict__
                d["depth"] -= 1
                if d["depth"] == 0:
                    with PROFILE.lock:
                        PROFILE.compile_s += time.perf_counter() - d["t_compile"]
                        fn = getattr(event.data.get("dispatcher"), "py_func", None)
                        PROFILE.compiles.append(f"{fn.__module__}.{fn.__qualname__}" if fn else "?")

        ev.register("numba:compile", L())


def _build_label(step: dict) -> str:
    return step["type"] if not step.get("filter") or step["filter"] == "NONE" else f"{step['type']} {step['filter']}"


def run_leg(args) -> None:
    t_import = time.perf_counter()
    import concurrent.futures
    import logging

    import tasks.calib_tasks  # noqa: F401  (loaded before its functions are wrapped)
    from calib_core.buildplan import BuildRequest
    from calib_core.camera import load_camera
    try:
        if not _in_tree("calib_core.repository"):
            raise ImportError("a tree from before calib_core's subpackages")
        from calib_core.repository import Datastore, Registry, ingest_files, list_calibs
    except ImportError:        # a tree from before calib_core's subpackages (the baseline leg)
        from calib_core.datastore import Datastore
        from calib_core.ingest import ingest_files
        from calib_core.registry import Registry
        from calib_core.registry.calibs import list_calibs
    from flows.build import run_build
    from flows.nightly import NightlyPolicy, plan_night
    import_s = time.perf_counter() - t_import

    for mod, name, step in STEPS:
        _wrap_everywhere(mod, name, step)
    _CompileListener()

    cam = load_camera(args.camera)
    det_pix = {d.id: (d.nx or 0) * (d.ny or 0) for d in cam.detectors}
    if not all(det_pix.values()):          # sizes from the amplifiers when the camera gives none
        det_pix = {d.id: sum(a.data.nx * a.data.ny for a in d.amplifiers) for d in cam.detectors}

    class Runner:
        """Prefect's ``submit(task, parameters)`` on a thread pool, calling ``task.fn``, timed."""

        def __init__(self, workers):
            self.workers = workers

        def __enter__(self):
            self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)
            return self

        def __exit__(self, *exc):
            self.pool.shutdown()

        def submit(self, task, parameters):
            ctx = parameters["ctx"]
            build = ctx.calib_type if ctx.filter in ("NONE", "", None) else f"{ctx.calib_type} {ctx.filter}"
            if "detectors" in parameters:
                pixels = sum(det_pix[d] for d in parameters["detectors"])
            elif "detector" in parameters:
                pixels = len(parameters["items"]) * det_pix[parameters["detector"]]
            else:
                pixels = sum(det_pix[i["detector"] if isinstance(i, dict) else i.detector] for i in parameters["items"])
            return self.pool.submit(PROFILE.timed, task.name, lambda: task.fn(**parameters), build=build,
                                    top=task.name, pixels=pixels)

    store = Datastore(args.repo)
    t = time.perf_counter()
    reg = Registry.open(store.default_registry_url)
    reg.upgrade()
    files = sorted(Path(args.sim, "raw").glob("*.fits*"))
    report = ingest_files(files, cam, reg, store, transfer="symlink")
    assert report.ok, report.failed
    ingest_s = time.perf_counter() - t

    policy = NightlyPolicy()
    log = logging.getLogger("bench-night")
    builds = []
    load0 = os.getloadavg()
    steps = plan_night(reg, cam.name, NIGHT, policy)

    def build_one(step, blocked=()):
        label = _build_label(step)
        PROFILE.local.build = label
        request = BuildRequest(calib_type=step["type"], camera=cam.name, night=NIGHT, filter=step["filter"],
                               repo=str(store.root), validity_days_before=policy.validity_days_before,
                               validity_days_after=policy.validity_days_after, on_bad_input=policy.on_bad_input)
        tb = time.perf_counter()
        out = run_build(request, task_runner=Runner(args.workers), log=log, artifacts=False)
        builds.append({"build": label, "start": tb - t0, "wall": time.perf_counter() - tb,
                       "products": len(out["products"]), "created": out["created"]})

    c0, t0 = time.process_time(), time.perf_counter()
    try:   # the tree's own scheduler (PYTHONPATH puts the tree first): builds side by side as its flow runs them
        from flows.nightly import run_steps
    except ImportError:
        run_steps = None
    try:   # as the tree's nightly flow does: one pool of retired intermediates for the night's builds
        from calib_core.io.recycle import recycling
    except ImportError:
        recycling = None
    if run_steps is not None:
        with (recycling(store.root / "work") if recycling else contextlib.nullcontext()):
            outcome = run_steps(steps, build_one, policy.parallel_builds)
        import traceback

        failed = {_build_label(steps[i]): "".join(traceback.format_exception(e)) for i, e in outcome.items() if e}
        assert not failed, "\n".join(f"{b}: {tb}" for b, tb in failed.items())
    else:     # one build after another, as the nightly flow ran them; each build's intermediates removed
        for step in steps:
            if step["action"] == "build":
                build_one(step)
                shutil.rmtree(store.root / "work", ignore_errors=True)     # the next builds read only products
    night_s, night_cpu = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()
    # records (CalibProduct) on this tree; dicts on a baseline tree from before the records
    calibs = [c if isinstance(c, dict) else c.model_dump() for c in list_calibs(reg)]
    status = {}
    for c in calibs:
        key = f"{c['type']} {c['filter']}" if c["filter"] not in ("NONE", "", None) else c["type"]
        status.setdefault(key, {}).setdefault(c["status"], 0)
        status[key][c["status"]] += 1
    import hashlib

    from astropy.io import fits

    digests, samples = {}, {}
    for c in calibs:           # pixels only: headers carry creation times
        h = hashlib.sha256()
        with fits.open(c["path"]) as hdul:
            for hdu in hdul:
                if hdu.data is not None:
                    h.update(hdu.data.tobytes())
            image = next((hdu.data for hdu in hdul if hdu.data is not None and hdu.data.ndim == 2), None)
        digests[c["calib_id"]] = h.hexdigest()
        if image is not None:  # the image at ~4096 fixed pixels, to say how far apart two legs' products are
            flat = image.ravel().astype(float)
            samples[c["calib_id"]] = flat[:: max(1, flat.size // 4096)].tolist()
    repo_bytes = sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file() and not p.is_symlink())
    result = {"tree": os.environ.get("PYTHONPATH", ""), "night_s": night_s, "night_cpu": night_cpu,
              "ingest_s": ingest_s, "import_s": import_s, "load_start": load0, "load_end": load1,
              "workers": args.workers, "builds": builds, "numba_compile_s": PROFILE.compile_s,
              "numba_compiles": sorted(set(PROFILE.compiles)), "status": status, "digests": digests,
              "samples": samples,
              "products_bytes": repo_bytes, "raw_pixels": sum(det_pix.values()) * len(files),
              "stages": [{"build": b, "stage": s, "step": st, **v} for (b, s, st), v in PROFILE.rows.items()]}
    Path(args.json).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------
# the run: simulate once, one leg per tree, the report
# ---------------------------------------------------------------------------------------------------


def _git(tree: Path, *cmd) -> str:
    return subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True).stdout.strip()


def _leg(tree: Path, name: str, tmp: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = tmp / f"{name}.json"
    # a fresh clone: no numba cache; then the tree's own set-up step, if it has one (make demo runs it)
    for f in (tree / "calib_core").rglob("__pycache__/*.nb[ic]"):
        f.unlink()
    warm_s = None
    if (tree / "calibflow" / "warmup.py").exists():
        t = time.perf_counter()
        ok = subprocess.run([sys.executable, "-m", "calibflow.warmup"], env=env, cwd=tmp).returncode == 0
        warm_s = time.perf_counter() - t if ok else float("nan")
    cmd = [sys.executable, str(HERE), "--leg", "--sim", str(tmp / "sim"), "--repo", str(tmp / name),
           "--json", str(out), "--camera", args.camera, "--workers", str(args.workers)]
    print(f"leg {name}: {tree} ({_git(tree, 'rev-parse', '--short', 'HEAD')})", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=tmp)
    shutil.rmtree(tmp / name, ignore_errors=True)
    data = json.loads(out.read_text())
    data["warmup_s"] = warm_s
    data["commit"] = _git(tree, "rev-parse", "--short", "HEAD")
    data["dirty"] = bool(_git(tree, "status", "--porcelain", "--untracked-files=no"))
    print(f"leg {name}: night {data['night_s']:.1f} s", flush=True)
    return data


def _agg(data: dict, key) -> dict:
    out: dict = {}
    for r in data["stages"]:
        k = key(r)
        if k is None:
            continue
        a = out.setdefault(k, {"wall": 0.0, "cpu": 0.0, "read": 0, "written": 0, "pix": 0})
        for f in ("wall", "cpu", "read", "written", "pix"):
            a[f] += r[f]
    return out


def _rate(pix, sec) -> str:
    return f"{pix / 1e6 / sec:.1f}" if sec > 0 and pix else "-"


def _gb(n) -> str:
    return f"{n / 1e9:.2f}"


def report(legs: dict[str, dict], args) -> str:
    names = list(legs)
    new = legs[names[-1]]
    base = legs[names[0]] if len(names) > 1 else None
    lines = ["# Profile of the democam night (plain loop)", "",
             f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}; {args.workers} worker threads. "
             f"Night: democam (9 CCDs of 1024x2048), seed {SEED}, 5 bias, 5 dark, 5 flats and {N_SCIENCE} "
             f"science exposures in each of r and z ({new['raw_pixels'] / 1e6:.0f} Mpix of raw pixels). "
             "Legs run one after the other in this run, each in its own process; times compare within "
             "the run (the machine is shared: see the load averages).", ""]
    lines += ["| leg | code | set-up step (numba warm-up) s | night wall s | night CPU s | load avg at start / end "
              "| numba compile in the night s | products (certified) |", "|---|---|---|---|---|---|---|---|"]
    for n, d in legs.items():
        cert = sum(v.get("certified", 0) for v in d["status"].values())
        tot = sum(sum(v.values()) for v in d["status"].values())
        warm = ("none" if d["warmup_s"] is None else "failed" if d["warmup_s"] != d["warmup_s"]
                else f"{d['warmup_s']:.1f}")
        lines.append(f"| {n} | {d['commit']}{' + changes' if d['dirty'] else ''} | {warm} | {d['night_s']:.1f} | "
                     f"{d['night_cpu']:.1f} | {d['load_start'][0]:.1f} / {d['load_end'][0]:.1f} | "
                     f"{d['numba_compile_s']:.1f} | {tot} ({cert}) |")
    if base:
        # by product (type, camera, filter, date, detector): the id's last part is a digest of the
        # build's configuration and camera, which a newer tree may spell differently
        b_dig, n_dig = _by_product(base["digests"]), _by_product(new["digests"])
        same = sum(n_dig.get(k) == v for k, v in b_dig.items())
        lines += ["", f"Products with the same pixels in both legs (same type, filter, date and detector; "
                  f"pixel data hashed): {same} of {len(b_dig)} ({len(set(b_dig) & set(n_dig))} in both)."]
        lines += _sample_comparison(_by_product(base.get("samples") or {}), _by_product(new.get("samples") or {}))
        lines += ["", f"**Night wall time, {names[-1]} / {names[0]}: {new['night_s'] / base['night_s']:.3f}** "
                  f"({base['night_s'] / new['night_s']:.2f}x faster)."]

    # per build
    lines += ["", "## Per calib type", "", "Wall: the build's elapsed time (builds that run side by side "
              "overlap: their walls add up to more than the night's); CPU: the thread CPU time of the build's "
              "tasks and of the steps its own thread runs (numba's worker threads not counted); start: seconds "
              "into the night.", ""]
    build_cpu = {n: {} for n in names}
    for n in names:
        for r in legs[n]["stages"]:
            build_cpu[n][r["build"]] = build_cpu[n].get(r["build"], 0.0) + r["cpu"]
    head = "| build |" + "".join(f" {n} start s | {n} wall s | {n} CPU s |" for n in names) + (" wall ratio |" if base else "")
    lines += [head, "|---|" + "---|---|---|" * len(names) + ("---|" if base else "")]
    for i, b in enumerate(sorted(new["builds"], key=lambda x: x.get("start", 0.0))):
        row = f"| {b['build']} |"
        for n in names:
            bb = next((x for x in legs[n]["builds"] if x["build"] == b["build"]), None)
            start = f"{bb['start']:.1f}" if bb and "start" in bb else "-"
            row += (f" {start} | {bb['wall']:.1f} | {build_cpu[n].get(b['build'], 0.0):.1f} |" if bb
                    else " - | - | - |")
        if base:
            bb = next((x for x in base["builds"] if x["build"] == b["build"]), None)
            row += f" {b['wall'] / bb['wall']:.2f} |" if bb else " - |"
        lines.append(row)

    # per stage / step over the night
    def table(title, key, note):
        aggs = {n: _agg(d, key) for n, d in legs.items()}
        keys = sorted(aggs[names[-1]], key=lambda k: -(base and _agg(base, key).get(k, {}).get("wall", 0) or
                                                       aggs[names[-1]][k]["wall"]))
        keys += [k for k in (aggs[names[0]] if base else {}) if k not in keys]
        out = ["", f"## {title}", "", note, "",
               "| " + " | ".join(["stage", *(f"{n} thread-s" for n in names), *(f"{n} CPU s" for n in names),
                                  *(f"{n} Mpix/s per core (CPU)" for n in names), "read GB", "written GB"]) + " |",
               "|" + "---|" * (1 + 3 * len(names) + 2)]
        for k in keys:
            cells = [" / ".join(k) if isinstance(k, tuple) else k]
            cells += [f"{aggs[n][k]['wall']:.1f}" if k in aggs[n] else "-" for n in names]
            cells += [f"{aggs[n][k]['cpu']:.1f}" if k in aggs[n] else "-" for n in names]
            cells += [_rate(aggs[n][k]["pix"], aggs[n][k]["cpu"]) if k in aggs[n] else "-" for n in names]
            a = aggs[names[-1]].get(k) or aggs[names[0]][k]
            cells += [_gb(a["read"]), _gb(a["written"])]
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines += table("Per stage", lambda r: (r["stage"], r["step"]),
                   "Exclusive thread-seconds over the whole night, by task (process, sky-pass, combine; scale, "
                   "settle and mosaic run in the build's thread) and step inside it. Mpix/s per core: the pixels "
                   "of the tasks the step served / its CPU seconds (on a loaded machine thread-seconds include "
                   "waiting for a core; CPU seconds do not). Read/written: the newest leg's.")
    lines += table("Per calib type and stage", lambda r: (r["build"], r["stage"], r["step"]),
                   "As above, per build.")
    if new["numba_compiles"]:
        lines += ["", f"numba compiled during the {names[-1]} night: {', '.join(new['numba_compiles'])}."]
    return "\n".join(lines) + "\n"


def _by_product(by_id: dict) -> dict:
    """``{calib id: x}`` keyed by the id less its trailing digest (``bias-democam-NONE-2026-11-20-det000``)."""
    return {k.rsplit("-", 1)[0]: v for k, v in by_id.items()}


def _sample_comparison(base: dict, new: dict) -> list[str]:
    """How far apart the legs' products are where their pixels differ: over ~4096 fixed pixels of each
    product's image, the largest difference relative to the value and to the product's own
    pixel-to-pixel spread there (its noise and structure)."""
    import numpy as np

    common = [k for k in base if k in new and len(base[k]) == len(new[k])]
    if not common:
        return []
    worst_rel, worst_spread, where = 0.0, 0.0, ""
    for k in common:
        a, b = np.asarray(base[k]), np.asarray(new[k])
        ok = np.isfinite(a) & np.isfinite(b)
        if not ok.any():
            continue
        d = np.abs(a[ok] - b[ok])
        rel = float(np.max(d / np.maximum(np.abs(a[ok]), 1e-30)))
        spread = float(np.std(a[ok])) or 1.0
        if rel > worst_rel:
            worst_rel, where = rel, k
        worst_spread = max(worst_spread, float(np.max(d)) / spread)
    if worst_rel == 0.0:
        return ["", f"At ~4096 fixed pixels of each of {len(common)} products the image values are the same in "
                    "both legs: where the pixel hashes differ, the difference lies elsewhere (other pixels, or "
                    "a product's other planes and tables)."]
    return ["", f"Where they differ, at ~4096 fixed pixels of each of {len(common)} products: the largest "
                f"difference is {worst_rel:.1e} of the pixel's value ({where}) and {worst_spread:.1e} of a "
                "product's pixel-to-pixel spread."]


def _without_samples(legs: dict) -> dict:
    return {n: {k: v for k, v in d.items() if k != "samples"} for n, d in legs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-tree", type=Path, help="a worktree of the baseline commit (run first, same night)")
    ap.add_argument("--camera", default="democam")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=HERE.with_name("results") / "bench_night.md")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a new one in $TMPDIR)")
    ap.add_argument("--leg", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sim", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.leg:
        sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])
        return run_leg(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench-night-", dir=args.tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        sys.path.insert(0, str(HERE.parents[1]))
        from calib_core.camera import load_camera
        from calib_core.simulate.night import simulate_night

        t = time.perf_counter()
        simulate_night(load_camera(args.camera), tmp / "sim", seed=SEED, night=NIGHT, n_science=N_SCIENCE)
        print(f"simulated in {time.perf_counter() - t:.0f} s", flush=True)
        legs = {}
        if args.base_tree:
            legs["before"] = _leg(args.base_tree.resolve(), "before", tmp, args)
            # kept if the next leg fails
            args.out.with_suffix(".json").write_text(json.dumps(_without_samples(legs), indent=1))
        legs["after"] = _leg(HERE.parents[1], "after", tmp, args)
        text = report(legs, args)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(_without_samples(legs), indent=1))
        print(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
