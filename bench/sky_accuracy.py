"""Calibration products against the simulator's injected truth, in units of noise floors derived here.

One run per camera geometry: simulate a night (``calib_core.simulate``), ingest it, run
``calibflow nightly`` with its default settings (the real CLI, in a subprocess), then ingest
held-out science exposures that the build never saw and run ``calibflow apply-sky`` on each.
Everything below compares the written products with the truth files; nothing here calls the
pipeline's numerics.

Sky frame
---------
The simulator writes, per filter, the pattern ``P(x)`` (mean 1 over the focal plane): a flat-
fielded science exposure j reads ``rbar * S_j * G_j(u, v) * P(x)`` plus objects and noise. A sky
frame ``F`` (32-px bins) is defined only up to what each exposure's own large-scale background
takes: the frame is a ratio to that background, so ``1 + F`` is known up to division by a smooth
focal-plane surface. The comparison therefore allows exactly one scale ``a`` and one quadratic
surface ``T(u, v)`` over the whole focal plane, and fits (linear least squares, weights 1/floor)

    (1 + F_b) * T(u_b, v_b) = 1 + a * (P_b - 1)

where ``P_b`` is the truth averaged over bin b. The accuracy is the RMS over bins of the
residual divided by ``T * floor_b``: 1.0 means the frame is as good as its noise allows.

The noise floor of bin b (fraction of the sky), from the truth:

* per pixel of used exposure j, the relative variance of the flat-fielded sky
  ``v_j(x) = (E_j + D t_j + rn^2) / E_j^2`` with ``E_j = Q(x) S_j G_j P`` detected electrons,
  ``Q = R_f * g * rbar`` (truth flat, amplifier gain, REFRESP), ``D`` the truth dark current;
* the bin holds ``n_b = NPOINT_b / N`` unmasked pixels per exposure (NPOINT of the product is
  summed over its N inputs), and its per-pixel MEANCLIP (3 sigma, 3 passes) has variance
  ``1/eta_pix`` times that of a plain mean (``eta`` by Monte Carlo below, with astropy's
  sigma_clip as the independent clipper);
* the frame is a MEANCLIP over N exposures: ``var_b = c_N * sum_j <v_j>_b / n_b / N^2``, ``c_N``
  the Monte-Carlo variance ratio of a 3-sigma clipped to a plain mean of N Gaussian values;
* the master flat's noise is the same in every input and does not average down:
  ``<1 / (sum_k L_k Q)>_b / n_b`` (lamp levels ``L_k`` of its flats).

``floor_b = sqrt(var_b + flat_b)``. Bias and dark masters contribute < 1 % of it and are left out.

Held-out exposures
------------------
For each exposure the build did not use: ``before`` is the structure the pattern puts in it, the
RMS over 32-px blocks of ``P - 1`` less its best quadratic focal-plane surface (no noise:
truth); ``after`` is the structure left in the ``apply-sky`` output: per 32 x 32 block the mean
of the unmasked pixels over the local sky ``rbar S_j G_j``, RMS over blocks less their measured
noise (pixel spread / sqrt(n)) in quadrature. The reduction is before / after. The fitted scale
(SKYSCALE) is compared with the true one, ``1 / a`` (the frame carries the pattern at ``a``).

Bias, dark, flat
----------------
Per pixel against truth, RMS of the difference over the floor: bias ``sqrt((rn/g)^2 + 1/12) /
sqrt(N)`` (1/12 ADU^2 the digitisation of whole ADU; with the row term of a per-row overscan,
``1.2533 rn/g / sqrt(n_os)`` per input); dark
``sqrt(c_N (D t/g + (rn/g)^2 + 1/12 + row) / N + var(bias)) / t`` ADU/s, where ``var(bias)`` is the
master bias's own floor squared: the one master bias is subtracted from every dark, so its error
is the same in all N inputs, passes through their clipped mean unchanged and does not average
down (measured against truth: ``t * (dark - D)`` regressed on ``bias - B`` has slope -1.00); flat
(after one scale) ``R * sqrt(1 / sum_k L_k Q)``; each times ``sqrt(c_N)``, the MEANCLIP of N inputs
(1.17 for N = 4 and 5, 2e5 Monte-Carlo trials: with so few values the IQR-based first pass clips
good ones; the pipeline's MEANCLIP agrees with ``meanclip_rows`` to float32 rounding).

Run: ``python bench/sky_accuracy.py [--cameras democam_mini,minimosaic,democam]``; writes
``bench/results/sky_accuracy.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib_core.background import BackgroundModel  # noqa: E402  (product reader only)
from calib_core.camera import load_camera  # noqa: E402
from calib_core.simulate import SimulatedNight, simulate_night  # noqa: E402

NIGHT = "2026-11-20"

# per geometry: how big a night (science exposures per filter built, held out)
GEOMETRIES = {
    "democam_mini": {"n_build": 12, "n_held": 4, "filters": ("r", "z")},
    "minimosaic": {"n_build": 12, "n_held": 4, "filters": ("r",)},
    "democam": {"n_build": 10, "n_held": 3, "filters": ("r",)},
}


# --------------------------------------------------------------------------------------------------
# Monte-Carlo efficiencies of the clipped means (independent clipper: astropy)
# --------------------------------------------------------------------------------------------------


def meanclip_rows(x: np.ndarray, nsigma: float = 3.0, niter: int = 3) -> np.ndarray:
    """The reference's MEANCLIP of each row of ``x``, written here from its definition (each pass
    starts from all values; pass 0 centre = median and half-width = nsigma x 0.7413 x IQR, later
    passes the previous clipped mean and nsigma x its ddof=1 standard deviation; the result is the
    mean of the last pass). Independent of calib_core's kernels."""
    x = np.asarray(x, np.float64)
    q1, med, q3 = np.percentile(x, [25, 50, 75], axis=1)
    centre, width = med, nsigma * 0.741301109252802 * (q3 - q1)
    mean = med
    for _ in range(niter):
        keep = np.abs(x - centre[:, None]) <= width[:, None]
        n = keep.sum(axis=1)
        mean = np.where(keep, x, 0).sum(axis=1) / np.maximum(n, 1)
        var = np.where(keep, (x - mean[:, None]) ** 2, 0).sum(axis=1) / np.maximum(n - 1, 1)
        centre, width = mean, nsigma * np.sqrt(var)
    return mean


