"""Calibration products against the simulator's injected truth, in units of noise floors derived here.

One run per camera geometry: simulate a night (``calib_core.simulate.night``), ingest it, run
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

Fringing filters: that floor assumes the fringes are known. They are not: the exposures were
defringed with the night's own fringe frame, and on the sky frame's bins the fringes and the sky
pattern can only be told apart by how the fringe amplitude ``phi_j`` varies from exposure to
exposure. For a bin, exposure j reads ``P_b + phi_j F_b`` plus noise (per unit sky); the best
unbiased estimate of ``P_b`` from N such values with ``F_b`` unknown is the intercept of a straight
line in ``phi``, whose variance is that of the plain mean times ``1 + mean(phi)^2 / var(phi)``
(``var`` over the exposures). ``separation_factor = sqrt(1 + mean(phi)^2 / var(phi))`` over the
fringe frame's inputs (truth ``fringe_scale``) is therefore what a frame built without a model of the
fringes' shape cannot beat; ``ratio_vs_separation`` = ratio / separation_factor.

Held-out exposures
------------------
For each exposure the build did not use: ``before`` is the structure the pattern puts in it, the
RMS over 32-px blocks of ``P - 1`` less its best quadratic focal-plane surface (no noise:
truth); ``after`` is the structure left in the ``apply-sky`` output: per 32 x 32 block the mean
of the unmasked pixels over the local sky ``rbar S_j G_j``, RMS over blocks less their measured
noise (pixel spread / sqrt(n)) in quadrature. The reduction is before / after. The fitted scale
(SKYSCALE) is compared with the true one, ``1 / a`` (the frame carries the pattern at ``a``).

Fringe frame
------------
The simulator adds fringes ``S_j phi_j F`` (``F`` per unit sky, mean 0 per detector) to the continuum
``S_j C_j`` (``C_j = G_j P M_j + A_j``; see ``calib_core.simulate.night``). ``calib_core.builds.fringe`` prepares each
input by subtracting a binned background and dividing by the input's level ``S_j lvl_j`` (``lvl_j`` =
mean of ``C_j`` over the detector), then stacks the inputs unweighted (MEANCLIP) and takes the continuum's
pattern out of the stack (``remove_continuum``; the comparison needs nothing from it). The frame of detector d
is therefore, by definition, ``c_d F`` with ``c_d = mean_j phi_j / lvl_j`` (truth), up to what the
preparation subtracts by design. The comparison allows exactly that: one scale ``a`` over the focal
plane and, per detector, any function in the span of the preparation's background (its Chebyshev
polynomial, orders reduced to bins - 1 per axis as afw does: 1 x 3 on a 256 x 512 detector; a spline
through the bin centres without ``use_approx``), fitted by weighted least squares; ratio = RMS over the
admitted pixels of ``(frame - a c_d F - T_d) / floor``. Nothing else is free: the continuum's structure
below the background's scale (the sky pattern's waves, ghost ring, edge glow, ripples; the bad
exposures' defects) counts as error. ``continuum_leak_sigma`` is how much of it the preparation leaves
(truth, in floor units), ``continuum_leak_coefficient`` how much of that is in the frame (1 = all of
it), ``ratio_less_leak`` the ratio once it is taken out.

The floor of pixel x, as a fraction of the sky, from the truth:

* per used input j, ``v_j = (E_j + D t_j + rn^2 + s_os^2) / (Q S_j lvl_j)^2`` with ``E_j = Q S_j (C_j +
  phi_j F)`` detected electrons, ``Q = R_f g rbar``, ``D`` the truth dark current, ``s_os^2 = (1.2533
  rn)^2 / n_os`` the noise of a per-row overscan (0 with a scalar one);
* the stack of the ``n(x)`` inputs the combine admitted there (their masks, read from the build's
  intermediates in the repository; all N if they are gone): ``c_n sum_j v_j / n^2``, ``c_n`` the
  MEANCLIP's variance over a plain mean's for n values with the inputs' noise levels (Monte Carlo);
* the master flat's noise multiplies every input's continuum alike and does not average down:
  ``c_Nflat <C_j / lvl_j>_j^2 / sum_k L_k Q``;
* the master bias and dark errors, also common to all inputs: ``k_b^2 var(bias) + k_d^2 var(dark t_dk)``
  with ``k_b = <(1 - t_j/t_dk) / (rbar R S_j lvl_j)>_j`` (the dark was built with the same bias
  subtracted) and ``k_d = <(t_j/t_dk) / (rbar R S_j lvl_j)>_j``, the variances as in the masters below.

``floor = sqrt(sum of these)``. Left out: the photon noise of unmasked object wings and the noise of
each input's level (one number from ~10^5 pixels).

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

from calib_core.camera import load_camera  # noqa: E402
from calib_core.simulate.night import SimulatedNight, simulate_night  # noqa: E402
from calib_core.stats.background import BackgroundModel  # noqa: E402  (product reader only)

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
    # the fringe frame's accuracy reads the inputs' masks from the build's intermediates: keep them
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", CALIBFLOW_INTERMEDIATES="keep")
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
    from calib_core.repository import Datastore, Registry

    return Registry.open(Datastore(run.repo).default_registry_url)


def products(run: NightRun, calib_type: str, filt: str | None = None) -> dict[int, dict]:
    """Registered products of a type (and filter): {detector: registry row}."""
    from calib_core.repository import list_calibs

    rows = list_calibs(_registry(run), calib_type=calib_type, camera=run.camera, filter=filt)
    return {r.detector: r for r in rows}


def used_and_rejected(run: NightRun, calib_id: str) -> tuple[list[str], dict[str, str]]:
    from calib_core.repository import calib_inputs

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
    used, rejected = used_and_rejected(run, next(iter(prods.values())).calib_id)
    n = len(used)
    rbar = sim.flat_reference(filt)
    flats = [e.exposure_id for e in sim.select("flat", filt)]
    lamp = sum(sim.exposure_truth(e)["lamp_level"] for e in flats)
    rows = []
    per_exp_v = {e: [] for e in used}
    for d, row in sorted(prods.items()):
        det = cam.detector(d)
        frame = BackgroundModel.from_fits(row.path)
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
    out = {"filter": filt, "ratio": ratio, "a": a, "n_bins": int(ok.sum()),
           "floor_median": float(np.median(floor[ok])), "peaks_mean_sigma": float(np.mean(resid[hi])),
           "used": used, "rejected": rejected, "eta_pix": eta_pix, "c_n": c_n}
    fringe = products(run, "fringe", filt)
    if fringe:          # see the module docstring: the separation of fringes from the pattern
        inputs = used_and_rejected(run, next(iter(fringe.values())).calib_id)[0]
        phi = np.array([sim.exposure_truth(e)["fringe_scale"] for e in inputs])
        out["separation_factor"] = float(np.sqrt(1 + phi.mean() ** 2 / phi.var()))
        out["ratio_vs_separation"] = ratio / out["separation_factor"]
    return out


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
    from calib_core.io.products import read_product

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
        img = read_product(row.path)[0].image.astype(np.float64)
        g, rn = _amp_map(cam, det, "gain"), _amp_map(cam, det, "read_noise")
        rn_adu = rn / g
        nos = _overscan_columns(det)
        floor = np.sqrt(c_b * var1_bias(rn_adu, nb, nos, per_row))
        acc["bias"].append(((img - sim.truth_bias(det.name)) / floor).ravel())
    for d, row in products(run, "dark").items():
        det = cam.detector(d)
        mi = read_product(row.path)[0]
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
            mi = read_product(row.path)[0]
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
    from calib_core.builds.bias_dark_flat import BiasConfig
    from calib_core.camera import effective_config

    cam = load_camera(run.sim.truth_dir / "camera.yaml")
    return effective_config(BiasConfig, cam, {}).isr.overscan_fit_type.endswith("PER_ROW")


# --------------------------------------------------------------------------------------------------
# Fringe frame
# --------------------------------------------------------------------------------------------------


def _smooth_basis(cfg, ny: int, nx: int):
    """The span of what the fringe preparation subtracts from each input by design: its binned
    background (``cfg`` = the ``BackgroundConfig`` of ``FringeConfig.subtract_background``), as
    separable pairs ``(bx, by)`` of 1-D functions (full term = ``outer(by, bx)``).

    With ``use_approx`` (the default) the background is a 2-D Chebyshev polynomial fitted to the
    bins, its orders reduced to (bins - 1) per axis and its terms ``i + j <= max(order_x, order_y)``
    (afw ``ApproximateChebyshev``); otherwise it is an interpolant through the bin centres, whose
    span a tensor product of cubic-spline interpolants through the same centres stands in for
    (one function per bin). Written here from the definition, not calling the pipeline."""
    from numpy.polynomial import chebyshev as C
    from scipy.interpolate import CubicSpline

    def nbins(size, b):
        return max(-(-size // b), 1) if cfg.grid == "ceil" else (
            max(int(size / b + 0.5), 1) if cfg.grid == "round" else size // b + 1)

    bx, by = cfg.bin_size, cfg.bin_size_y or cfg.bin_size
    nbx, nby = min(nbins(nx, bx), nx), min(nbins(ny, by), ny)
    if cfg.use_approx:
        ox = min(cfg.approx_order_x, nbx - 1)
        oy = min(cfg.approx_order_x if cfg.approx_order_y < 0 else cfg.approx_order_y, nby - 1)
        tx = C.chebvander(np.linspace(-1, 1, nx), ox).T
        ty = C.chebvander(np.linspace(-1, 1, ny), oy).T
        return [(tx[i], ty[j]) for j in range(oy + 1) for i in range(ox + 1) if i + j <= max(ox, oy)]

    def interp_basis(size, nb):
        i = np.arange(1, nb + 1)
        edges = np.concatenate([[0], np.minimum((i * size + nb // 2) // nb, size)])
        centres = edges[:-1] + np.diff(edges) / 2 - 0.5
        t = np.arange(size, dtype=np.float64)
        if nb == 1:
            return np.ones((1, size))
        if nb == 2:
            h = centres[1] - centres[0]
            return np.stack([(centres[1] - t) / h, (t - centres[0]) / h])
        return CubicSpline(centres, np.eye(nb), axis=0)(t).T

    fx, fy = interp_basis(nx, nbx), interp_basis(ny, nby)
    return [(fx[i], fy[j]) for j in range(nby) for i in range(nbx)]


def _project_out(basis, img, w, ok):
    """``img`` minus its weighted (``w``) least-squares fit by the separable ``basis`` over ``ok``."""
    A = np.stack([np.outer(by, bx)[ok] for bx, by in basis], axis=1)
    coef, *_ = np.linalg.lstsq(A * w[ok][:, None], img[ok] * w[ok], rcond=None)
    out = np.full(img.shape, np.nan)
    out[ok] = img[ok] - A @ coef
    return out


def _fringe_inputs(run: NightRun, det, used: list[str], header) -> list[np.ndarray] | None:
    """Per used input, the pixels the combine admitted (its mask, read from the build's intermediates
    in the repository's work area: the ones whose ISR calibs are the product's), or None where the
    intermediates are gone (then every input is taken as admitted)."""
    from calib_core.io.products import read_product

    isr = {str(header[k]) for k in header if k.startswith("CALIB_ISR_")}
    wd = Path(run.repo) / "work" / run.camera / "fringe"
    out = []
    for e in used:
        cands = []
        for meta in sorted(wd.glob(f"{e}-det{det.id:03d}-*.json")):
            m = json.loads(meta.read_text())
            if set(m.get("isr_calibs", {}).values()) == isr and meta.with_suffix(".fits").exists():
                cands.append(meta.with_suffix(".fits"))
        if not cands:
            return None
        mask = read_product(max(cands, key=lambda p: p.stat().st_mtime))[0].mask
        out.append(mask)
    return out


def fringe_frame_accuracy(run: NightRun, filt: str = "z") -> dict:
    """The fringe frame of ``filt`` against the injected fringe pattern, in units of its noise floor
    (see the module docstring, "Fringe frame")."""
    from calib_core.builds.fringe import FringeBuildConfig
    from calib_core.io.products import read_product
    from calib_core.maskedimage import mask_bits

    sim, cam = run.sim, load_camera(run.sim.truth_dir / "camera.yaml")
    prods = products(run, "fringe", filt)
    if not prods:
        return {}
    build = FringeBuildConfig()
    reject = mask_bits(build.combine.mask + ["BAD", "NO_DATA"])
    rbar = sim.flat_reference(filt)
    flats = [e.exposure_id for e in sim.select("flat", filt)]
    lamp = sum(sim.exposure_truth(e)["lamp_level"] for e in flats)
    c_flat = clip_variance_ratio(len(flats), trials=20000)
    biases, darks = sim.select("bias"), sim.select("dark")
    nb, nd = len(biases), len(darks)
    c_b, c_d = clip_variance_ratio(nb, trials=20000), clip_variance_ratio(nd, trials=20000)
    t_dk = darks[0].darktime if darks else 1.0
    per_row = _overscan_per_row(run)
    dets, used_all, rejected_all, n_from = [], set(), {}, "intermediates"
    for d, row in sorted(prods.items()):
        det = cam.detector(d)
        mi, header = read_product(row.path)
        used, rejected = used_and_rejected(run, row.calib_id)
        used_all |= set(used)
        rejected_all.update(rejected)
        g, rn = _amp_map(cam, det, "gain"), _amp_map(cam, det, "read_noise")
        rn_adu, nos = rn / g, _overscan_columns(det)
        row_e2 = (1.2533 * rn) ** 2 / nos if per_row else 0.0          # a per-row overscan's noise, e-^2
        R = sim.truth_flat(filt, det.name).astype(np.float64)
        Q = R * g * rbar                                                  # detected e- per incident e-
        live = Q > 0.05 * np.median(Q)
        D = sim.truth_dark(det.name).astype(np.float64) * g              # e-/s
        F = sim.truth_fringe(filt, det.name).astype(np.float64)
        masks = _fringe_inputs(run, det, used, header)
        if masks is None:
            n_from = "assumed (intermediates gone)"
        vsum = np.zeros(F.shape)
        n = np.zeros(F.shape)
        kb = np.zeros(F.shape)
        kd = np.zeros(F.shape)
        cont_mean = np.zeros(F.shape)      # mean_j of the normalised continuum (the flat's noise multiplies it)
        defect_mean = np.zeros(F.shape)    # the part of it the bad exposures' defects add
        coef, sig = [], []
        for k, e in enumerate(used):
            t = sim.exposure_truth(e)
            S = t["sky_level"]
            cont = sim.sky_model(e, det.name, fringe=False).astype(np.float64) / S   # G P M + A
            lvl = float(np.mean(cont[live]))
            coef.append(t["fringe_scale"] / lvl)
            E = Q * S * (cont + t["fringe_scale"] * F)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.where(live, (E + D * t["darktime"] + rn ** 2 + row_e2) / (Q * S * lvl) ** 2, np.nan)
            adm = live if masks is None else live & ((masks[k] & reject) == 0)
            vsum += np.where(adm, v, 0.0)
            n += adm
            sig.append(float(np.sqrt(np.nanmedian(v))))
            with np.errstate(invalid="ignore", divide="ignore"):
                kb += (1 - t["darktime"] / t_dk) / (rbar * R * S * lvl) / len(used)
                kd += (t["darktime"] / t_dk) / (rbar * R * S * lvl) / len(used)
            cont_mean += cont / lvl / len(used)
            if t.get("defect"):
                clean = sim.sky_model(e, det.name, fringe=False, defects=False).astype(np.float64) / S
                defect_mean += (cont / lvl - clean / float(np.mean(clean[live]))) / len(used)
        var_bias = c_b * (rn_adu ** 2 + ((1.2533 * rn_adu) ** 2 / nos if per_row else 0.0)) / nb
        var_dark = c_d * (sim.truth_dark(det.name) * t_dk / g + rn_adu ** 2
                          + ((1.2533 * rn_adu) ** 2 / nos if per_row else 0.0)) / nd
        cn, c_n_cache = np.zeros(F.shape), {}
        for m in np.unique(n[n > 0]).astype(int):
            if m not in c_n_cache:
                c_n_cache[m] = clip_variance_ratio(
                    m, sigmas=sig if m == len(sig) else np.quantile(sig, np.linspace(0, 1, m)))
            cn[n == m] = c_n_cache[m]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (cn * vsum / n ** 2 + c_flat * cont_mean ** 2 / (lamp * Q)
                   + kb ** 2 * var_bias + kd ** 2 * var_dark)
        ok = live & (n > 0) & ((mi.mask & reject) == 0) & np.isfinite(mi.image) & np.isfinite(var)
        dets.append({"det": det, "Y": mi.image.astype(np.float64), "F": F * float(np.mean(coef)),
                     "floor": np.sqrt(var), "ok": ok, "cont": cont_mean, "defect": defect_mean})
    # one scale over the focal plane; per detector, the span of the preparation's background
    basis_cfg = build.fringe.subtract_background
    num = den = 0.0
    for dd in dets:
        basis = _smooth_basis(basis_cfg, *dd["F"].shape)
        w = 1.0 / dd["floor"]
        dd["Yp"] = _project_out(basis, dd["Y"], w, dd["ok"])
        dd["Fp"] = _project_out(basis, dd["F"], w, dd["ok"])
        dd["Lp"] = _project_out(basis, dd["cont"], w, dd["ok"])       # what the preparation leaves of it
        dd["Dp"] = _project_out(basis, dd["defect"], w, dd["ok"])
        ok = dd["ok"]
        num += np.sum(dd["Yp"][ok] * dd["Fp"][ok] * w[ok] ** 2)
        den += np.sum(dd["Fp"][ok] ** 2 * w[ok] ** 2)
    a = num / den
    res, lk, dk, per_det = [], [], [], {}
    for dd in dets:
        ok, fl = dd["ok"], dd["floor"]
        r = (dd["Yp"] - a * dd["Fp"])[ok] / fl[ok]
        res.append(r)
        lk.append(dd["Lp"][ok] / fl[ok])
        dk.append(dd["Dp"][ok] / fl[ok])
        ad = np.sum(dd["Yp"][ok] * dd["Fp"][ok] / fl[ok] ** 2) / np.sum(dd["Fp"][ok] ** 2 / fl[ok] ** 2)
        per_det[dd["det"].id] = {"ratio": float(np.sqrt(np.mean(r ** 2))), "scale": float(ad),
                                 "floor_median": float(np.median(fl[ok]))}
    r, L = np.concatenate(res), np.concatenate(lk)
    beta = float(np.sum(r * L) / np.sum(L * L))
    floors = np.concatenate([dd["floor"][dd["ok"]] for dd in dets])
    return {"filter": filt, "ratio": float(np.sqrt(np.mean(r ** 2))), "a": float(a),
            "n_pixels": int(r.size), "floor_median": float(np.median(floors)),
            "continuum_leak_sigma": float(np.sqrt(np.mean(L ** 2))),
            "continuum_leak_coefficient": beta,
            "defect_leak_sigma": float(np.sqrt(np.mean(np.concatenate(dk) ** 2))),
            "ratio_less_leak": float(np.sqrt(np.mean((r - beta * L) ** 2))),
            "inputs_admitted_from": n_from, "used": sorted(used_all), "rejected": rejected_all,
            "per_detector": per_det}


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
    out["fringe"] = {f: fringe_frame_accuracy(run, f) for f in run.held if products(run, "fringe", f)}
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| camera | filter | sky frame / floor | held-out reduction (min, median) | scale / truth (range) "
             "| bad rejected | good rejected | bias / floor | dark / floor | flat / floor | fringe / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
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
                f"{m.get(f'flat_{f}', {}).get('ratio', float('nan')):.2f} | {_fringe_cell(r, f)} |")
    notes = [f"{r['camera']} {f}: sky frame {acc['ratio']:.2f} x its floor, {acc['ratio_vs_separation']:.2f} x "
             f"what any frame built without a model of the fringes' shape can reach "
             f"(separation factor {acc['separation_factor']:.2f}, from the spread of the fringe amplitudes)"
             for r in results for f, acc in r["sky"].items() if "separation_factor" in acc]
    if notes:
        lines += ["", "Fringing filters (module docstring, \"Fringing filters\"): " + "; ".join(notes) + "."]
    return "\n".join(lines)


def _fringe_cell(result: dict, filt: str) -> str:
    fr = result.get("fringe", {}).get(filt)
    return f"{fr['ratio']:.2f}" if fr else "-"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cameras", default="democam_mini,minimosaic,democam")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "sky_accuracy"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sky_accuracy"))
    ap.add_argument("--keep", action="store_true", help="keep each night's folder (and its run record)")
    ap.add_argument("--reuse", action="store_true", help="evaluate the nights kept by an earlier --keep run")
    args = ap.parse_args(argv)
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

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
            print(json.dumps({k: res[k] for k in ("sky", "masters", "held_out", "fringe")}, indent=1,
                             default=str)[:8000],
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
