"""Photon transfer curve: gain, read noise and turnoff per amplifier from pairs of flats
(cp_pipe ``PhotonTransferCurveExtractTask`` / ``PhotonTransferCurveSolveTask``;
docs/algorithms.md#photon-transfer-curve).

For each pair of bias-subtracted flats of the same exposure time (and filter), per amplifier:
``mu1, mu2`` their clipped means, ``mu = (mu1 + mu2) / 2``, and ``var`` half the clipped variance of
the flux-matched difference ``(mu2 * im1 - mu1 * im2) / mu`` (ADU**2): the pixel response pattern
cancels, the shot noise and read noise remain, so ``var = mu / g + n`` with ``g`` the gain (e-/ADU)
and ``n`` the read noise variance (ADU**2). The fit over the pairs gives ``g`` and ``n``:

* one exposure time (``SINGLE``): ``n`` fixed to the overscan's variance, ``1/g`` the weighted
  mean of ``mu / (var - n)``;
* two or three (``LINEAR``): weighted least squares of ``var = mu / g + n``;
* four or more (``EXPAPPROXIMATION``, the reference's default):
  ``var = (exp(2 a00 mu g) - 1) / (2 a00 g**2) + n_e / g**2`` (Astier et al. 2019, eq. 16; ``a00``
  the brighter-fatter term, ``n_e`` the read noise variance in e-**2).

Each point's weight is its sample-variance error ``var * sqrt(2 / npix)``. Points above the
turnoff -- where the variance per unit mean collapses (full well, saturation) -- are left out.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import ConfigDict, Field

from calib_core.configmodel import ClipConfig
from calib_core.errors import DataError
from calib_core.io.products import content_key
from calib_core.isr.process import IsrConfig
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.binned import image_statistic, meanclip_values

__all__ = ["PtcConfig", "PairStats", "AmpPtc", "pair_stats", "overscan_noise", "fit_ptc", "make_pairs",
           "ptc_table_hdus", "read_ptc", "plot_ptc", "FIT_TYPES"]

FIT_TYPES = ("auto", "SINGLE", "LINEAR", "EXPAPPROXIMATION")


class PtcConfig(ClipConfig):
    """PTC build (cp_pipe ``PhotonTransferCurveExtractConfig`` / ``SolveConfig`` defaults where they exist)."""

    model_config = ConfigDict(extra="forbid")
    reference_names: ClassVar[dict[str, str]] = {"mask_planes": "maskPlanes", "match_exposures_by": "matchExposuresBy", "max_saturated_fraction": "maxSaturatedFraction", "min_good_pixels": "minNumberGoodPixels", "niter": "nIterSigmaClipPtc", "nsigma": "nSigmaClipPtc", "ptc_fit_type": "ptcFitType", "turnoff_drop": "turnoffDrop"}

    # the certified defects are masked where one exists: a dead or low column has less variance than
    # its mean implies and would bias the gain high (by its share of the pixels)
    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_dark=False, do_flat=False, do_fringe=False,
                                                             use_ptc_gains=False))
    nsigma: float = Field(5.5, gt=0, description="clip of the means and of the difference's variance "
                                 "(cp_pipe 5.5)")
    niter: int = Field(3, ge=1, description="clip passes (cp_pipe 3)")
    min_good_pixels: int = Field(10000, ge=1, description="fewest good pixels of an amp in a pair for the "
                                     "pair to count (cp_pipe minNumberGoodPixelsForCovariance 10000)")
    match_exposures_by: Literal["EXPTIME"] = Field("EXPTIME", description="flats are paired by exposure time "
                                                 "(and filter), in exposure order (cp_pipe matchExposuresType)")
    ptc_fit_type: Literal["auto", "SINGLE", "LINEAR", "EXPAPPROXIMATION"] = Field(
        "auto", description="auto: SINGLE for one exposure time, LINEAR for two or three, EXPAPPROXIMATION "
                            "(cp_pipe default) for four or more")
    mask_planes: list[str] = Field(["SAT", "BAD", "NO_DATA"], description="pixels not used")
    turnoff_drop: float = Field(0.25, gt=0, lt=1, description="the turnoff: the first mean whose (variance - "
                               "read noise) / mean falls this fraction below that of the lower half of the points "
                               "(calibflow's rule, docs/algorithms.md#photon-transfer-curve)")
    max_saturated_fraction: float = Field(0.001, ge=0, le=1, description="a pair where more of an amp's pixels "
                                        "are saturated is above the turnoff for that amp")


@dataclass
class PairStats:
    """One amplifier in one flat pair."""

    amp: str
    exptime: float
    mu1: float
    mu2: float
    var: float                 # ADU**2: half the clipped variance of the flux-matched difference
    npix: int
    saturated: float = 0.0     # fraction of the amp's pixels flagged SAT in either flat
    exposures: tuple[str, str] = ("", "")

    @property
    def mu(self) -> float:
        return 0.5 * (self.mu1 + self.mu2)

    @property
    def var_err(self) -> float:
        return self.var * math.sqrt(2.0 / max(self.npix, 1))


@dataclass
class AmpPtc:
    """The fit of one amplifier."""

    amp: str
    gain: float                      # e-/ADU
    gain_err: float
    noise_fit: float                 # e-: sqrt of the fitted read-noise variance (0 if it is negative;
    noise_fit_err: float             #     NaN for SINGLE, where it is fixed to the overscan's)
    noise_var_fit: float             # e-**2: the fitted read-noise variance, may be negative within errors
    noise_var_fit_err: float
    noise_overscan: float            # e-: the overscan noise (ADU) times the gain
    turnoff: float                   # ADU: the highest mean used
    a00: float                       # 1/e- (EXPAPPROXIMATION), 0 otherwise
    fit_type: str
    n_points: int
    n_used: int
    chi2_dof: float
    points: list[PairStats] = field(default_factory=list)
    used: list[bool] = field(default_factory=list)
    model: list[float] = field(default_factory=list)

    @property
    def read_noise(self) -> float:
        """The read noise ISR uses (e-): the overscan's, converted with the measured gain."""
        return self.noise_overscan


