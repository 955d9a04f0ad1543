"""The night's slow steps (issue 16 item 2), each timed on the same democam input with the code
before (the baseline commit's ``calib_core``) and after (this tree's), in one run, one core.

The steps are those ``bench/results/bench_night.md`` showed below 10 Mpix/s per core, or with many
CPU seconds and no pixel figure:

* **fringe fit**: ``calib_core.isr.process.fit_fringe_scale`` on one post-ISR z detector (2 Mpix) and the
  simulator's fringe frame; in the night's profile its binned background is attributed to the
  "background" step, so the step's own time is the call less ``measure_background`` on the same
  input (timed apart, the same code in both legs);
* **sky-pass pattern**: what ``tasks.calib_tasks.sky_rebin`` computes besides the wrapped steps: the
  previous pass's sky ``L (1 + F)`` on every pixel of the 9 detectors (``SkySurface.on_detector``
  times ``1 + frame.evaluate()``); the night's "(rest)" also has the task's reading of the pickled
  surface and the frame file, not timed here;
* **sky barrier**: both passes of the sky build's serial focal-plane barrier
  (``calib_core.sky.frames.solve_sky_frames``) on 8 exposures x 9 detectors of binned models (pass 1 on
  16-px bins without rejection, pass 2 on 32-px bins with the exposure rejection and its
  satellite-trail search); the night's "scale / (rest)" also reads the binned models' files;
* **ptc pair stats**: ``calib_core.builds.ptc.pair_stats`` on one flat pair of a 2-amplifier detector,
  what the PTC combine's "(rest)" spends its time on;
* **fringe continuum**: ``calib_core.builds.fringe.remove_continuum`` of a stacked fringe frame with its 8
  inputs in memory (the night reads them from files, attributed to "read").

Input (made once, by this tree, and read by both legs): the simulator's democam truth for z (seed 1:
the sky pattern, the fringe frame; one raw z exposure for the ISR'd detector), with per-exposure
sky levels, noise and, for the barrier, binned models measured without object masking (the
simulator's objects are not in these images; the barrier's cost is set by the number of bins). PTC
flats: Poisson electrons over a 1 % response, read noise, gain 1.6 / 2.3.

Each leg runs in its own process with ``PYTHONPATH`` set to its tree, one thread
(``OMP_NUM_THREADS=1`` etc.); each step is called once untimed (numba compiles or loads its cache),
then ``--repeat`` times, and the least CPU time (``time.process_time``) is reported. Mpix/s per core
is the pixels the step serves in the night (as ``bench/bench_night.py`` counts them: the detector
for a process step, the inputs for a combine, the exposures' pixels for the barrier) over that CPU
time. The legs' outputs are compared: bit for bit where the change keeps the arithmetic, else the
largest relative difference.

    python bench/bench_steps.py [--base 256320a] [--repeat 3] [--scratch DIR] [--out bench/results/bench_steps.md]

The baseline's ``calib_core`` is extracted with ``git archive`` into the scratch folder (no worktree);
the scratch folder (~0.6 GB) is deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ONE_CORE = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
STEPS = ["fringe fit", "sky-pass pattern", "sky barrier", "ptc pair stats", "fringe continuum"]
N_EXP = 8
DET = 4                 # the detector of the single-detector steps
NIGHT_PROFILE = {       # bench/results/bench_night.md (after leg), Mpix/s per core from CPU, and CPU s
    "fringe fit": ("sky z / process / fringe fit", 3.2, 47.0),
    "sky-pass pattern": ("sky-pass / (rest)", 7.3, 41.2),
    "sky barrier": ("scale / (rest)", None, 54.6),
    "ptc pair stats": ("ptc / combine / (rest)", 8.0, 23.7),
    "fringe continuum": ("fringe z / combine / continuum", 9.5, 15.9),
}


# ---------------------------------------------------------------------------------------------------
# input (this tree)
# ---------------------------------------------------------------------------------------------------


def make_inputs(d: Path) -> None:
    """Write every step's input under ``d`` (arrays, FITS models, JSON)."""
    sys.path.insert(0, str(ROOT))
    from calib_core.io.raw import read_raw
    from calib_core.isr.process import IsrConfig, run_isr
    from calib_core.maskedimage import MaskedImage
    from calib_core.simulate.night import simulate_night
    from calib_core.sky.frames import SkyConfig, bin_detector, solve_sky_frames

    night = simulate_night("democam", d / "night", seed=1, n_bias=0, n_dark=0, n_flat=0, n_science=1,
                           filters=("z",))
    cam = night.camera
    # fringe fit: one post-ISR z detector (overscan, assembly, variance) and the fringe frame
    raw = read_raw(night.exposures[0].path, cam, [DET])
    det_raw = raw.detectors[DET]
    mi = run_isr(det_raw, IsrConfig(do_bias=False, do_dark=False, do_flat=False, do_defect=False))
    np.savez(d / "fringe_fit.npz", image=mi.image, mask=mi.mask, variance=mi.variance,
             fringe=night.truth_fringe("z", DET).astype(np.float32))
    # the barrier: binned models of N_EXP exposures (sky level, a gradient, the pattern, noise)
    rng = np.random.default_rng(0)
    cfg = SkyConfig()
    pattern = {det.id: night.truth_sky("z", det.id).astype(np.float64) for det in cam.detectors}
    models = {0: {}, 1: {}}
    for e in range(N_EXP):
        level = 1500.0 * (1 + 0.2 * rng.random())
        gx, gy = rng.normal(0, 0.01, 2)
        for det in cam.detectors:
            u, v = cam.pixel_to_focal_plane(det, *np.meshgrid(np.arange(det.nx), np.arange(det.ny)))
            sky = level * pattern[det.id] * (1 + gx * u / 50.0 + gy * v / 50.0)
            img = (sky + rng.standard_normal(sky.shape) * np.sqrt(sky)).astype(np.float32)
            mimg = MaskedImage(img, np.zeros(img.shape, np.int32), sky.astype(np.float32))
            for k in (0, 1):
                pcfg = cfg.pass_config(k).model_copy(update={"do_mask_objects": False})
                models[k].setdefault(e, {})[det.id] = bin_detector(cam, det.id, mimg, pcfg)
    (d / "barrier").mkdir()
    for k in (0, 1):
        for e in models[k]:
            for det_id, m in models[k][e].items():
                m.to_hdulist().writeto(d / "barrier" / f"p{k}-e{e}-d{det_id}.fits")
    # the re-masking pass's input: pass 1's surface of the first exposure and its frames
    r0 = solve_sky_frames(cam, models[0], cfg.pass_config(0))
    s = r0.surfaces[0]
    (d / "pass").mkdir()
    for det_id, f in r0.frames.items():
        f.to_hdulist().writeto(d / "pass" / f"frame-d{det_id}.fits")
    (d / "pass" / "surface.json").write_text(json.dumps({"coeffs": list(map(float, s.coeffs)), "order": s.order,
                                                         "centre": list(map(float, s.centre)),
                                                         "half_size": float(s.half_size)}))
    # PTC: one flat pair of a 2-amplifier detector
    det = cam.detector(DET)
    response = 1 + 0.01 * rng.standard_normal((det.ny, det.nx))
    gain = np.where(np.arange(det.nx)[None, :] < det.nx // 2, 1.6, 2.3)
    flats = [((rng.poisson(20000.0 * response) + rng.normal(0, 5.0, response.shape)) / gain).astype(np.float32)
             for _ in range(2)]
    np.savez(d / "ptc.npz", a=flats[0], b=flats[1])
    # the continuum: 8 prepared inputs c_j F + K + noise (F the fringe frame, K the sky pattern)
    F = night.truth_fringe("z", DET).astype(np.float64)
    K = pattern[DET] - pattern[DET].mean()
    F = F / F.std() * 0.02
    inputs = [(1 + 0.3 * rng.standard_normal()) * F + K + rng.normal(0, 0.01, F.shape) for _ in range(N_EXP)]
    np.savez(d / "continuum.npz", inputs=np.array(inputs, np.float32))
    shutil.rmtree(d / "night" / "raw")
    (d / "camera.txt").write_text("democam")


# ---------------------------------------------------------------------------------------------------
# one leg (a subprocess; PYTHONPATH is the tree measured)
# ---------------------------------------------------------------------------------------------------


def _timed(fn, repeat: int):
    out = fn()                         # untimed: numba compiles or loads its cache
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t)
    return best, out


