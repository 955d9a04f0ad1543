"""Cosmic-ray finders on simulated darks against the injected cosmic rays: calibflow's own
(:func:`calib_core.isr.cosmicrays.find_cosmic_rays`, the pipeline's), the same recipe with full-image median
filters (the finder before docs/algorithms.md#cosmic-ray-speed) and astroscrappy (L.A.Cosmic in C).

Truth: the simulator records only how many cosmic rays each detector got, not where. Here its
``_cosmic_rays`` is wrapped to keep the electrons each call adds to the expected-electron image
(the array after the call less a copy taken before it); the wrapper draws nothing, so the raws are
exactly those of an unwrapped run with the same seed (checked: identical pixels). A cosmic ray is
the 8-connected set of pixels it deposited charge in (tracks 1..4 px, ~2500 e-).

Both finders see the same post-ISR darks (the camera's effective ``DarkConfig``: per-row overscan,
the night's own master bias subtracted), in ADU with the ISR variance plane. calibflow's finder runs
with the DarkConfig values (6 sigma, 50 ADU) and no hot-pixel exclusion, as the pipeline calls it.
astroscrappy gets the image and variance in electrons (gain 1), ``sigclip`` its default 4.5 or the
same 6 sigma, ``satlevel`` off (SAT/BAD/NO_DATA pixels go in ``inmask``), other
settings default; "padded" variants mirror 4 px around the image first (astroscrappy skips the
outer pixels: unpadded it misses the cosmic rays there) and crop the mask back.

Per finder, over every dark and detector:

* found: cosmic rays with at least one pixel flagged; whole: every pixel of the track flagged;
* false: flagged 8-connected groups with no cosmic-ray pixel within 1 px (how many sit on a hot
  pixel, a truth dark rate above 10 read noise per dark time, in brackets);
* as the pipeline uses a mask: flags grown by ``cr_grow`` (2 px disk), written with the input, then
  cleared by the combine's ``calib_core.isr.persistent.clear_persistent_cr`` (hot pixels repeat, cosmic
  rays do not); "e- left" is the cosmic-ray charge outside that mask (it reaches the stack), "masked,
  no CR" the masked pixels with no cosmic ray within 3 px (each costs the stack an input there);
* time: wall seconds of the finder alone per megapixel, one thread (OMP_NUM_THREADS=1), same run.

Usage: ``python bench/bench_cosmic_rays.py [--cameras democam_mini,minimosaic] [--darks 6]``; writes
``bench/results/cosmic_rays.md``. Not run by the test suite.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import calib_core.simulate.night as simulate  # noqa: E402
from calib_core.builds.bias_dark_flat import BiasConfig, DarkConfig, combine_bias, process_bias  # noqa: E402
from calib_core.camera import effective_config, load_camera, parse_section  # noqa: E402
from calib_core.io.products import read_product, write_product  # noqa: E402
from calib_core.io.raw import read_raw  # noqa: E402
from calib_core.isr.cosmicrays import disk, find_cosmic_rays  # noqa: E402
from calib_core.isr.persistent import clear_persistent_cr  # noqa: E402
from calib_core.isr.process import run_isr  # noqa: E402
from calib_core.maskedimage import MASK_PLANES, MaskedImage  # noqa: E402

EIGHT = np.ones((3, 3), bool)
CR = np.int32(MASK_PLANES.bit("CR"))


def simulate_with_cr_truth(camera: str, out: Path, seed: int, n_dark: int):
    """A night of biases and darks, and {(exposure id, detector id): deposited cosmic-ray e-}."""
    truth, current = {}, {}
    orig_cr, orig_det = simulate._cosmic_rays, simulate._simulate_detector

    def cosmic_rays(rng, det, darktime, electrons):
        before = electrons.copy()
        n = orig_cr(rng, det, darktime, electrons)
        truth[(current["exposure"], det.id)] = (electrons - before).astype(np.float32)
        return n

    def simulate_detector(inst, det, p, *args, **kwargs):
        current["exposure"] = p.exposure_id
        return orig_det(inst, det, p, *args, **kwargs)

    simulate._cosmic_rays, simulate._simulate_detector = cosmic_rays, simulate_detector
    try:
        sim = simulate.simulate_night(camera, out, seed=seed, n_bias=5, n_dark=n_dark, n_flat=0, n_science=0,
                                      filters=("r",))
    finally:
        simulate._cosmic_rays, simulate._simulate_detector = orig_cr, orig_det
    return sim, truth


def amp_map(det, attr: str) -> np.ndarray:
    out = np.zeros((det.ny, det.nx))
    for a in det.amplifiers:
        sec = parse_section(a.detector_section) if isinstance(a.detector_section, str) else a.detector_section
        ys, xs = sec.slices
        out[ys, xs] = getattr(a, attr)
    return out


def full_image_finder(mi, nsigma, min_dn, sharpness=2.0, neighbour_nsigma=3.0, niter=3):
    """calibflow's recipe with full-image scipy median filters (the implementation before the
    sparse kernel, docs/algorithms.md#cosmic-ray-speed), no growth."""
    img = np.asarray(mi.image, np.float64)
    finite = np.isfinite(img)
    img = np.where(finite, img, np.median(img[finite]))
    resid = img - ndimage.median_filter(img, size=5, mode="nearest")
    var = np.asarray(mi.variance, np.float64)
    mad = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    noise = np.where(np.isfinite(var) & (var > 0), np.sqrt(np.abs(var)), max(mad, 1e-12))
    usable = finite & ((mi.mask & MASK_PLANES.bits(["SAT", "BAD", "NO_DATA"])) == 0)
    m3 = ndimage.median_filter(img, size=3, mode="nearest")
    m7 = ndimage.median_filter(m3, size=7, mode="nearest")
    cand = usable & (resid > nsigma * noise) & (resid > min_dn) & ((img - m3) / np.maximum(m3 - m7, noise) > sharpness)
    weak = usable & (resid > neighbour_nsigma * noise)
    for _ in range(niter):
        cand = (ndimage.binary_dilation(cand, structure=EIGHT) & weak) | cand
    return cand


