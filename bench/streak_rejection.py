"""Exposure rejection of the sky build against the simulator's truth, without the Prefect flow.

Per (camera geometry, seed): simulate a night of r-band science exposures with one cloud, one
satellite trail and one glow exposure (``bad_exposures=("cloud", "trail", "glow")``) and moonlight
gradients of up to +-10 %; ISR every raw with the simulator's truth bias, dark and flat (the
camera's ISR settings, bad pixels interpolated); then the sky build's two passes exactly as
:func:`calib_core.sky.frames.build_sky_frames` runs them, one exposure at a time so a large camera fits in
memory. The last pass's binned models and the guiding frames are cached (pickle), so the barrier
(:func:`calib_core.sky.frames.solve_sky_frames`) can be rerun with other rejection settings for free.

Reported per night: which exposures the barrier rejects (and why) against ``exposures.json``'s
``defect``, and the streak statistic of every exposure (:func:`calib_core.sky.streaks.find_streaks`):
the trail's score against the highest score of any other exposure.

The harness reproduces the flow: on the night a flow built with ``calibflow nightly`` (democam_mini,
seed 11, 12 r-band exposures), the flow's registry records the trail, cloud and glow rejected for
984, 116 and 916 usable bins against a median of 1106; this harness gives 982, 116 and 909 against
1106.5.

Run: ``python bench/streak_rejection.py --cameras democam_mini:0-7,minimosaic:0-7,democam:0-2
[--kept democam_mini:11:<sim dir>]``; writes ``bench/results/streak_rejection.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib_core.camera import effective_config, load_camera  # noqa: E402
from calib_core.io.raw import read_raw  # noqa: E402
from calib_core.isr.process import run_isr  # noqa: E402
from calib_core.simulate.night import SimulatedNight, simulate_night  # noqa: E402
from calib_core.sky.frames import (SkyConfig, _pass_pattern, bin_detector, find_outlier_exposures,  # noqa: E402
                                   solve_sky_frames)
from calib_core.sky.streaks import find_streaks  # noqa: E402

N_SCIENCE = {"democam_mini": 12, "minimosaic": 12, "democam": 10}


def _isr(camera, night: SimulatedNight, path, cfg: SkyConfig) -> dict:
    raw = read_raw(path, camera)
    isr = cfg.isr.model_copy(update={"do_fringe": False})      # r does not fringe (as isr_with_calibs)
    return {d: run_isr(rd, isr, bias=night.truth_bias(d), dark=night.truth_dark(d),
                       flat=night.truth_flat("r", d), darktime=raw.metadata.darktime, path=str(path))
            for d, rd in raw.detectors.items()}


def night_binned(camera_name: str, seed: int, workdir: Path, log=print, n_science: int | None = None,
                 sim_dir: Path | None = None, exposure_ids: list[str] | None = None, keep_sim: bool = False) -> dict:
    """The last pass's binned models, the guiding frames and the truth of one simulated night
    (cached in ``workdir/<camera>-<seed>.pkl``). ``sim_dir``: an existing simulated night to read
    instead (its r-band ``exposure_ids``, default all), e.g. one a flow has already built."""
    cache = workdir / f"{camera_name}-{seed}{'-' + str(n_science) if n_science else ''}{'-kept' if sim_dir else ''}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    camera = load_camera(camera_name)
    cfg = effective_config(SkyConfig, camera, None)
    simdir = workdir / f"{camera_name}-{seed}-sim"
    t0 = time.time()
    if sim_dir is None:
        night = simulate_night(camera, simdir, seed=seed, n_bias=0, n_dark=0, n_flat=0,
                               n_science=n_science or N_SCIENCE[camera_name], filters=("r",),
                               gradient_amplitude=0.10, bad_exposures=("cloud", "trail", "glow"))
    else:
        night = SimulatedNight.load(sim_dir)
    t_sim = time.time() - t0
    sci = [e for e in night.select("science", "r") if exposure_ids is None or e.exposure_id in exposure_ids]
    truth = {e.exposure_id: night.exposure_truth(e.exposure_id) for e in sci}
    result, binned = None, None
    t0 = time.time()
    for k in range(cfg.n_passes):
        pcfg = cfg.pass_config(k)
        binned = {}
        for e in sci:
            ims = _isr(camera, night, e.path, cfg)
            binned[e.exposure_id] = {d: bin_detector(camera, d, mi, pcfg,
                                                     result and _pass_pattern(camera, result, e.exposure_id, d))
                                     for d, mi in ims.items()}
        guide = result.frames if result else None
        if k < cfg.n_passes - 1:
            result = solve_sky_frames(camera, binned, pcfg, guide)
    out = {"camera": camera_name, "seed": seed, "binned": binned, "guide": guide,
           "defect": {e: t.get("defect") for e, t in truth.items()},
           "defect_params": {e: t.get("defect_params") for e, t in truth.items() if t.get("defect")},
           "seconds": {"simulate": t_sim, "isr_and_bins": time.time() - t0}}
    cache.write_bytes(pickle.dumps(out))
    if sim_dir is None and not keep_sim:
        shutil.rmtree(simdir, ignore_errors=True)
    log(f"{camera_name} seed {seed}: simulated in {t_sim:.0f} s, binned in {out['seconds']['isr_and_bins']:.0f} s")
    return out


def evaluate(nb: dict, cfg: SkyConfig | None = None) -> dict:
    """Rejections of the last pass against the truth, with the streak rule and without it (what
    main did before it), and every exposure's streak statistic."""
    camera = load_camera(nb["camera"])
    cfg = cfg or effective_config(SkyConfig, camera, None)
    without = cfg.model_copy(deep=True)
    without.rejection.streak.enabled = False
    t0 = time.time()
    res = solve_sky_frames(camera, nb["binned"], cfg, nb["guide"])
    t_solve = time.time() - t0
    before = solve_sky_frames(camera, nb["binned"], without, nb["guide"])
    # what the cut would reject were it never refused (a refused cut rejects nothing)
    unguarded = cfg.rejection.model_copy(update={"max_rejected_fraction": 1.0})
    would = find_outlier_exposures(res.residuals, unguarded, camera=camera)
    t0 = time.time()
    streaks = find_streaks(camera, res.residuals, cfg.rejection.streak)
    t_streak = (time.time() - t0) / max(len(streaks), 1)
    defect = nb["defect"]
    kind = {e: defect.get(e) or "good" for e in streaks}
    trail = [e for e in streaks if kind[e] == "trail"]
    tp = nb["defect_params"][trail[0]] if trail else None
    by_streak = {e for e, r in res.rejected.items() if r.endswith("a satellite trail")}

    def rejected(r, k):
        return [e for e in streaks if kind[e] == k and e in r.rejected]

    def eligible(e):
        """The exposure's best line among those significant on enough detectors to qualify (the
        statistic the threshold applies to); -inf where no line is."""
        s = streaks[e]
        return s.score if s.n_detectors >= cfg.rejection.streak.min_detectors else -math.inf

    def top(k):
        return max((eligible(e) for e in streaks if kind[e] == k), default=float("nan"))

    others = [e for e in streaks if kind[e] != "trail"]
    best_other = max(others, key=eligible)
    return {
        "camera": nb["camera"], "seed": nb["seed"], "n_exposures": len(streaks),
        "trail_rejected": bool(trail) and all(e in res.rejected for e in trail),
        "trail_rejected_by_streak": bool(trail) and all(e in by_streak for e in trail),
        "trail_streak_qualifies": bool(trail) and all(streaks[e].qualifies for e in trail),
        "trail_rejected_before": bool(trail) and all(e in before.rejected for e in trail),
        "trail_reason": res.rejected.get(trail[0], "") if trail else "",
        "trail_reason_before": before.rejected.get(trail[0], "") if trail else "",
        "good_rejected_by_streak": sorted(e for e in streaks if kind[e] == "good" and streaks[e].qualifies),
        "good_rejected": {e: res.rejected[e] for e in rejected(res, "good")},
        "good_rejected_before": {e: before.rejected[e] for e in rejected(before, "good")},
        "cloud_rejected": len(rejected(res, "cloud")), "cloud_rejected_before": len(rejected(before, "cloud")),
        "glow_rejected": len(rejected(res, "glow")), "glow_rejected_before": len(rejected(before, "glow")),
        "cloud_glow_by_streak": sorted(kind[e] for e in by_streak if kind[e] in ("cloud", "glow")),
        "refused": bool(res.warning), "refused_before": bool(before.warning), "warning": res.warning,
        "would_reject": {e: (kind[e], r) for e, r in would.items()},
        "rejected": {e: (kind[e], r) for e, r in res.rejected.items()},
        "trail_score": float(streaks[trail[0]].score) if trail else float("nan"),
        "trail_angle_found": float(streaks[trail[0]].angle_deg) if trail else float("nan"),
        "trail_angle_true": float(np.degrees(tp["angle"]) % 180.0) if tp else float("nan"),
        "trail_length_mm": float(streaks[trail[0]].length_mm) if trail else float("nan"),
        "trail_core_peak": tp["core_peak"] if tp else None, "trail_wing_peak": tp["wing_peak"] if tp else None,
        "max_good_score": float(top("good")), "max_cloud_score": float(top("cloud")),
        "max_glow_score": float(top("glow")),
        "max_other_score": float(eligible(best_other)), "max_other_kind": kind[best_other],
        "threshold": cfg.rejection.streak.min_score,
        "seconds_per_exposure_streak": t_streak, "seconds_solve": t_solve,
    }