#: where the modules a leg uses lived before calib_core's subpackages (a baseline tree's layout)
LEGACY_MODULES = {
    "calib_core.stats.background": "calib_core.background", "calib_core.builds.fringe": "calib_core.fringe",
    "calib_core.isr.process": "calib_core.isr", "calib_core.builds.ptc": "calib_core.ptc",
    "calib_core.sky.frames": "calib_core.sky",
}


def _module(name: str):
    """Module ``name`` of the tree a leg measures, or its older name in a baseline tree."""
    import importlib

    import calib_core

    # an import alone cannot tell: an editable install of another checkout supplies what a tree lacks
    rel = Path(calib_core.__file__).resolve().parents[1].joinpath(*name.split("."))
    in_tree = rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()
    return importlib.import_module(name if in_tree else LEGACY_MODULES[name])


def run_leg(d: Path, out_dir: Path, repeat: int) -> dict:
    import calib_core
    from calib_core.camera import load_camera
    from calib_core.maskedimage import MASK_PLANES, MaskedImage

    background, fringe = _module("calib_core.stats.background"), _module("calib_core.builds.fringe")
    isr, ptc, sky = _module("calib_core.isr.process"), _module("calib_core.builds.ptc"), _module("calib_core.sky.frames")
    BackgroundConfig, BackgroundModel, measure_background = (background.BackgroundConfig, background.BackgroundModel,
                                                             background.measure_background)
    remove_continuum, IsrConfig, fit_fringe_scale = fringe.remove_continuum, isr.IsrConfig, isr.fit_fringe_scale
    PtcConfig, pair_stats = ptc.PtcConfig, ptc.pair_stats
    SkyConfig, SkySurface, solve_sky_frames = sky.SkyConfig, sky.SkySurface, sky.solve_sky_frames
    cam = load_camera("democam")
    npix = cam.detector(DET).nx * cam.detector(DET).ny
    res, arrays = {"tree": str(Path(calib_core.__file__).parents[1])}, {}

    # fringe fit
    z = np.load(d / "fringe_fit.npz")
    mi = MaskedImage(z["image"], z["mask"], z["variance"])
    fr = MaskedImage.from_image(z["fringe"])
    bits = MASK_PLANES.bits(IsrConfig().fringe_mask)
    cpu, scale = _timed(lambda: fit_fringe_scale(mi, fr, bits), repeat)
    good = np.isfinite(mi.image) & np.isfinite(fr.image) & (((mi.mask | fr.mask) & bits) == 0)
    work = MaskedImage(np.where(np.isfinite(mi.image), mi.image, np.float32(0)),
                       np.where(good, mi.mask, mi.mask | np.int32(MASK_PLANES.bit("BAD"))), mi.variance)
    cpu_bg, _ = _timed(lambda: measure_background(work, BackgroundConfig()), repeat)
    res["fringe fit"] = {"cpu": cpu - cpu_bg, "cpu_call": cpu, "cpu_background": cpu_bg, "mpix": npix / 1e6}
    arrays["fringe_scale"] = np.array([scale])

    # the re-masking pass's pattern, every detector
    sj = json.loads((d / "pass" / "surface.json").read_text())
    surface = SkySurface(np.array(sj["coeffs"]), sj["order"], tuple(sj["centre"]), sj["half_size"])
    frames = {det.id: BackgroundModel.from_fits(d / "pass" / f"frame-d{det.id}.fits") for det in cam.detectors}

    def patterns():
        return [surface.on_detector(cam, det) * (1.0 + frames[det.id].evaluate()) for det in cam.detectors]
    cpu, pats = _timed(patterns, repeat)
    res["sky-pass pattern"] = {"cpu": cpu, "mpix": len(pats) * npix / 1e6}
    arrays["patterns"] = np.array(pats)

    # the barrier's two passes
    binned = {k: {e: {det.id: BackgroundModel.from_fits(d / "barrier" / f"p{k}-e{e}-d{det.id}.fits")
                      for det in cam.detectors} for e in range(N_EXP)} for k in (0, 1)}
    cfg = SkyConfig()

    def barrier():
        r0 = solve_sky_frames(cam, binned[0], cfg.pass_config(0))
        return solve_sky_frames(cam, binned[1], cfg.pass_config(1), r0.frames)
    cpu, r1 = _timed(barrier, max(1, repeat - 1))
    res["sky barrier"] = {"cpu": cpu, "mpix": N_EXP * len(cam.detectors) * npix / 1e6,
                          "rejected": {str(e): why for e, why in r1.rejected.items()},
                          "scales": [float(r1.scales[e]) for e in range(N_EXP)]}
    arrays["barrier_frames"] = np.array([r1.frames[det.id].values for det in cam.detectors])

    # PTC pair statistics
    z = np.load(d / "ptc.npz")
    det = cam.detector(DET)
    amps = [("A", 0, det.ny, 0, det.nx // 2), ("B", 0, det.ny, det.nx // 2, det.nx)]
    im1, im2 = MaskedImage.from_image(z["a"]), MaskedImage.from_image(z["b"])
    cpu, stats = _timed(lambda: pair_stats(im1, im2, amps, 1.0, PtcConfig()), repeat)
    res["ptc pair stats"] = {"cpu": cpu, "mpix": 2 * npix / 1e6}
    arrays["ptc"] = np.array([[s.mu1, s.mu2, s.var, s.npix] for s in stats])

    # the fringe continuum's removal
    z = np.load(d / "continuum.npz")["inputs"]
    inputs = [MaskedImage(a, np.zeros(a.shape, np.int32), np.full(a.shape, 1e-4, np.float32)) for a in z]
    frame = MaskedImage(z.mean(axis=0).astype(np.float32), np.zeros(z.shape[1:], np.int32),
                        np.full(z.shape[1:], 1e-4 / len(z), np.float32))
    cpu, (cont, info) = _timed(lambda: remove_continuum(frame, inputs), repeat)
    res["fringe continuum"] = {"cpu": cpu, "mpix": len(inputs) * npix / 1e6,
                               "info": {k: v for k, v in info.items() if not isinstance(v, (np.ndarray,))}}
    arrays["continuum_image"] = cont.image
    arrays["continuum_variance"] = cont.variance

    np.savez(out_dir / "outputs.npz", **arrays)
    return res


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _leg(tree: Path, d: Path, out_dir: Path, repeat: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ONE_CORE, "PYTHONPATH": str(tree)}
    load0 = _load()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--leg", str(d), str(out_dir), str(repeat)],
                   env=env, check=True, cwd=str(tree))
    res = json.loads((out_dir / "result.json").read_text())
    res["load"] = f"{load0} -> {_load()}"
    return res


def _compare(a: np.ndarray, b: np.ndarray) -> str:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.array_equal(a, b, equal_nan=True):
        return "identical"
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))
    n = int(np.sum(~((a == b) | (np.isnan(a) & np.isnan(b)))))
    return f"{n} of {a.size} values differ, by at most {np.nanmax(rel):.1e} (relative)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="256320a", help="baseline commit (its calib_core is the 'before')")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scratch", default=None, help="scratch folder (default: a temporary one), deleted at the end")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_steps.md"))
    args = ap.parse_args(argv)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-steps-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        started = dt.datetime.now(dt.timezone.utc)
        load_start = _load()
        d = scratch / "inputs"
        d.mkdir()
        make_inputs(d)
        base_tree = scratch / "base"
        base_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "calib_core"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive, check=True)
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "calib_core"], capture_output=True,
                               text=True).stdout.strip()
        before = _leg(base_tree, d, scratch / "before", args.repeat)
        after = _leg(ROOT, d, scratch / "after", args.repeat)
        ob, oa = np.load(scratch / "before" / "outputs.npz"), np.load(scratch / "after" / "outputs.npz")
        same = {"fringe fit": _compare(ob["fringe_scale"], oa["fringe_scale"]),
                "sky-pass pattern": _compare(ob["patterns"], oa["patterns"]),
                "sky barrier": _compare(ob["barrier_frames"], oa["barrier_frames"])
                + ("; rejections and sky levels identical" if before["sky barrier"]["rejected"]
                   == after["sky barrier"]["rejected"] and before["sky barrier"]["scales"]
                   == after["sky barrier"]["scales"] else "; REJECTIONS OR SKY LEVELS DIFFER"),
                "ptc pair stats": _compare(ob["ptc"], oa["ptc"]),
                "fringe continuum": "image " + _compare(ob["continuum_image"], oa["continuum_image"])
                + ", variance " + _compare(ob["continuum_variance"], oa["continuum_variance"])
                + (", info identical" if before["fringe continuum"]["info"] == after["fringe continuum"]["info"]
                   else ", INFO DIFFERS")}
        rows = []
        for step in STEPS:
            b, a = before[step], after[step]
            mb, ma = b["mpix"] / b["cpu"], a["mpix"] / a["cpu"]
            night = NIGHT_PROFILE[step]
            rows.append({"step": step, "night_stage": night[0], "night_mpix_s": night[1], "night_cpu_s": night[2],
                         "mpix": a["mpix"], "cpu_before": b["cpu"], "cpu_after": a["cpu"],
                         "mpix_s_before": mb, "mpix_s_after": ma, "speedup": b["cpu"] / a["cpu"],
                         "outputs": same[step]})
        result = {"date": started.isoformat(timespec="minutes"), "base": args.base, "head": head,
                  "head_dirty": bool(dirty), "repeat": args.repeat, "load_start": load_start,
                  "load_end": _load(), "legs": {"before": before, "after": after}, "rows": rows,
                  "seconds": time.perf_counter() - t0}
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        out.write_text(_markdown(result))
        print(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _markdown(r: dict) -> str:
    fb, fa = r["legs"]["before"]["fringe fit"], r["legs"]["after"]["fringe fit"]
    lines = [
        "# The night's slow steps, before and after (bench/bench_steps.py)",
        "",
        f"Run {r['date'][:16].replace('T', ' ')} UTC on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, one thread per leg. Before: `calib_core` of {r['base']}; after: "
        f"this tree ({r['head']}{', with uncommitted changes' if r['head_dirty'] else ''}). Least CPU time "
        f"(`time.process_time`) of {r['repeat']} calls after an untimed one ({max(1, r['repeat'] - 1)} for the "
        "barrier); same input for both legs (democam, seed 1; see the script's docstring). "
        f"Load average (1/5/15 min) at the start {r['load_start']}, at the end {r['load_end']}; "
        f"before leg {r['legs']['before']['load']}, after leg {r['legs']['after']['load']}. "
        "The machine is shared: compare the legs' ratios, not the absolute times.",
        "",
        "| step (night's stage) | night: Mpix/s per core, CPU s | Mpix served | before CPU s | after CPU s "
        "| before Mpix/s per core | after Mpix/s per core | after / before CPU | outputs, after vs before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        night = f"{x['night_mpix_s'] if x['night_mpix_s'] is not None else '-'}, {x['night_cpu_s']:.0f}"
        lines.append(f"| {x['step']} (`{x['night_stage']}`) | {night} | {x['mpix']:.1f} | {x['cpu_before']:.3f} | "
                     f"{x['cpu_after']:.3f} | {x['mpix_s_before']:.1f} | {x['mpix_s_after']:.1f} | "
                     f"{x['cpu_after'] / x['cpu_before']:.3f} ({x['speedup']:.1f}x faster) | {x['outputs']} |")
    lines += [
        "",
        f"The fringe fit's row is the call less its binned background (the night's profile puts that in "
        f"\"background\"): whole call {fb['cpu_call']:.3f} s before, {fa['cpu_call']:.3f} s after; background "
        f"{fb['cpu_background']:.3f} s / {fa['cpu_background']:.3f} s (the same code). The barrier's Mpix are "
        "the exposures' pixels it serves (the night's profile gives the barrier no pixel figure).",
        "",
        f"Run time {r['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--leg":
        d, out_dir, repeat = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
        sys.path.insert(0, os.environ["PYTHONPATH"])
        res = run_leg(d, out_dir, repeat)
        (out_dir / "result.json").write_text(json.dumps(res, indent=1, default=str))
    else:
        main()