def finders(cfg: DarkConfig):
    import astroscrappy

    ignore = MASK_PLANES.bits(["SAT", "BAD", "NO_DATA"])

    def calibflow(mi, gain, rn):
        return find_cosmic_rays(mi, nsigma=cfg.cr_nsigma, min_dn=cfg.cr_min_dn, grow=0)

    # load (or compile) the numba kernel before anything is timed
    find_cosmic_rays(MaskedImage(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.int32), np.ones((8, 8), np.float32)))

    def scrappy(mi, gain, rn, pad=0, **kw):
        e = np.asarray(mi.image, np.float64) * gain
        var = np.asarray(mi.variance, np.float64) * gain * gain
        bad = (mi.mask & ignore) != 0
        if pad:
            e, var, bad = (np.pad(a, pad, mode="reflect") for a in (e, var, bad))
        m, _ = astroscrappy.detect_cosmics(e.astype(np.float32), inmask=bad, invar=var.astype(np.float32),
                                           gain=1.0, readnoise=float(rn.mean()), satlevel=1e30, **kw)
        return m[pad:-pad, pad:-pad] if pad else m

    return {
        "calibflow find_cosmic_rays (6 sigma, 50 ADU)": calibflow,
        "calibflow recipe, full-image median filters (before)":
            lambda mi, g, rn: full_image_finder(mi, cfg.cr_nsigma, cfg.cr_min_dn),
        "astroscrappy, defaults (sigclip 4.5)": lambda mi, g, rn: scrappy(mi, g, rn),
        "astroscrappy, padded 4 px, sigclip 4.5": lambda mi, g, rn: scrappy(mi, g, rn, pad=4),
        f"astroscrappy, padded 4 px, sigclip {cfg.cr_nsigma:g}":
            lambda mi, g, rn: scrappy(mi, g, rn, pad=4, sigclip=cfg.cr_nsigma),
    }


