"""Benchmark: per-detector sky measurement (object masking + 32-px binned background) on a
2048x4176 simulated post-ISR image, calibflow against the same steps done with photutils.

calibflow: ``mask_objects`` (3 iterations of 1024-px MEANCLIP background, sigma-5 Gaussian
detection at 2.5 sigma with 12-px growth, then replacement by a 256-px background) followed by the
32-px MEANCLIP binned model (SkyMeasurement).

photutils, the same steps: 3 x [Background2D (box 1024, sigma-clipped mean, masked by the
previous pass) subtracted, astropy ``convolve_fft`` with a Gaussian2DKernel(sigma 5),
``detect_sources`` at 2.5 x the clipped std of the convolved image with n_pixels 5, the
segmentation mask dilated by a 12-px-radius disk (``make_source_mask``)], the masked pixels filled
from a Background2D box 256, then Background2D box 32 (3-sigma clipped mean) with the mask. Also
a cheaper 1-pass photutils variant (box-256 background, one detection, box-32 grid).

Each measurement runs in a fresh subprocess (best of --repeat wall times, peak RSS of that
process); agreement is computed on identical images. Not run by the test suite.

    .venv/bin/python bench/bench_sky.py [--repeat 3] [--seed 0] [--out bench/results/sky.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, W = 4176, 2048
SKY = 1200.0


def simulate(seed: int):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    sky = SKY * (1 + 0.03 * xx / W - 0.02 * (yy / H) ** 2 + 0.01 * np.sin(xx / 150.0) * np.cos(yy / 210.0))
    img = sky.copy()
    for k in range(1500):
        star = k < 1200
        x0, y0 = rng.uniform(0, W), rng.uniform(0, H)
        s = 1.8 if star else rng.uniform(3, 8)
        flux = 10 ** rng.uniform(3.0, 6.5) if star else 10 ** rng.uniform(3.5, 5.5)
        r = int(8 * s) + 3
        ys, xs = slice(max(int(y0) - r, 0), min(int(y0) + r, H)), slice(max(int(x0) - r, 0), min(int(x0) + r, W))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        img[ys, xs] += flux / (2 * np.pi * s * s) * np.exp(-((xx[ys, xs] - x0) ** 2 + (yy[ys, xs] - y0) ** 2) / (2 * s * s))
    var = img + 20.0
    img = img + rng.normal(size=img.shape).astype(np.float32) * np.sqrt(var)
    mask = np.zeros(img.shape, np.int32)
    return img.astype(np.float32), mask, var.astype(np.float32), sky


def run_ours(img, mask, var):
    from calib_core.maskedimage import MaskedImage
    from calib_core.objectmask import mask_objects
    from calib_core.sky import SkyMeasurementConfig, measure_sky_background

    mi = MaskedImage(img.copy(), mask.copy(), var.copy())
    det = mask_objects(mi)
    # the sky measurement ignores the detected pixels (calibflow keeps them flagged; SkyConfig)
    from calib_core.maskedimage import mask_bits
    mi.mask[det] |= np.int32(mask_bits(["DETECTED"]))
    model = measure_sky_background(mi, SkyMeasurementConfig())
    return det, model.values


def run_photutils(img, mask, var, n_iter=3):
    from astropy.convolution import Gaussian2DKernel, convolve_fft
    from astropy.stats import SigmaClip, sigma_clipped_stats
    from photutils.background import Background2D, MeanBackground
    from photutils.segmentation import detect_sources
    from photutils.utils import circular_footprint

    clip = SigmaClip(sigma=3.0, maxiters=3)
    kernel = Gaussian2DKernel(5.0)
    det = None
    bs = 1024 if n_iter > 1 else 256
    for _ in range(n_iter):
        bkg0 = Background2D(img, bs, mask=det, sigma_clip=clip, bkg_estimator=MeanBackground(),
                            exclude_percentile=100.0)
        conv = convolve_fft(img - bkg0.background, kernel, allow_huge=True)
        _, _, std = sigma_clipped_stats(conv, sigma=3.0, maxiters=3)
        segm = detect_sources(conv, 2.5 * std, n_pixels=5)
        det = (segm.make_source_mask(footprint=circular_footprint(12)) if segm is not None
               else np.zeros(img.shape, bool))
    work = img
    if n_iter > 1:  # MaskObjects' replacement by a 256-px background
        fill = Background2D(img, 256, mask=det, sigma_clip=clip, bkg_estimator=MeanBackground(),
                            exclude_percentile=100.0).background
        work = img.copy()
        work[det] = fill[det]
    # filter_size 1: the raw per-box values, like calibflow's grid (no 3x3 median filter)
    bkg = Background2D(work, 32, mask=det, sigma_clip=clip, bkg_estimator=MeanBackground(),
                       exclude_percentile=100.0, filter_size=1)
    return det, bkg.background_mesh


def run_photutils1(img, mask, var):
    return run_photutils(img, mask, var, n_iter=1)


def worker(which: str, data: str, repeat: int, out: str) -> None:
    d = np.load(data)
    img, mask, var = d["img"], d["mask"], d["var"]
    fn = {"ours": run_ours, "photutils": run_photutils, "photutils1": run_photutils1}[which]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        det, grid = fn(img, mask, var)
        times.append(time.perf_counter() - t)
    np.savez(out, det=det, grid=np.asarray(grid, np.float32), times=np.array(times),
             maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sky.md"))
    ap.add_argument("--worker", choices=["ours", "photutils", "photutils1"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.data, a.repeat, a.result)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-sky-"))
    img, mask, var, sky = simulate(a.seed)
    np.savez(tmp / "data.npz", img=img, mask=mask, var=var)
    # baseline RSS of a process that only loads the data and the libraries
    res = {}
    for which in ("ours", "photutils", "photutils1"):
        out = tmp / f"{which}.npz"
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1")
        subprocess.run([sys.executable, __file__, "--worker", which, "--data", str(tmp / "data.npz"),
                        "--repeat", str(a.repeat), "--result", str(out)], check=True, env=env)
        r = np.load(out)
        res[which] = {"det": r["det"], "grid": r["grid"], "times": r["times"], "maxrss": int(r["maxrss"])}
    o, p, p1 = res["ours"], res["photutils"], res["photutils1"]
    both = (o["det"] & p["det"]).sum()
    frac_p_in_o = both / max(p["det"].sum(), 1)
    frac_o_in_p = both / max(o["det"].sum(), 1)
    # background agreement on the 32-px grid (calibflow: 64 x 130 bins of 32x32.1 px; photutils:
    # 64 x 130 boxes of 32x32 px, its last partial row of boxes dropped by trimming) vs the truth
    og, pg = o["grid"], p["grid"]
    ny, nx = min(og.shape[0], pg.shape[0]), min(og.shape[1], pg.shape[1])
    diff = (og[:ny, :nx] - pg[:ny, :nx])  # bins differ by < 0.2 px in y: compared one to one
    noise_per_bin = float(np.sqrt(SKY + 20.0) / 32.0)
    rms_diff = float(np.sqrt(np.nanmean((diff - np.nanmean(diff)) ** 2)))
    from calib_core.background import bin_edges

    # each grid against the noiseless sky averaged over its bins
    def truth_grid(shape, xe, ye):
        return np.array([[sky[ye[j]:ye[j + 1], xe[i]:xe[i + 1]].mean() for i in range(shape[1])]
                         for j in range(shape[0])])

    t_o = truth_grid(og.shape, bin_edges(W, og.shape[1]), bin_edges(H, og.shape[0]))
    t_p = truth_grid(pg.shape, np.arange(pg.shape[1] + 1) * 32, np.arange(pg.shape[0] + 1) * 32)
    rms_o = float(np.sqrt(np.nanmean((og - t_o) ** 2)))
    rms_p = float(np.sqrt(np.nanmean((pg - t_p) ** 2)))
    # the same on bins that are at most half masked (heavily masked bins are noisy in both)
    def half(det, shape, xe, ye):
        return np.array([[det[ye[j]:ye[j + 1], xe[i]:xe[i + 1]].mean() <= 0.5 for i in range(shape[1])]
                         for j in range(shape[0])])

    h_o = half(o["det"], og.shape, bin_edges(W, og.shape[1]), bin_edges(H, og.shape[0]))
    h_p = half(p["det"], pg.shape, np.arange(pg.shape[1] + 1) * 32, np.arange(pg.shape[0] + 1) * 32)
    rms_o_half = float(np.sqrt(np.nanmean((og - t_o)[h_o] ** 2)))
    rms_p_half = float(np.sqrt(np.nanmean((pg - t_p)[h_p] ** 2)))
    mib = lambda kb: kb / 1024.0  # noqa: E731  (ru_maxrss is KiB on Linux)
    best_o, best_p = float(o["times"].min()), float(p["times"].min())
    best_p1 = float(p1["times"].min())
    lines = [
        "# Sky measurement benchmark (object masking + 32-px binned background)",
        "",
        f"Image 2048x4176 float32, simulated sky {SKY:.0f} e- with gradients and a 1% pattern, "
        f"1200 stars + 300 galaxies, Poisson+read noise; seed {a.seed}. One core "
        "(OMP/NUMBA/BLAS threads = 1), each tool in a fresh subprocess, best of "
        f"{a.repeat}; peak memory is the subprocess's max RSS (includes the interpreter, libraries "
        "and the input arrays). Machine: 2 shared cores, timings noisy.",
        "",
        "| | calibflow | photutils, same steps (3 iter + fill) | ratio | photutils, 1 pass | ratio |",
        "|---|---|---|---|---|---|",
        f"| wall time, best of {a.repeat} (s) | {best_o:.2f} | {best_p:.2f} | {best_p / best_o:.1f}x | "
        f"{best_p1:.2f} | {best_p1 / best_o:.1f}x |",
        f"| all times (s) | {', '.join(f'{t:.2f}' for t in o['times'])} | "
        f"{', '.join(f'{t:.2f}' for t in p['times'])} | | {', '.join(f'{t:.2f}' for t in p1['times'])} | |",
        f"| peak RSS (MiB) | {mib(o['maxrss']):.0f} | {mib(p['maxrss']):.0f} | "
        f"{p['maxrss'] / o['maxrss']:.2f}x | {mib(p1['maxrss']):.0f} | {p1['maxrss'] / o['maxrss']:.2f}x |",
        f"| masked fraction | {o['det'].mean():.3f} | {p['det'].mean():.3f} | | {p1['det'].mean():.3f} | |",
        f"| 32-px background RMS vs truth, all bins (e-) | {rms_o:.3f} | {rms_p:.3f} | | | |",
        f"| same, bins <= 50% masked (e-) | {rms_o_half:.3f} | {rms_p_half:.3f} | | | |",
        "",
        "Agreement (calibflow vs photutils same steps):",
        "",
        f"* fraction of photutils-masked pixels also masked by calibflow: {frac_p_in_o:.3f}",
        f"* fraction of calibflow-masked pixels also masked by photutils: {frac_o_in_p:.3f}",
        f"* background difference RMS (mean offset removed): {rms_diff:.3f} e-, "
        f"= {rms_diff / noise_per_bin:.2f} x the noise per 32-px bin ({noise_per_bin:.2f} e-); "
        f"mean offset {float(np.nanmean(diff)):.3f} e-",
        "",
        "Work done: calibflow runs the reference MaskObjects (3 detection iterations, each with a "
        "1024-px MEANCLIP background, then a 256-px replacement background) and the 32-px MEANCLIP "
        "grid; 'photutils, same steps' mirrors that (3 x [Background2D 1024 masked by the previous "
        "pass, convolve_fft Gaussian sigma 5, detect_sources 2.5 sigma n_pixels 5, 12-px circular "
        "dilation], Background2D 256 fill, Background2D 32); '1 pass' is Background2D 256 + one "
        "detection + the 32-px grid. Detection in "
        "calibflow smooths/thresholds/grows on a 4x4-binned image (see calib_core/objectmask.py).",
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"ours_s": best_o, "photutils_s": best_p}))


if __name__ == "__main__":
    main()