def clip_variance_ratio(n: int, trials: int = 4000, seed: int = 1, sigmas=None) -> float:
    """Variance of the reference MEANCLIP (3 sigma, 3 passes) of ``n`` Gaussian values over that of
    their plain mean (values of standard deviations ``sigmas``, default all 1), by Monte Carlo."""
    rng = np.random.default_rng(seed)
    s = np.ones(n) if sigmas is None else np.asarray(sigmas, float)
    x = rng.standard_normal((trials, n)) * s
    return float(np.var(meanclip_rows(x)) / np.var(x.mean(axis=1)))


# --------------------------------------------------------------------------------------------------
# Running the pipeline (the real CLI)
# --------------------------------------------------------------------------------------------------


def _cli(args: list[str], env: dict, log) -> str:
    exe = Path(sys.executable).with_name("calibflow")
    cmd = [str(exe) if exe.exists() else "calibflow", *args]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log(f"$ calibflow {' '.join(args)}  ({time.time() - t0:.0f} s, exit {p.returncode})")
    if p.returncode != 0:
        raise RuntimeError(f"calibflow {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


@dataclass
class NightRun:
    camera: str
    sim: SimulatedNight
    repo: Path
    held: dict = field(default_factory=dict)         # filter -> [exposure ids]
    bad: dict = field(default_factory=dict)          # exposure id -> defect kind
    outputs: dict = field(default_factory=dict)      # exposure id -> {detector id: path}
    applied: dict = field(default_factory=dict)      # exposure id -> apply-sky JSON
    seconds: dict = field(default_factory=dict)


def _sim_kwargs(extra: dict) -> dict:
    """Keyword arguments the installed simulator accepts (bad exposures and gradient amplitude are
    passed when it has them)."""
    import inspect

    params = inspect.signature(simulate_night).parameters
    return {k: v for k, v in extra.items() if k in params}


def run_night(camera: str, workdir: Path, seed: int = 11, n_build: int = 12, n_held: int = 4,
              filters=("r", "z"), bad=("cloud", "trail", "glow"), gradient_amplitude: float = 0.10,
              api_url: str | None = None, log=print) -> NightRun:
    """Simulate, ingest, ``calibflow nightly`` (defaults), then ingest and ``apply-sky`` the held-out
    exposures. ``api_url``: a Prefect API for the CLI (else each command starts an embedded one)."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    t0 = time.time()
    sim = simulate_night(camera, workdir / "sim", seed=seed, night=NIGHT, n_bias=5, n_dark=4, n_flat=4,
                         n_science=n_build + n_held, filters=filters,
                         **_sim_kwargs({"bad_exposures": tuple(bad), "gradient_amplitude": gradient_amplitude}))
    run = NightRun(camera, sim, workdir / "repo")
    run.seconds["simulate"] = time.time() - t0
    truth = {e["exposure_id"]: e for e in json.loads((sim.truth_dir / "exposures.json").read_text())}
    run.bad = {e: t["defect"] for e, t in truth.items() if t.get("defect")}
    build_files, held_files = [], []
    for f in filters:
        sci = [e for e in sim.select("science", f)]
        good = [e for e in sci if e.exposure_id not in run.bad]
        held = good[-n_held:] if n_held else []
        run.held[f] = [e.exposure_id for e in held]
        held_files += [e.path for e in held]
    held_set = {str(p) for p in held_files}
    build_files = [e.path for e in sim.exposures if str(e.path) not in held_set]
    repo = ["--repo", str(run.repo)]
    _cli(["init", *repo], env, log)
    _cli(["ingest", *map(str, build_files), "--camera", camera, *repo], env, log)
    t0 = time.time()
    _cli(["nightly", "--night", NIGHT, "--camera", camera, *repo], env, log)
    run.seconds["nightly"] = time.time() - t0
    _cli(["ingest", *map(str, held_files), "--camera", camera, *repo], env, log)
    t0 = time.time()
    for f, ids in run.held.items():
        for e in ids:
            out = workdir / "skysub" / e
            js = _cli(["apply-sky", e, "--out", str(out), "--json", "--camera", camera, *repo], env, log)
            run.applied[e] = json.loads(js[js.index("{"):])
            run.outputs[e] = {int(p.name.split("-det")[1][:3]): p for p in sorted(out.glob("*-skysub.fits"))}
    run.seconds["apply"] = time.time() - t0
    return run


# --------------------------------------------------------------------------------------------------
# Truth helpers
# --------------------------------------------------------------------------------------------------


def _amp_map(camera, det, attr: str) -> np.ndarray:
    """An amplifier property (gain, read_noise) on the assembled detector's pixels."""
    from calib_core.camera import parse_section

    out = np.zeros((det.ny, det.nx), np.float64)
    for amp in det.amplifiers:
        sec = parse_section(amp.detector_section) if isinstance(amp.detector_section, str) else amp.detector_section
        ys, xs = sec.slices
        out[ys, xs] = getattr(amp, attr)
    return out


def _bin_means(img: np.ndarray, xe, ye) -> np.ndarray:
    """Means of the finite pixels of ``img`` over the bins with edges xe, ye (plain numpy)."""
    img = np.asarray(img, np.float64)
    ok = np.isfinite(img)
    xe, ye = np.asarray(xe), np.asarray(ye)

    def box_sums(a):
        cs = np.cumsum(np.cumsum(np.pad(a, ((1, 0), (1, 0))), axis=0), axis=1)
        return (cs[ye[1:, None], xe[None, 1:]] - cs[ye[:-1, None], xe[None, 1:]] - cs[ye[1:, None], xe[None, :-1]]
                + cs[ye[:-1, None], xe[None, :-1]])

    with np.errstate(invalid="ignore", divide="ignore"):
        return box_sums(np.where(ok, img, 0.0)) / box_sums(ok.astype(np.float64))


def _quad_terms(u, v, scale):
    a, b = u / scale, v / scale
    return np.stack([np.ones_like(a), a, b, a * a, a * b, b * b], axis=-1)


def _fp_bins(camera, det, xe, ye):
    xc = (np.asarray(xe[:-1]) + np.asarray(xe[1:])) / 2 - 0.5
    yc = (np.asarray(ye[:-1]) + np.asarray(ye[1:])) / 2 - 0.5
    gx, gy = np.meshgrid(xc, yc)
    u, v = camera.pixel_to_focal_plane(det, gx, gy)
    return np.asarray(u, float), np.asarray(v, float)


def _registry(run: NightRun):
    from calib_core.datastore import Datastore
    from calib_core.registry import Registry

    return Registry.open(Datastore(run.repo).default_registry_url)


def products(run: NightRun, calib_type: str, filt: str | None = None) -> dict[int, dict]:
    """Registered products of a type (and filter): {detector: registry row}."""
    from calib_core.registry.calibs import list_calibs

    rows = list_calibs(_registry(run), calib_type=calib_type, camera=run.camera, filter=filt)
    return {r["detector"]: r for r in rows}


def used_and_rejected(run: NightRun, calib_id: str) -> tuple[list[str], dict[str, str]]:
    from calib_core.registry.calibs import calib_inputs

    rows = calib_inputs(_registry(run), calib_id)
    return ([r["exposure_id"] for r in rows if r["used"]],
            {r["exposure_id"]: r["reason"] for r in rows if not r["used"]})


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def sky_frame_accuracy(run: NightRun, filt: str) -> dict:
    """The sky frame of ``filt`` against the injected pattern, in units of its noise floor."""
    sim, cam = run.sim, load_camera(run.sim.truth_dir / "camera.yaml")
    prods = products(run, "sky", filt)
    used, rejected = used_and_rejected(run, next(iter(prods.values()))["calib_id"])
    n = len(used)
    rbar = sim.flat_reference(filt)
    flats = [e.exposure_id for e in sim.select("flat", filt)]
    lamp = sum(sim.exposure_truth(e)["lamp_level"] for e in flats)
    rows = []
    per_exp_v = {e: [] for e in used}
    for d, row in sorted(prods.items()):
        det = cam.detector(d)
        frame = BackgroundModel.from_fits(row["path"])
        xe, ye = frame.x_edges, frame.y_edges
        P = sim.truth_sky(filt, det.name).astype(np.float64)
        Q = sim.truth_flat(filt, det.name) * _amp_map(cam, det, "gain") * rbar
        rn2 = _amp_map(cam, det, "read_noise") ** 2
        dark = sim.truth_dark(det.name) * _amp_map(cam, det, "gain")          # e-/s
        vsum = np.zeros(frame.values.shape)
        for e in used:
            t = sim.exposure_truth(e)
            E = Q * t["sky_level"] * sim.gradient(e, det.name) * P
            with np.errstate(invalid="ignore", divide="ignore"):      # dead pixels (Q = 0): no data
                v = np.where(Q > 0.05 * np.median(Q), (E + dark * t["darktime"] + rn2) / E ** 2, np.nan)
            vb = _bin_means(v, xe, ye)
            vsum += vb
            per_exp_v[e].append(float(np.median(vb)))
        with np.errstate(invalid="ignore", divide="ignore"):
            vflat = _bin_means(np.where(Q > 0.05 * np.median(Q), 1.0 / (lamp * Q), np.nan), xe, ye)
        u, vv = _fp_bins(cam, det, xe, ye)
        rows.append((frame.values.astype(float), frame.npoint.astype(float), vsum, vflat,
                     _bin_means(P, xe, ye) - 1.0, u, vv))
    F, NP, VS, VF, p, U, V = (np.concatenate([r[k].ravel() for r in rows]) for k in range(7))
    nbar = NP / n
    eta_pix = clip_variance_ratio(int(np.median(nbar)), trials=2000)
    c_n = clip_variance_ratio(n, sigmas=np.sqrt([np.median(per_exp_v[e]) for e in used]))
    floor = np.sqrt(c_n * eta_pix * VS / nbar / n ** 2 + VF / nbar)
    ok = np.isfinite(F) & np.isfinite(floor) & (nbar > 0)
    ratio, a, resid = frame_vs_truth(F[ok], p[ok], U[ok], V[ok], floor[ok])
    hi = p[ok] > np.percentile(p[ok], 95)
    return {"filter": filt, "ratio": ratio, "a": a, "n_bins": int(ok.sum()),
            "floor_median": float(np.median(floor[ok])), "peaks_mean_sigma": float(np.mean(resid[hi])),
            "used": used, "rejected": rejected, "eta_pix": eta_pix, "c_n": c_n}


def frame_vs_truth(F, p, u, v, floor):
    """Fit ``(1 + F) T(u, v) = 1 + a p`` (T quadratic over the focal plane, a one scale) by weighted
    linear least squares; returns (RMS of the residual in units of ``T * floor``, a, residuals).

    F: frame bin values; p = P_b - 1, the truth pattern's deviation averaged over each bin; u, v:
    focal-plane mm of the bin centres; floor: the noise floor of each bin (fraction of the sky)."""
    F, p, u, v, floor = (np.asarray(x, np.float64) for x in (F, p, u, v, floor))
    T = _quad_terms(u - u.mean(), v - v.mean(), max(np.ptp(u), np.ptp(v)) / 2)
    A = np.concatenate([T * (1 + F)[:, None], -p[:, None]], axis=1)
    sol, *_ = np.linalg.lstsq(A / floor[:, None], 1.0 / floor, rcond=None)
    Tv = T @ sol[:-1]
    resid = ((1 + F) * Tv - 1 - sol[-1] * p) / (Tv * floor)
    return float(np.sqrt(np.mean(resid ** 2))), float(sol[-1] / sol[0]), resid


def _blocks(img, mask, b=32):
    ny, nx = (img.shape[0] // b) * b, (img.shape[1] // b) * b
    im = img[:ny, :nx].reshape(ny // b, b, nx // b, b).astype(np.float64)
    good = (mask[:ny, :nx] == 0).reshape(ny // b, b, nx // b, b) & np.isfinite(im)
    n = good.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(good, im, 0).sum(axis=(1, 3)) / n
        var = np.where(good, (im - mean[:, None, :, None]) ** 2, 0).sum(axis=(1, 3)) / (n - 1)
    return mean, np.sqrt(var / n), n


def held_out(run: NightRun, filt: str, a: float) -> list[dict]:
    """Structure above noise before / after apply-sky on the held-out exposures of ``filt``."""
    sim, cam = run.sim, load_camera(run.sim.truth_dir / "camera.yaml")
    rbar = sim.flat_reference(filt)
    # before: the pattern's structure beyond a quadratic surface (truth, no noise)
    pu, pv, pp = [], [], []
    for det in cam.detectors:
        P = sim.truth_sky(filt, det.name).astype(np.float64)
        b = 32
        ny, nx = (det.ny // b) * b, (det.nx // b) * b
        xe, ye = np.arange(0, nx + 1, b), np.arange(0, ny + 1, b)
        u, v = _fp_bins(cam, det, xe, ye)
        pu.append(u.ravel())
        pv.append(v.ravel())
        pp.append(_bin_means(P, xe, ye).ravel())
    U, V, PP = map(np.concatenate, (pu, pv, pp))
    T = _quad_terms(U - U.mean(), V - V.mean(), max(np.ptp(U), np.ptp(V)) / 2)
    coef, *_ = np.linalg.lstsq(T, PP, rcond=None)
    before = float(np.sqrt(np.mean((PP / (T @ coef) - 1) ** 2)))
    out = []
    for e in run.held[filt]:
        t = sim.exposure_truth(e)
        vals, errs = [], []
        for d, path in run.outputs[e].items():
            det = cam.detector(d)
            with fits.open(path) as h:
                img, mask = h["IMAGE"].data, h["MASK"].data
            sky = rbar * t["sky_level"] * sim.gradient(e, det.name).astype(np.float64)
            m, s, n = _blocks(img, mask)
            lvl, _, _ = _blocks(sky, np.zeros(sky.shape, np.int32))
            ok = n >= 100
            vals.append((m / lvl)[ok])
            errs.append((s / lvl)[ok])
        v, s = np.concatenate(vals), np.concatenate(errs)
        after = math.sqrt(max(float(np.mean(v ** 2) - np.mean(s ** 2)), 0.0))
        scale = run.applied[e]["scale"]
        out.append({"exposure": e, "before": before, "after": after,
                    "reduction": before / after if after > 0 else math.inf,
                    "scale": scale, "scale_vs_truth": scale * a})
    return out


def master_accuracy(run: NightRun) -> dict:
    """Bias, dark and flat products against truth, RMS over pixels in units of the floor."""
    sim, cam = run.sim, load_camera(run.sim.truth_dir / "camera.yaml")
    from calib_core.products import read_product

    res = {}
    nb = len(sim.select("bias"))
    nd = len(sim.select("dark"))
    per_row = _overscan_per_row(run)
    # 2e5 trials: with 2e4 the Monte-Carlo error of c_N is ~2 % (c_5 came out 1.198, converged 1.174)
    trials = 200000
    c_b, c_d = clip_variance_ratio(nb, trials=trials), clip_variance_ratio(nd, trials=trials)
    acc = {"bias": [], "dark": []}
    for d, row in products(run, "bias").items():
        det = cam.detector(d)
        img = read_product(row["path"])[0].image.astype(np.float64)
        g, rn = _amp_map(cam, det, "gain"), _amp_map(cam, det, "read_noise")
        rn_adu = rn / g
        nos = _overscan_columns(det)
        floor = np.sqrt(c_b * var1_bias(rn_adu, nb, nos, per_row))
        acc["bias"].append(((img - sim.truth_bias(det.name)) / floor).ravel())
    for d, row in products(run, "dark").items():
        det = cam.detector(d)
        mi = read_product(row["path"])[0]
        g, rn = _amp_map(cam, det, "gain"), _amp_map(cam, det, "read_noise")
        rn_adu = rn / g
        t = sim.select("dark")[0].darktime
        D = sim.truth_dark(det.name).astype(np.float64)      # ADU/s
        nos = _overscan_columns(det)
        var1 = D * t / g + rn_adu ** 2 + DIGITISATION_VAR + ((1.2533 * rn_adu) ** 2 / nos if per_row else 0.0)
        # the master bias's error is common to every dark: it neither averages down with nd nor is
        # clipped, so it adds its own floor squared (c_b var1_bias / nb), not c_d var1_bias / nd
        floor = np.sqrt(c_d * var1 / nd + c_b * var1_bias(rn_adu, nb, nos, per_row)) / t
        good = (mi.mask == 0)
        acc["dark"].append(((mi.image - D) / floor)[good].ravel())
    for k, arrs in acc.items():
        if arrs:
            r = np.concatenate(arrs)
            res[k] = {"ratio": float(np.sqrt(np.mean(r ** 2))), "mean_sigma": float(np.mean(r))}
    for f in sim.filters:
        prods = products(run, "flat", f)
        if not prods:
            continue
        rbar = sim.flat_reference(f)
        lamp = sum(sim.exposure_truth(e.exposure_id)["lamp_level"] for e in sim.select("flat", f))
        imgs, truths, floors = [], [], []
        for d, row in prods.items():
            det = cam.detector(d)
            mi = read_product(row["path"])[0]
            R = sim.truth_flat(f, det.name).astype(np.float64)
            Q = R * _amp_map(cam, det, "gain") * rbar
            good = (mi.mask == 0) & (R > 0.5)
            imgs.append(mi.image[good])
            truths.append(R[good])
            floors.append((R * np.sqrt(1.0 / (lamp * Q)))[good])
        I, R, Fl = (np.concatenate(x) for x in (imgs, truths, floors))
        Fl = Fl * math.sqrt(clip_variance_ratio(len(sim.select("flat", f)), trials=trials))
        s = np.sum(I * R / Fl ** 2) / np.sum(R * R / Fl ** 2)
        r = (I / s - R) / Fl
        res[f"flat_{f}"] = {"ratio": float(np.sqrt(np.mean(r ** 2))), "scale": float(s)}
    return res


#: ADU**2: the simulator rounds raw pixels to whole ADU, a uniform error of variance 1/12 per pixel
#: (the read noise is 2.0..3.5 ADU on the simulated cameras, so the error is independent of the value)
DIGITISATION_VAR = 1.0 / 12.0


def var1_bias(rn_adu, nb, nos, per_row):
    """Variance of a master-bias pixel over its clip factor c_N: per input, read noise, digitisation
    and the per-row overscan term (median of n_os rounded values: 1.2533 rn/g / sqrt(n_os))."""
    return (rn_adu ** 2 + DIGITISATION_VAR + ((1.2533 * rn_adu) ** 2 / nos if per_row else 0.0)) / nb


def _overscan_columns(det) -> int:
    from calib_core.camera import parse_section

    a = det.amplifiers[0]
    sec = parse_section(a.overscan_section) if isinstance(a.overscan_section, str) else a.overscan_section
    return int(sec.nx)


def _overscan_per_row(run: NightRun) -> bool:
    """Whether the bias build used a per-row overscan: the camera's ISR defaults over the type's (the
    benchmark runs the defaults)."""
    from calib_core.calibs import BiasConfig
    from calib_core.camera import effective_config

    cam = load_camera(run.sim.truth_dir / "camera.yaml")
    return effective_config(BiasConfig, cam, {}).isr.overscanFitType.endswith("PER_ROW")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def evaluate(run: NightRun) -> dict:
    out = {"camera": run.camera, "seconds": run.seconds, "sky": {}, "held_out": {}, "bad": run.bad}
    for f in run.held:
        acc = sky_frame_accuracy(run, f)
        out["sky"][f] = acc
        out["held_out"][f] = held_out(run, f, acc["a"])
        acc["bad_rejected"] = sorted(e for e in run.bad if e in acc["rejected"] and run.sim.exposure_truth(e)["filter"] == f)
        acc["bad_missed"] = sorted(e for e in run.bad if e not in acc["rejected"] and run.sim.exposure_truth(e)["filter"] == f)
        acc["good_rejected"] = sorted(e for e in acc["rejected"] if e not in run.bad)
    out["masters"] = master_accuracy(run)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| camera | filter | sky frame / floor | held-out reduction (min, median) | scale / truth (range) "
             "| bad rejected | good rejected | bias / floor | dark / floor | flat / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["masters"]
        for f, acc in r["sky"].items():
            ho = r["held_out"][f]
            red = [h["reduction"] for h in ho]
            sc = [h["scale_vs_truth"] for h in ho]
            nbad = len(acc["bad_rejected"]) + len(acc["bad_missed"])
            lines.append(
                f"| {r['camera']} | {f} | {acc['ratio']:.2f} | {min(red):.1f}, {np.median(red):.1f} | "
                f"{min(sc):.3f}-{max(sc):.3f} | {len(acc['bad_rejected'])}/{nbad} | {len(acc['good_rejected'])} | "
                f"{m.get('bias', {}).get('ratio', float('nan')):.2f} | {m.get('dark', {}).get('ratio', float('nan')):.2f} | "
                f"{m.get(f'flat_{f}', {}).get('ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cameras", default="democam_mini,minimosaic,democam")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "sky_accuracy"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sky_accuracy"))
    ap.add_argument("--keep", action="store_true", help="keep each night's folder (and its run record)")
    ap.add_argument("--reuse", action="store_true", help="evaluate the nights kept by an earlier --keep run")
    args = ap.parse_args(argv)
    from prefect.testing.utilities import prefect_test_harness
    from prefect.client.orchestration import get_client

    results = []
    with prefect_test_harness(server_startup_timeout=180):
        with get_client(sync_client=True) as client:
            url = str(client.api_url).rstrip("/")
        for cam in args.cameras.split(","):
            if cam not in GEOMETRIES:
                sys.exit(f"unknown geometry {cam}; choose from {', '.join(GEOMETRIES)}")
            g = GEOMETRIES[cam]
            print(f"== {cam}", flush=True)
            record = Path(args.work) / f"{cam}.pkl"
            if args.reuse:
                run = pickle.loads(record.read_bytes())
            else:
                run = run_night(cam, Path(args.work) / cam, seed=args.seed, n_build=g["n_build"],
                                n_held=g["n_held"], filters=g["filters"], api_url=url,
                                log=lambda s: print(s[:200], flush=True))
                record.write_bytes(pickle.dumps(run))
            res = evaluate(run)
            results.append(res)
            print(json.dumps({k: res[k] for k in ("sky", "masters", "held_out")}, indent=1, default=str)[:6000],
                  flush=True)
            if not args.keep:
                shutil.rmtree(Path(args.work) / cam, ignore_errors=True)
    md = markdown(results)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, seed {args.seed}\n\n"
                                      + md + "\n")


if __name__ == "__main__":
    main()