def run_camera(camera: str, n_dark: int, seed: int, work: Path) -> dict:
    sim, truth = simulate_with_cr_truth(camera, work / camera, seed, n_dark)
    cam = load_camera(sim.truth_dir / "camera.yaml")
    bcfg, dcfg = effective_config(BiasConfig, cam, {}), effective_config(DarkConfig, cam, {})
    fs = finders(dcfg)
    keys = ("n_cr", "found", "whole", "false", "false_hot", "e_tot", "e_left", "masked_no_cr", "npix", "secs")
    stats = {k: dict.fromkeys(keys, 0.0) for k in fs}
    braws = [read_raw(e.path, cam) for e in sim.select("bias")]
    draws = [(e, read_raw(e.path, cam)) for e in sim.select("dark")]
    for det in cam.detectors:
        bias = combine_bias([process_bias(r.detectors[det.id], bcfg) for r in braws], bcfg)
        post = [(e, run_isr(r.detectors[det.id], dcfg.isr, bias=bias)) for e, r in draws]
        gain, rn = amp_map(det, "gain"), amp_map(det, "read_noise")
        hot = sim.truth_dark(det.name) * draws[0][0].darktime * gain > 10 * rn
        for name, find in fs.items():
            s = stats[name]
            grown = []
            for e, mi in post:
                t0 = time.perf_counter()
                m = np.asarray(find(mi, gain, rn), bool)
                s["secs"] += time.perf_counter() - t0
                s["npix"] += m.size
                cr = truth[(e.exposure_id, det.id)]
                lab, n = ndimage.label(cr > 0, structure=EIGHT)
                s["n_cr"] += n
                hit = np.unique(lab[m & (lab > 0)])
                s["found"] += np.count_nonzero(hit)
                missed = np.unique(lab[(lab > 0) & ~m])
                s["whole"] += n - np.count_nonzero(missed)
                groups, ng = ndimage.label(m, structure=EIGHT)
                near = ndimage.binary_dilation(cr > 0, structure=EIGHT)
                real = np.zeros(ng + 1, bool)
                real[np.unique(groups[m & near])] = True
                on_hot = np.zeros(ng + 1, bool)
                on_hot[np.unique(groups[m & hot])] = True
                s["false"] += np.count_nonzero(~real[1:])
                s["false_hot"] += np.count_nonzero(~real[1:] & on_hot[1:])
                grown.append(ndimage.binary_dilation(m, structure=disk(dcfg.cr_grow)) if dcfg.cr_grow else m)
            with tempfile.TemporaryDirectory(prefix="crbench-") as tmp:
                paths = []
                for i, ((e, mi), g) in enumerate(zip(post, grown)):
                    flagged = MaskedImage(mi.image, np.where(g, mi.mask | CR, mi.mask & ~CR).astype(np.int32),
                                          mi.variance)
                    paths.append(write_product(Path(tmp) / f"{i}.fits", flagged, {}))
                clear_persistent_cr(paths)
                masks = [(read_product(p)[0].mask & CR) != 0 for p in paths]
            for (e, _), used in zip(post, masks):
                cr = truth[(e.exposure_id, det.id)]
                s["e_tot"] += float(cr.sum())
                s["e_left"] += float(cr[~used].sum())
                s["masked_no_cr"] += np.count_nonzero(used & ~ndimage.binary_dilation(cr > 0, structure=disk(3)))
    return {"camera": camera, "darks": len(draws), "detectors": len(cam.detectors), "stats": stats}


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        mpix = next(iter(r["stats"].values()))["npix"] / 1e6
        lines += [f"**{r['camera']}**: {r['darks']} darks x {r['detectors']} detectors ({mpix:.1f} Mpix)", "",
                  "| finder | CRs found | whole tracks | false groups (on hot px) | CR e- left after grow + persistent clear "
                  "| masked px with no CR | s / Mpix |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in r["stats"].items():
            lines.append(f"| {name} | {int(s['found'])}/{int(s['n_cr'])} ({s['found'] / s['n_cr']:.1%}) | "
                         f"{s['whole'] / s['n_cr']:.1%} | {int(s['false'])} ({int(s['false_hot'])}) | "
                         f"{s['e_left'] / s['e_tot']:.3%} | {int(s['masked_no_cr'])} | {s['secs'] / mpix:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cameras", default="democam_mini,minimosaic")
    ap.add_argument("--darks", type=int, default=6)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cosmic_rays.md"))
    args = ap.parse_args(argv)
    import astroscrappy

    with tempfile.TemporaryDirectory(prefix="crbench-") as tmp:
        results = [run_camera(c, args.darks, args.seed, Path(tmp)) for c in args.cameras.split(",")]
    md = markdown(results)
    print(md)
    load = os.getloadavg()[0]
    Path(args.out).write_text(f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, seed {args.seed}, "
                              f"astroscrappy {astroscrappy.__version__}, numpy {np.__version__}, one thread, "
                              f"load average {load:.1f} on {os.cpu_count()} cores at the end (times compare "
                              "within a run)\n\n"
                              + md + "\n")


if __name__ == "__main__":
    main()