def make_pairs(items: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Disjoint pairs of inputs with the same exposure time and filter, in input order: (0, 1),
    (2, 3), ... within each group; an odd one out is left unpaired. ``items`` have ``exptime``
    and optionally ``filter``."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((round(float(it["exptime"]), 6), it.get("filter")), []).append(i)
    pairs = []
    for idx in groups.values():
        pairs += [(idx[k], idx[k + 1]) for k in range(0, len(idx) - 1, 2)]
    return sorted(pairs)


def pair_stats(im1: MaskedImage, im2: MaskedImage, amps: Sequence[tuple], exptime: float,
               config: PtcConfig | None = None, exposures: tuple[str, str] = ("", "")) -> list[PairStats]:
    """Mean and variance of one flat pair, per amplifier (cp_pipe ``measureMeanVarCov``).

    Parameters
    ----------
    im1, im2 : MaskedImage
        Bias-subtracted flats (ADU), same shape.
    amps : list of (name, y0, y1, x0, x1)
    exptime : float
    """
    config = config or PtcConfig()
    ignore = np.int32(MASK_PLANES.bits(config.mask_planes))
    sat_bit = np.int32(MASK_PLANES.bit("SAT"))
    out = []
    for name, y0, y1, x0, x1 in amps:
        a = im1.image[y0:y1, x0:x1].astype(np.float64)
        b = im2.image[y0:y1, x0:x1].astype(np.float64)
        m = im1.mask[y0:y1, x0:x1] | im2.mask[y0:y1, x0:x1]
        good = ((m & ignore) == 0) & np.isfinite(a) & np.isfinite(b)
        sat = float(((m & sat_bit) != 0).mean())
        if good.sum() < config.min_good_pixels:
            out.append(PairStats(name, exptime, math.nan, math.nan, math.nan, int(good.sum()), sat, exposures))
            continue
        # MEANCLIP (clipped_mean's semantics) by the binned background's numba kernel: quartiles by
        # histogram and selection, one-pass sums (the same values to float64 rounding; NumPy's
        # percentiles and median were 90 % of a PTC combine)
        nsigma, niter = float(config.nsigma), int(config.niter)
        ag, bg = a[good], b[good]
        mu1 = meanclip_values(ag, nsigma, niter)[0]
        mu2 = meanclip_values(bg, nsigma, niter)[0]
        mu = 0.5 * (mu1 + mu2)
        diff = (mu2 * ag - mu1 * bg) / mu
        if not np.isfinite(diff).all():
            diff = diff[np.isfinite(diff)]
        _, var, n_used = meanclip_values(diff, nsigma, niter)
        out.append(PairStats(name, exptime, float(mu1), float(mu2), 0.5 * float(var), int(n_used), sat, exposures))
    return out


def overscan_noise(overscan: np.ndarray, axis: int = 1, nsigma: float = 5.5) -> float:
    """Read noise (ADU) of one raw overscan: the clipped standard deviation of the pixels about
    their row's (``axis=1``, overscan columns) or column's mean, corrected for the mean removed."""
    over = np.asarray(overscan, np.float64)
    if over.size == 0:
        return math.nan
    n = over.shape[axis]
    if n < 2:
        return math.nan
    resid = over - over.mean(axis=axis, keepdims=True)
    st = image_statistic("MEANCLIP", resid, nsigma=nsigma, niter=3)
    return float(math.sqrt(max(st.variance, 0.0) * n / (n - 1)))


def _turnoff(points: list[PairStats], noise_var: float, drop: float) -> list[bool]:
    """Which points (sorted by mean) lie below the turnoff: up to the first point whose shot-noise
    ratio ``(var - n) / mu`` falls more than ``drop`` below the median ratio of the lower half of
    the points. The variance collapses at full well and saturation, while a point's own noise is far
    smaller. (cp_pipe ``_getInitialGoodPoints`` cuts where the variance decreases over consecutive
    points; with many pairs at nearly one level, noise alone does that.)"""
    if not points:
        return []
    ratio = np.array([(p.var - noise_var) / p.mu for p in points])
    ref = float(np.median(ratio[:max(1, (len(points) + 1) // 2)]))
    used, stopped = [], False
    for r in ratio:
        stopped = stopped or r < ref * (1.0 - drop)
        used.append(not stopped)
    return used


def fit_ptc(points: Sequence[PairStats], overscan_noise_adu: float, config: PtcConfig | None = None) -> AmpPtc:
    """Gain, read noise and turnoff of one amplifier from its pairs' statistics (module docstring).

    Raises
    ------
    DataError
        No usable pair.
    """
    config = config or PtcConfig()
    pts = sorted((p for p in points if np.isfinite(p.var) and np.isfinite(p.mu) and p.var > 0),
                 key=lambda p: p.mu)
    if not pts:
        amp = points[0].amp if points else "?"
        raise DataError(f"PTC amplifier {amp}: no flat pair with {config.min_good_pixels} good pixels")
    amp = pts[0].amp
    n_os = overscan_noise_adu ** 2 if np.isfinite(overscan_noise_adu) else 0.0
    used = _turnoff(pts, n_os, config.turnoff_drop)
    for i, p in enumerate(pts):
        if p.saturated > config.max_saturated_fraction:
            used[i:] = [False] * (len(pts) - i)
            break
    if not any(used):
        used[0] = True
    u = [p for p, k in zip(pts, used) if k]
    mu = np.array([p.mu for p in u])
    var = np.array([p.var for p in u])
    err = np.array([p.var_err for p in u])
    levels = len({round(p.exptime, 6) for p in u})
    fit = config.ptc_fit_type
    if fit == "auto":
        fit = "SINGLE" if levels == 1 else ("LINEAR" if levels < 4 else "EXPAPPROXIMATION")
    if fit in ("LINEAR", "EXPAPPROXIMATION") and len(u) < (2 if fit == "LINEAR" else 3):
        raise DataError(f"PTC amplifier {amp}: {fit} needs more pairs than {len(u)}")
    w = 1.0 / err ** 2
    a00 = 0.0
    noise_var = noise_var_err = math.nan
    if fit == "SINGLE":
        y = var - n_os
        inv_g = float(np.sum(w * mu * y) / np.sum(w * mu * mu))
        inv_g_err = float(1.0 / math.sqrt(np.sum(w * mu * mu)))
        model = mu * inv_g + n_os
        npar = 1
        gain = 1.0 / inv_g
        cov_g = (inv_g_err / inv_g ** 2) ** 2
    elif fit == "LINEAR":
        A = np.stack([mu, np.ones_like(mu)], axis=1)
        Aw = A * np.sqrt(w)[:, None]
        cov = np.linalg.inv(Aw.T @ Aw)
        inv_g, n_adu = cov @ (Aw.T @ (var * np.sqrt(w)))
        model = A @ np.array([inv_g, n_adu])
        npar = 2
        gain = 1.0 / inv_g
        cov_g = cov[0, 0] / inv_g ** 4
        # read-noise variance (e-**2) = n * g**2: first-order propagation of (1/g, n)
        noise_var = float(n_adu / inv_g ** 2)
        jac = np.array([-2.0 * n_adu / inv_g ** 3, 1.0 / inv_g ** 2])
        noise_var_err = float(math.sqrt(jac @ cov @ jac))
    else:
        from scipy.optimize import curve_fit

        def f(x, a, g, n):
            ag = 2.0 * a * g
            small = np.abs(ag * x) < 1e-8
            core = np.where(small, x / g, np.expm1(np.where(small, 0.0, ag * x)) / (np.where(small, 1.0, ag) * g))
            return core + n / g ** 2

        A = np.stack([mu, np.ones_like(mu)], axis=1)
        Aw = A * np.sqrt(w)[:, None]
        lin = np.linalg.solve(Aw.T @ Aw, Aw.T @ (var * np.sqrt(w)))
        g0 = 1.0 / lin[0]
        p0 = [-1e-7, g0, max(lin[1], 1e-3) * g0 ** 2]
        popt, cov = curve_fit(f, mu, var, p0=p0, sigma=err, absolute_sigma=True, maxfev=20000)
        a00, gain, n_e = (float(v) for v in popt)
        model = f(mu, *popt)
        npar = 3
        cov_g = float(cov[1, 1])
        noise_var, noise_var_err = n_e, float(math.sqrt(cov[2, 2]))
    resid = (var - model) / err
    dof = len(u) - npar
    chi2_dof = float(np.sum(resid ** 2) / dof) if dof > 0 else math.nan
    # a fit worse than its weights say (chi2/dof > 1) widens its errors
    inflate = math.sqrt(chi2_dof) if dof > 0 and chi2_dof > 1 else 1.0
    gain_err = float(math.sqrt(max(cov_g, 0.0))) * inflate
    noise_var_err *= inflate
    noise_fit = math.sqrt(max(noise_var, 0.0)) if np.isfinite(noise_var) else math.nan
    # the error of sqrt(n) (first order; where n <= its error, the upper bound sqrt(err))
    noise_err = (noise_var_err / (2 * noise_fit) if noise_fit > 0 and noise_var > noise_var_err
                 else math.sqrt(noise_var_err)) if np.isfinite(noise_var) else math.nan
    full_model = []
    k = 0
    for keep in used:
        full_model.append(float(model[k]) if keep else math.nan)
        k += keep
    return AmpPtc(amp=amp, gain=float(gain), gain_err=gain_err, noise_fit=float(noise_fit),
                  noise_fit_err=float(noise_err), noise_var_fit=float(noise_var),
                  noise_var_fit_err=float(noise_var_err), noise_overscan=float(math.sqrt(n_os) * gain),
                  turnoff=float(max(p.mu for p in u)), a00=float(a00), fit_type=fit, n_points=len(pts),
                  n_used=len(u), chi2_dof=chi2_dof, points=pts, used=used, model=full_model)


# ---------------------------------------------------------------------------------------------------
# product
# ---------------------------------------------------------------------------------------------------


def gain_map(shape: tuple[int, int], amps: Sequence[tuple], fits: Mapping[str, AmpPtc]) -> MaskedImage:
    """The PTC product's image planes: each pixel holds its amplifier's gain (e-/ADU), its variance
    the gain's squared error; pixels of no fitted amplifier are NaN, NO_DATA."""
    image = np.full(shape, np.nan, np.float32)
    var = np.zeros(shape, np.float32)
    mask = np.full(shape, np.int32(MASK_PLANES.bit("NO_DATA")), np.int32)
    for name, y0, y1, x0, x1 in amps:
        if name in fits:
            image[y0:y1, x0:x1] = fits[name].gain
            var[y0:y1, x0:x1] = fits[name].gain_err ** 2
            mask[y0:y1, x0:x1] = 0
    return MaskedImage(image, mask, var)


def ptc_table_hdus(fits_: Mapping[str, AmpPtc]):
    """Two binary tables: ``PTC`` (one row per amplifier) and ``PTC_POINTS`` (one row per pair and
    amplifier, with whether the fit used it and its normalised residual)."""
    from astropy.io import fits
    from astropy.table import Table

    rows = list(fits_.values())
    t = Table({"AMP": [r.amp for r in rows], "GAIN": [r.gain for r in rows], "GAIN_ERR": [r.gain_err for r in rows],
               "NOISE_FIT": [r.noise_fit for r in rows], "NOISE_FIT_ERR": [r.noise_fit_err for r in rows],
               "NOISE_VAR_FIT": [r.noise_var_fit for r in rows],
               "NOISE_VAR_FIT_ERR": [r.noise_var_fit_err for r in rows],
               "NOISE_OVERSCAN": [r.noise_overscan for r in rows], "TURNOFF": [r.turnoff for r in rows],
               "A00": [r.a00 for r in rows], "FIT_TYPE": [r.fit_type for r in rows],
               "N_POINTS": [r.n_points for r in rows], "N_USED": [r.n_used for r in rows],
               "CHI2_DOF": [r.chi2_dof for r in rows]})
    pts = [(r.amp, p, k, m) for r in rows for p, k, m in zip(r.points, r.used, r.model)]
    tp = Table({"AMP": [a for a, *_ in pts], "EXPTIME": [p.exptime for _, p, _, _ in pts],
                "MU": [p.mu for _, p, _, _ in pts], "VAR": [p.var for _, p, _, _ in pts],
                "VAR_ERR": [p.var_err for _, p, _, _ in pts], "NPIX": [p.npix for _, p, _, _ in pts],
                "USED": [bool(k) for _, _, k, _ in pts], "MODEL": [m for *_, m in pts],
                "RESIDUAL": [(p.var - m) / p.var_err if k else math.nan for _, p, k, m in pts],
                "EXP1": [p.exposures[0] for _, p, _, _ in pts], "EXP2": [p.exposures[1] for _, p, _, _ in pts]})
    h1 = fits.table_to_hdu(t)
    h1.name = "PTC"
    h1.header["GAINUNIT"] = ("electron/adu", "unit of GAIN, GAIN_ERR")
    h1.header["NOISUNIT"] = ("electron", "unit of NOISE_FIT, NOISE_OVERSCAN")
    h2 = fits.table_to_hdu(tp)
    h2.name = "PTC_POINTS"
    return [h1, h2]


#: PTC tables already read, by content key (``calib_core.io.products.content_key``): ISR reads the same
#: certified PTC for every exposure of a detector; a product replaced on disk is read again
_PTC_TABLES: dict[tuple, dict[str, dict]] = {}
_PTC_LOCK = threading.Lock()


def read_ptc(path) -> dict[str, dict]:
    """The per-amplifier rows of a PTC product: ``{amp: {gain, gain_err, read_noise, ...}}``
    (``read_noise``: the overscan's, in e-, what ISR uses). Each file is parsed once per process
    (a few hundred bytes a product; ~20 ms of astropy table parsing saved per ISR); the caller gets
    its own copy of the rows."""
    key = content_key(path)
    with _PTC_LOCK:
        rows = _PTC_TABLES.get(key)
    if rows is None:
        rows = _read_ptc_table(path)
        with _PTC_LOCK:
            if len(_PTC_TABLES) >= 4096:      # a long-lived worker: forget, rather than grow
                _PTC_TABLES.clear()
            _PTC_TABLES[key] = rows
    return {amp: dict(row) for amp, row in rows.items()}


def _read_ptc_table(path) -> dict[str, dict]:
    from astropy.io import fits

    with fits.open(path) as hdul:
        data = hdul["PTC"].data
        out = {}
        for row in data:
            out[str(row["AMP"]).strip()] = {
                "gain": float(row["GAIN"]), "gain_err": float(row["GAIN_ERR"]),
                "noise_fit": float(row["NOISE_FIT"]), "noise_fit_err": float(row["NOISE_FIT_ERR"]),
                "read_noise": float(row["NOISE_OVERSCAN"]), "turnoff": float(row["TURNOFF"]),
                "a00": float(row["A00"]), "fit_type": str(row["FIT_TYPE"]).strip(),
                "n_used": int(row["N_USED"])}
    return out


def _model_curve(r: AmpPtc, mu: np.ndarray) -> np.ndarray:
    """The fitted variance (ADU**2) at means ``mu`` (ADU)."""
    g = r.gain
    if r.fit_type == "SINGLE":
        return mu / g + (r.noise_overscan / g) ** 2
    n = r.noise_var_fit / g ** 2
    if r.fit_type == "LINEAR" or r.a00 == 0:
        return mu / g + n
    return np.expm1(2 * r.a00 * g * mu) / (2 * r.a00 * g * g) + n


def plot_ptc(fits_: Mapping[str, AmpPtc], path, title: str = "") -> None:
    """A PNG of each amplifier's curve (variance against mean, the fit) and its residuals."""
    import matplotlib.ticker
    from matplotlib.figure import Figure      # not pyplot: its global figure list is not thread-safe

    rows = list(fits_.values())
    fig = Figure(figsize=(3.6 * len(rows) + 0.6, 5.6))
    axes = fig.subplots(2, len(rows), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for k, r in enumerate(rows):
        ax, ar = axes[0, k], axes[1, k]
        mu = np.array([p.mu for p in r.points])
        var = np.array([p.var for p in r.points])
        err = np.array([p.var_err for p in r.points])
        used = np.array(r.used, bool)
        ax.errorbar(mu[used], var[used], err[used], fmt="o", ms=3, label="pairs used")
        if (~used).any():
            ax.plot(mu[~used], var[~used], "x", color="0.5", label="above turnoff")
        xs = np.linspace(0, max(mu.max(), 1.0), 100)
        ax.plot(xs, _model_curve(r, xs), "-", lw=1, label=f"g = {r.gain:.4f} ± {r.gain_err:.4f} e-/ADU")
        ax.set_title(f"amp {r.amp} ({r.fit_type})", fontsize=9)
        ax.set_ylabel("variance (ADU²)")
        ax.legend(fontsize=7)
        model = np.array(r.model, float)
        ar.axhline(0, color="0.5", lw=0.8)
        ar.plot(mu[used], (var[used] - model[used]) / err[used], "o", ms=3)
        ar.set_xlabel("mean (ADU)")
        ar.set_ylabel("resid. (σ)")
        ar.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