def _yn(x) -> str:
    return "yes" if x else "NO"


def _margin(r: dict) -> str:
    other = r["max_other_score"]
    return f"{r['trail_score'] / other:.1f}x" if math.isfinite(other) and other > 0 else "no rival line"


def _refused(r: dict) -> str:
    if not r["refused"]:
        return "no"
    kinds = sorted(k for k, _ in r["would_reject"].values())
    return f"yes (would reject {len(kinds)} of {r['n_exposures']}: {', '.join(kinds)})"


def markdown(rows: list[dict]) -> str:
    lines = [
        "Exposure rejection of the sky build's barrier against the simulator's truth (bench/streak_rejection.py): "
        "r band, gradients up to +-10 %, one cloud, one trail and one glow exposure per night, ISR with the "
        "truth bias/dark/flat, the build's two passes. 'before': the same barrier with the streak rule off "
        "(main before it). Scores are the streak statistic (sigma) of each exposure's best line among those "
        "significant on at least two detectors (-inf: no such line); the rule rejects at "
        f"{rows[0]['threshold'] if rows else ''}. 'cut refused': the rules together would reject more than half "
        "of the night, so by design nothing is rejected.",
        "",
        "| geometry | seed | trail rejected (before) | by the streak rule | rule's own verdict on the trail "
        "| good rejected by the streak rule | good rejected by the other rules (before) | cut refused "
        "| cloud / glow rejected (before) | trail score | highest good | highest cloud / glow "
        "| margin trail / highest other | trail angle found / true (deg) | s per exposure |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['camera']} | {r['seed']} | {_yn(r['trail_rejected'])} ({_yn(r['trail_rejected_before'])}) "
            f"| {_yn(r['trail_rejected_by_streak'])} | {'qualifies' if r['trail_streak_qualifies'] else 'MISSED'} "
            f"| {len(r['good_rejected_by_streak'])} | {len(r['good_rejected'])} ({len(r['good_rejected_before'])}) "
            f"| {_refused(r)} | {r['cloud_rejected']} / {r['glow_rejected']} "
            f"({r['cloud_rejected_before']} / {r['glow_rejected_before']}) "
            f"| {r['trail_score']:.1f} | {r['max_good_score']:.1f} "
            f"| {r['max_cloud_score']:.1f} / {r['max_glow_score']:.1f} "
            f"| {_margin(r)} "
            f"| {r['trail_angle_found']:.1f} / {r['trail_angle_true']:.1f} "
            f"| {r['seconds_per_exposure_streak']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", default="democam_mini:0-7,minimosaic:0-7,democam:0-2",
                    help="camera:first-last seeds, comma-separated")
    ap.add_argument("--kept", default="", help="also a night a flow has built: camera:seed:sim_dir (its r-band "
                                               "science exposures)")
    ap.add_argument("--workdir", default="/tmp/streak-bench", help="simulations and the cache of binned models")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streak_rejection"))
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    nights = []
    for spec in filter(None, args.cameras.split(",")):
        cam, seeds = spec.split(":")
        lo, hi = (int(s) for s in seeds.split("-"))
        nights += [(cam, seed, None) for seed in range(lo, hi + 1)]
    if args.kept:
        cam, seed, sim_dir = args.kept.split(":", 2)
        nights.append((cam, int(seed), Path(sim_dir)))
    rows = []
    for cam, seed, sim_dir in nights:
        row = evaluate(night_binned(cam, seed, workdir, sim_dir=sim_dir))
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    Path(args.out + ".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
