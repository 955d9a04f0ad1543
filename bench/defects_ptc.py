"""Detector characterisation on a simulated night: the nightly flow with defects and PTC (the default
policy) against the same night without them (the camera file's gains, no defects mask), scored
against the simulator's truth.

The night: democam_mini, seed 11, true gains 3-5 % off the camera file (``gain_error=0.04``), the
extra bad pixels (``pixel_defects``), PTC flat pairs at 2 and 12 s besides four 5 s flats, six
science exposures in r. Scores:

* defects: the fraction of injected bad pixels masked, and of good pixels masked (false positives);
* gains: each amplifier's measured gain against its true gain, in units of the measured error;
* amplifier steps: across each detector's amplifier boundary (x = 128), the step of flat / truth
  flat (16-column strips) and of the sky frame's ``(1 + F) / P`` (32-px bin columns) less the mean
  of the steps beside it (a smooth slope is no step), in units of its noise.

``python -m bench.defects_ptc`` writes bench/results/defects_ptc.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NIGHT = "2026-11-20"
CAMERA = "democam_mini"


def _night(workdir: Path, policy_types: list[str] | None):
    from calib_core.simulate.night import simulate_night
    from flows.nightly import NightlyPolicy, nightly
    from tests._repos import ingested_repo

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    sim = simulate_night(CAMERA, workdir / "sim", seed=11, night=NIGHT, n_bias=5, n_dark=4, n_flat=4,
                         n_science=6, filters=("r",), gain_error=0.04, pixel_defects=True, ptc_exptimes=(2.0, 12.0))
    store, reg = ingested_repo(workdir / "repo", workdir / "sim" / "raw", CAMERA)
    policy = NightlyPolicy() if policy_types is None else NightlyPolicy(types=policy_types)
    t0 = time.time()
    summary = nightly(night=NIGHT, camera=CAMERA, repo=str(store.root), policy=policy)
    return sim, reg, summary, time.time() - t0


def _products(reg, calib_type: str) -> dict[int, dict]:
    from calib_core.repository import list_calibs

    return {c.detector: c for c in list_calibs(reg, calib_type=calib_type)}


def _step(vals: list[float], errs: list[float]) -> float:
    """The step between columns 1 and 2 of four adjacent column means, less the mean of the steps
    beside it (a smooth slope is not a step), in units of its noise."""
    a, b, c, d = vals
    excess = (c - b) - 0.5 * ((b - a) + (d - c))          # = 0.5 a - 1.5 b + 1.5 c - 0.5 d
    noise = math.sqrt(0.25 * errs[0] ** 2 + 2.25 * errs[1] ** 2 + 2.25 * errs[2] ** 2 + 0.25 * errs[3] ** 2)
    return excess / noise


def _flat_steps(sim, reg) -> list[float]:
    from calib_core.io.products import read_product

    out = []
    for det, row in sorted(_products(reg, "flat").items()):
        flat = read_product(row.path)[0]
        with np.errstate(divide="ignore", invalid="ignore"):      # dead pixels: truth 0, masked below
            ratio = flat.image / sim.truth_flat("r", det)
        ok = (flat.mask == 0) & (sim.truth_defects(det) == 0)
        vals, errs = [], []
        for x0 in (96, 112, 128, 144):          # 16-column strips, the boundary between the middle two
            v = ratio[:, x0:x0 + 16][ok[:, x0:x0 + 16]]
            vals.append(v.mean())
            errs.append(v.std() / math.sqrt(v.size))
        out.append(_step(vals, errs))
    return out


def _sky_steps(sim, reg) -> list[float]:
    from calib_core.stats.background import BackgroundModel

    out = []
    for det, row in sorted(_products(reg, "sky").items()):
        frame = BackgroundModel.from_fits(row.path)
        p = sim.truth_sky("r", det)
        xe, ye = frame.x_edges, frame.y_edges
        k = int(np.searchsorted(xe, 128))
        if xe[k] != 128 or k < 2 or k + 2 >= len(xe):
            continue
        vals, errs = [], []
        for j in (k - 2, k - 1, k, k + 1):       # bin columns, the boundary between the middle two
            cols = slice(xe[j], xe[j + 1])
            ratios, e = [], []
            for i in range(len(ye) - 1):
                v = frame.values[i, j]
                if np.isfinite(v):
                    ratios.append((1 + v) / p[ye[i]:ye[i + 1], cols].mean())
                    e.append(frame.errors[i, j] / p[ye[i]:ye[i + 1], cols].mean())
            vals.append(float(np.mean(ratios)))
            errs.append(math.sqrt(np.sum(np.square(e))) / len(e))
        out.append(_step(vals, errs))
    return out


def _defects(sim, reg) -> tuple[int, int, int, int]:
    from calib_core.io.products import read_product
    from calib_core.maskedimage import MASK_PLANES

    found = injected = false = good = 0
    for det, row in sorted(_products(reg, "defects").items()):
        mask = (read_product(row.path)[0].mask & MASK_PLANES.bit("BAD")) != 0
        truth = sim.truth_defects(det) != 0
        found += int((mask & truth).sum())
        injected += int(truth.sum())
        false += int((mask & ~truth).sum())
        good += int((~truth).sum())
    return found, injected, false, good


def _gains(sim, reg) -> list[tuple]:
    from calib_core.builds.ptc import read_ptc

    out = []
    for det, row in sorted(_products(reg, "ptc").items()):
        name = sim.camera.detector(det).name
        nominal = sim.static_truth["detectors"][name]["nominal_gains"]
        for amp, m in read_ptc(row.path).items():
            g = sim.true_gains(det)[amp]
            out.append((det, amp, g, nominal[amp], m["gain"], m["gain_err"]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "defects_ptc"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "defects_ptc.md"))
    args = ap.parse_args(argv)
    from prefect.testing.utilities import prefect_test_harness

    lines = ["# Defects and PTC on a simulated night (`python -m bench.defects_ptc`)", "",
             "democam_mini, seed 11, `gain_error=0.04` (true gains 3-5 % off the camera file), `pixel_defects`, "
             "PTC pairs at 2 and 12 s plus four 5 s flats, six r science exposures; 9 detectors x 2 amplifiers.", ""]
    with prefect_test_harness(server_startup_timeout=180):
        runs = {}
        for label, types in (("with defects and PTC (default)", None),
                             ("camera file only", ["bias", "dark", "flat", "fringe", "sky"])):
            print(f"== {label}", flush=True)
            runs[label] = _night(Path(args.work) / label.split()[0], types)
    for label, (sim, reg, summary, secs) in runs.items():
        steps = [(s["type"], s["action"]) for s in summary["steps"]]
        lines += [f"## {label}", "", f"nightly: {secs:.0f} s; builds {steps}", ""]
        fs, ss = _flat_steps(sim, reg), _sky_steps(sim, reg)
        lines.append(f"- flat amplifier steps (sigma of the step): {', '.join(f'{v:+.1f}' for v in fs)}; "
                     f"max |step| {max(map(abs, fs)):.1f} sigma")
        if ss:
            lines.append(f"- sky frame amplifier steps (sigma): {', '.join(f'{v:+.1f}' for v in ss)}; "
                         f"max |step| {max(map(abs, ss)):.1f} sigma")
        if _products(reg, "defects"):
            found, injected, false, good = _defects(sim, reg)
            lines.append(f"- defects: {found} of {injected} injected bad pixels masked ({found / injected:.4%}); "
                         f"{false} of {good} good pixels masked ({false / good:.5%})")
        gains = _gains(sim, reg)
        if gains:
            pulls = [(m - g) / e for _, _, g, _, m, e in gains]
            off = [abs(g / n - 1) for _, _, g, n, _, _ in gains]
            lines.append(f"- gains: camera file off by {min(off):.1%}..{max(off):.1%}; measured - true = "
                         f"{', '.join(f'{p:+.1f}' for p in pulls)} sigma (rms {np.sqrt(np.mean(np.square(pulls))):.2f}); "
                         f"errors {min(e / g for *_, g, e in gains):.2%}..{max(e / g for *_, g, e in gains):.2%}")
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
