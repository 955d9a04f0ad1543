"""Satellite trails in the sky build: a straight strip across the whole focal plane, found on the
binned products of the build's barrier (docs/algorithms.md, "Sky frames").

A trail's core is bright, so object masking takes a band along it (tens to a couple of hundred
pixels wide: the broad wings, 0.5-1 % of the sky, are detected too) and the 32-px bins it crosses
lose part or all of their pixels (NPOINT); beyond the band the wings raise the residual ``I/L - 1``
a little. In one bin neither stands out from what stars and galaxies do to the bins of every
exposure, but the trail is straight and crosses the focal plane from edge to edge. The search is a
Hough (Radon) transform of a per-bin anomaly over the whole focal plane:

1. per (exposure, detector), two anomalies per bin, each against the same bin in the night's other
   exposures (so chip edges, bad columns and the sky pattern drop out) and less the exposure's own
   median (a cloud masks most of every detector): the masked fraction ``1 - NPOINT / bin area``
   minus its per-bin median over the night, and the residual minus its per-bin median over the
   bin's noise;
2. each anomaly as a Gaussian significance: its rank among all values of that detector over the
   night, through the inverse normal CDF, clipped at ``clip``. No shape is assumed (masked
   fractions are skewed and bounded) and a trail, one exposure in N, barely moves the
   distribution it is ranked in. An exposure spread wider than the night (a cloud) is scaled down
   by its own spread, measured below its median where a trail cannot reach. Per bin the larger of
   the two, ranked again the same way, is the bin's anomaly ``q`` (about N(0, 1) on a clean night);
3. for every angle (steps that move the strip by a quarter of its width over the focal plane's
   radius) and offset (half-width steps), the bins whose centres lie within ``width_bins / 2`` of
   the line are cut into pieces ``segment_bins`` long; a piece's significance is how far its
   ``sum(q)`` rises above the higher of the two parallel strips ``flank_bins`` to either side,
   along the same stretch, over its standard deviation (a glow, a cloud or a gradient is as high
   on one side at least; a trail is above both). Pieces without bins on both sides do not count:
   along the focal plane's edge a broad feature would look like a strip;
4. the line's score is the significance of its weakest ``coherent_fraction`` of pieces, ``sum /
   sqrt(m)`` over the m lowest: signal in a few pieces (a bleed column, a galaxy, a ghost) goes
   with the strongest third, while a trail carries every piece. The line must also be significant
   (``min_detector_score``) on at least ``min_detectors`` detectors, which nothing confined to one
   detector can be. The best line's direction is then refined from the principal axis of the
   anomalous bins around it and a finer matched-strip search.

Peers: LSST's ``MaskStreaksTask`` (meas_algorithms) finds trails on one detector at full
resolution: Canny edges of the detection mask, a kernel Hough transform, then a Moffat profile fit.
Here the trail has already been detected (object masking took it) and what is left is to tell a
line across the focal plane from everything else a night masks, on a few thousand bins spread over
detectors with gaps and any orientation. scikit-image's ``hough_line`` and ``radon`` want one
regular raster: putting irregular chip layouts on one would resample the bins and smear the strip,
and ``hough_line`` counts non-zero pixels where this sums a signed significance with flanks and
pieces. The accumulation and scoring run one angle at a time in a numba kernel
(:func:`calib_core.stats._kernels.strip_scores`), in scratch the size of one angle's strips.

This module never imports Prefect.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, ClassVar, Mapping

import numpy as np
from pydantic import ConfigDict, Field
from scipy.special import ndtri
from scipy.stats import rankdata

from calib_core.camera import Camera
from calib_core.configmodel import ConfigModel
from calib_core.stats._kernels import refine_scores, strip_scores
from calib_core.stats.background import BackgroundModel, bin_centres
from calib_core.stats.stack import worker_threads
from calib_core.stats.warnfilters import nanmedian_quiet

__all__ = ["StreakConfig", "Streak", "BinnedFocalPlane", "bin_anomalies", "find_line", "find_streaks",
           "streak_reason"]


class StreakConfig(ConfigModel):
    """The straight-strip (satellite trail) rule of the sky build's exposure rejection; not in the
    reference. Lengths are in bin pitches (32 px with the sky build's defaults)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="look for satellite trails; True. Runs where find_outlier_exposures "
                                            "is given the camera (the sky build's barrier does)")
    min_score: float = Field(5.0, gt=0, description="reject an exposure whose best line scores at least this "
                                                    "(sigma: the significance of the weakest coherent_fraction "
                                                    "of its pieces); 5.0. On 37 simulated nights "
                                                    "(bench/results/streak_rejection*.md) trails scored "
                                                    "6.5-27.5, good exposures at most 2.9, glows at most 4.0")
    renamed_keys: ClassVar[dict[str, str]] = {"clip": "max_significance"}
    max_significance: float = Field(3.0, gt=0, description="per-bin significances are capped at this many sigma, so one "
                                               "bin a galaxy masked weighs no more than a bin the trail "
                                               "crosses")
    width_bins: list[Annotated[float, Field(gt=0)]] = Field(
        [2.0, 4.0], min_length=1, description="widths of the strip tried (bin pitches): the bins whose centres "
                                              "lie within half of one from the line; [2, 4] (a trail's masked "
                                              "band is 1-8 bins wide)")
    flank_bins: float | None = Field(8.0, gt=0, description="each piece is compared with the higher of the strips "
                                                           "this far (bin pitches, centre to centre) to either "
                                                           "side, and counts only where both hold bins; 8.0, "
                                                           "beyond the masked band of a trail with bright "
                                                           "wings. None: no comparison")
    segment_bins: float = Field(6.0, gt=0, description="length of a piece of the strip (bin pitches)")
    coherent_fraction: float = Field(0.67, gt=0, le=1, description="the score sums the weakest this fraction "
                                                                   "of the line's pieces, so the signal must "
                                                                   "run along about this much of its chord "
                                                                   "across the focal plane")
    min_detectors: int = Field(2, ge=1, description="the line must be significant on at least this many "
                                                    "detectors (a bleed column or a galaxy is on one); 2. "
                                                    "A single-detector camera needs 1")
    min_detector_score: float = Field(3.0, gt=0, description="significance (sigma) of the line's bins on a "
                                                             "detector for that detector to count")
    angle_step_deg: float | None = Field(None, gt=0, description="Hough angle step (deg); None: the strip moves "
                                                                 "by a quarter of its width over the focal "
                                                                 "plane's radius")


@dataclass
class Streak:
    """The best line of one exposure.

    Attributes
    ----------
    score : float
        Significance of the line's weakest ``coherent_fraction`` of pieces (sigma).
    angle_deg : float
        Direction of the line from the focal-plane u axis, counter-clockwise, in [0, 180).
    offset_mm : float
        Signed distance of the line from the focal-plane origin, ``-u sin(a) + v cos(a)``.
    length_mm : float
        Extent along the line between its first and last significant piece.
    n_detectors : int
        Detectors on which the line is significant.
    masked : bool
        True when the masked fraction carries more of the line than the residual does.
    qualifies : bool
        ``score >= min_score`` and ``n_detectors >= min_detectors``.
    """

    score: float
    angle_deg: float
    offset_mm: float
    length_mm: float
    n_detectors: int
    masked: bool
    qualifies: bool


@dataclass
class BinnedFocalPlane:
    """Per-bin values of one exposure over the focal plane (flat arrays, one entry per bin).

    Attributes
    ----------
    u, v : focal-plane mm of the bin centres
    q : the bin's anomaly, a Gaussian significance (0 where nothing is known)
    masked, resid : the significances of its masked fraction and of its residual (0 where unknown)
    det : index of the bin's detector
    pitch : bin pitch, mm (the median over detectors)
    """

    u: np.ndarray
    v: np.ndarray
    q: np.ndarray
    masked: np.ndarray
    resid: np.ndarray
    det: np.ndarray
    pitch: float


def _coords(camera: Camera, d, m: BackgroundModel) -> tuple[np.ndarray, np.ndarray, float]:
    det = camera.detector(d)
    xc, yc = bin_centres(m.x_edges), bin_centres(m.y_edges)
    gx, gy = np.meshgrid(xc, yc)
    u, v = camera.pixel_to_focal_plane(det, gx, gy)
    steps = [np.diff(c).mean() for c in (xc, yc) if c.size > 1]
    pitch = (min(steps) if steps else float(max(m.width, m.height))) * camera.pixel_size(det)
    return np.asarray(u, np.float64), np.asarray(v, np.float64), float(pitch)


def _gaussianise(maps: Mapping[object, Mapping[object, np.ndarray]], clip: float) -> dict:
    """``{exposure: {detector: map}}`` -> the same maps as Gaussian significances: each value's rank
    among every finite value of its detector over the night, through the inverse normal CDF,
    clipped at ``clip``. No shape is assumed for the anomaly (masked fractions are skewed and
    bounded); one exposure in N barely moves the distribution it is ranked in. NaN stays NaN."""
    out = {e: {} for e in maps}
    dets = {d for e in maps for d in maps[e]}
    for d in dets:
        es = [e for e in maps if d in maps[e]]
        flat = np.concatenate([maps[e][d].ravel() for e in es])
        ok = np.isfinite(flat)
        z = np.full(flat.shape, np.nan)
        if ok.sum() > 1:
            p = (rankdata(flat[ok]) - 0.5) / ok.sum()
            z[ok] = np.clip(ndtri(p), -clip, clip)
        k = 0
        for e in es:
            n = maps[e][d].size
            out[e][d] = z[k:k + n].reshape(maps[e][d].shape)
            k += n
    return out


def _centred(maps: Mapping[object, np.ndarray]) -> dict:
    """One exposure's maps less their common median (a cloud masks most of every detector)."""
    flat = np.concatenate([a.ravel() for a in maps.values()])
    med = np.median(flat[np.isfinite(flat)]) if np.isfinite(flat).any() else 0.0
    return {d: a - med for d, a in maps.items()}


def _lower_sigma(z: np.ndarray) -> float:
    """Spread of ``z`` below its median (median minus the 15.87th percentile): a trail adds masked
    pixels and light, never removes them, so this side keeps a clean exposure's spread."""
    z = z[np.isfinite(z)]
    if z.size < 3:
        return 1.0
    lo, med = np.percentile(z, [15.865525393145708, 50.0])
    return float(med - lo) if med > lo else 1.0


def bin_anomalies(camera: Camera, residuals: Mapping[object, Mapping[object, BackgroundModel]],
                  config: StreakConfig | None = None) -> dict[object, BinnedFocalPlane]:
    """Steps 1-2 of the module docstring for every exposure of a night.

    Parameters
    ----------
    residuals : {exposure: {detector: BackgroundModel}}
        The binned residuals ``I/L - 1`` of the barrier, with errors and NPOINT.
    """
    cfg = config or StreakConfig()
    exps = list(residuals)
    dets = sorted({d for e in exps for d in residuals[e]}, key=str)
    geo, f_med, r_med = {}, {}, {}
    for d in dets:
        ms = [residuals[e][d] for e in exps if d in residuals[e]]
        area = np.outer(np.diff(ms[0].y_edges), np.diff(ms[0].x_edges)).astype(np.float64)
        geo[d] = (*_coords(camera, d, ms[0]), area)
        f_med[d] = np.median(np.stack([1.0 - m.npoint / area for m in ms]), axis=0)
        # a bin empty in every exposure: NaN
        r_med[d] = nanmedian_quiet(np.stack([np.where(m.npoint > 0, m.values, np.nan).astype(np.float64)
                                             for m in ms]), axis=0)
    pitch = float(np.median([g[2] for g in geo.values()]))
    fmaps, rmaps = {}, {}
    for e in exps:
        models = {d: residuals[e][d] for d in dets if d in residuals[e]}
        npt = np.concatenate([m.npoint.ravel() for m in models.values()]).astype(np.float64)
        err = np.concatenate([m.errors.ravel() for m in models.values()]).astype(np.float64)
        good = np.isfinite(err) & (npt > 0)
        pix = float(np.median(err[good] * np.sqrt(npt[good]))) if good.any() else math.nan
        n_typ = float(np.median(npt[good])) if good.any() else 0.0
        f, r = {}, {}
        for d, m in models.items():
            f[d] = 1.0 - m.npoint / geo[d][3] - f_med[d]
            npd = m.npoint.astype(np.float64)
            # noise as exposure_structure takes it: a bin's error floored at the exposure's typical
            # per-pixel noise over sqrt(NPOINT); bins with under a fifth of the typical NPOINT say
            # nothing about the residual (their masked fraction still counts)
            with np.errstate(invalid="ignore", divide="ignore"):
                noise = np.fmax(m.errors.astype(np.float64), pix / np.sqrt(npd))
                rr = (m.values.astype(np.float64) - r_med[d]) / noise
            r[d] = np.where((npd >= 0.2 * n_typ) & np.isfinite(rr), rr, np.nan)
        fmaps[e], rmaps[e] = _centred(f), _centred(r)
    fz, rz = _gaussianise(fmaps, cfg.max_significance), _gaussianise(rmaps, cfg.max_significance)
    for e in exps:       # an exposure noisier than the night (a cloud) is judged against its own spread
        for z in (fz[e], rz[e]):
            s = max(_lower_sigma(np.concatenate([a.ravel() for a in z.values()])), 1.0)
            for d in z:
                z[d] = z[d] / s
    both = {e: {d: np.fmax(fz[e][d], rz[e][d]) for d in fz[e]} for e in exps}
    qz = _gaussianise(both, cfg.max_significance)
    out = {}
    for e in exps:
        ds = [d for d in dets if d in residuals[e]]
        flat = {k: np.concatenate([np.nan_to_num(m[e][d].ravel()) for d in ds]) for k, m in
                (("q", qz), ("f", fz), ("r", rz))}
        u = np.concatenate([geo[d][0].ravel() for d in ds])
        v = np.concatenate([geo[d][1].ravel() for d in ds])
        det = np.concatenate([np.full(geo[d][0].size, i) for i, d in enumerate(ds)])
        out[e] = BinnedFocalPlane(u, v, flat["q"], flat["f"], flat["r"], det, pitch)
    return out


def find_line(fp: BinnedFocalPlane, config: StreakConfig | None = None) -> Streak:
    """Steps 3-4 of the module docstring: the best straight strip of one exposure's bins, over the
    strip widths of the config."""
    cfg = config or StreakConfig()
    found = [_find_line(fp, cfg, w) for w in cfg.width_bins]
    return max(found, key=lambda s: (s.qualifies, s.n_detectors >= cfg.min_detectors, s.score))


_NO_SIG = np.empty((0, 0))


def _find_line(fp: BinnedFocalPlane, cfg: StreakConfig, width_bins: float) -> Streak:
    u, v, q, det = fp.u, fp.v, fp.q, fp.det
    n_det = int(det.max()) + 1 if det.size else 1
    radius = float(np.max(np.hypot(u, v))) + fp.pitch
    cell = width_bins * fp.pitch / 2.0              # a strip is two cells wide
    seg = cfg.segment_bins * fp.pitch
    g = max(int(round(cfg.flank_bins * fp.pitch / cell)), 2) if cfg.flank_bins else 0
    step = (math.radians(cfg.angle_step_deg) if cfg.angle_step_deg
            else 0.25 * width_bins * fp.pitch / radius)
    thetas = np.arange(0.0, math.pi, step)
    n_rho = int(math.ceil(2 * radius / cell)) + 2
    n_seg = int(math.ceil(2 * radius / seg)) + 1
    chunk = max(1, min(len(thetas), 4_000_000 // (n_rho * max(n_seg, n_det) + u.size)))
    best = None
    for a0 in range(0, len(thetas), chunk):
        th = thetas[a0:a0 + chunk]
        # steps 3-4 for each angle of the chunk (a numba kernel, calib_core.stats._kernels.strip_scores):
        # strip j is cells j and j + 1 across the line, cut into segments along it; a piece counts
        # by how far it rises above the higher of the strips g cells to either side (a glow, a
        # cloud or a gradient is as high on one side at least; a trail is above both), and only
        # where both sides hold bins (along the focal plane's edge a broad feature would look like
        # a strip); the score is that of the weakest pieces; n_sig counts the detectors on which
        # the strip is significant (a bleed column or a galaxy is on one)
        score, n_sig = strip_scores(u, v, q, det, np.cos(th), np.sin(th), radius, cell, seg, n_rho, n_seg, n_det,
                                    g, cfg.coherent_fraction, cfg.min_detector_score, _NO_SIG)
        ok = n_sig >= cfg.min_detectors
        flat = np.where(ok, score, -np.inf) if ok.any() else score
        a, j = np.unravel_index(int(np.argmax(flat)), flat.shape)
        if best is None or (ok[a, j], score[a, j]) > (best["ok"], best["score"]):
            sig = np.empty((n_rho - 1, n_seg))        # the pieces of the chunk's best line
            strip_scores(u, v, q, det, np.cos(th[a:a + 1]), np.sin(th[a:a + 1]), radius, cell, seg, n_rho, n_seg,
                         n_det, g, cfg.coherent_fraction, cfg.min_detector_score, sig)
            best = {"ok": bool(ok[a, j]), "score": float(score[a, j]), "theta": float(th[a]),
                    "rho": (j + 1) * cell - radius, "seg_sig": sig[j], "n_sig": int(n_sig[a, j])}
    if best is None or not math.isfinite(best["score"]):
        return Streak(-math.inf, math.nan, math.nan, 0.0, 0, True, False)
    hit = np.flatnonzero(best["seg_sig"] >= 2.0)
    length = float((hit[-1] - hit[0] + 1) * seg) if hit.size else 0.0
    th, rho = _refine(fp, best["theta"], best["rho"], width_bins * fp.pitch, step,
                      (cfg.flank_bins or 2 * width_bins) * fp.pitch / 2)
    on = np.abs(-u * math.sin(th) + v * math.cos(th) - rho) <= cell
    masked = bool(np.sum(fp.masked[on]) >= np.sum(fp.resid[on]))
    return Streak(best["score"], math.degrees(th) % 180.0, rho, length, best["n_sig"], masked,
                  best["ok"] and best["score"] >= cfg.min_score)


def _refine(fp: BinnedFocalPlane, theta: float, rho: float, width: float, step: float,
            half: float) -> tuple[float, float]:
    """The line's direction and offset, finer than the Hough grid (whose angle step is set by the
    strip width, coarse on a small focal plane): first the principal axis of the anomalous bins
    (``q > 1``) within ``half`` mm of the line, weighted by ``q``; then, around it, the strip of the
    same width whose bins hold the most anomaly, ``sum(q) / sqrt(n)``, over angles within two
    steps and offsets within a width, at an eighth of both."""
    c, s = math.cos(theta), math.sin(theta)
    sel = (np.abs(-fp.u * s + fp.v * c - rho) <= half) & (fp.q > 1.0)
    if sel.sum() >= 3:
        w = fp.q[sel]
        uc, vc = np.average(fp.u[sel], weights=w), np.average(fp.v[sel], weights=w)
        du, dv = fp.u[sel] - uc, fp.v[sel] - vc
        cov = np.array([[np.sum(w * du * du), np.sum(w * du * dv)], [np.sum(w * du * dv), np.sum(w * dv * dv)]])
        a = math.atan2(*np.linalg.eigh(cov)[1][::-1, 1]) % math.pi
        if abs((a - theta + math.pi / 2) % math.pi - math.pi / 2) <= math.radians(20):
            theta, rho = a, -uc * math.sin(a) + vc * math.cos(a)
    thetas = theta + np.linspace(-2 * step, 2 * step, 33)
    offsets = rho + np.linspace(-width, width, 17)
    # per (offset, angle): sum(q) / sqrt(n) over the bins within half a width of the line (a numba
    # kernel, the NumPy expression's values to the bit: tests/test_streaks.py)
    scores = refine_scores(fp.u, fp.v, fp.q, np.sin(thetas), np.cos(thetas), offsets, width / 2)
    best, out = -np.inf, (theta % math.pi, rho)
    for r, z in zip(offsets, scores):
        k = int(np.argmax(z))
        if z[k] > best:
            best, out = z[k], (float(thetas[k]) % math.pi, float(r))
    return out


def find_streaks(camera: Camera, residuals: Mapping[object, Mapping[object, BackgroundModel]],
                 config: StreakConfig | None = None, workers: int | None = None) -> dict[object, Streak]:
    """The best straight strip of every exposure of a night (see the module docstring).

    Parameters
    ----------
    residuals : {exposure: {detector: BackgroundModel}}
        The barrier's binned residuals ``I/L - 1`` (values, errors, NPOINT), all on the same grid
        per detector.
    workers : int, optional
        Threads searching exposures side by side (default: one per core); 1 searches them in turn.
        The result does not depend on it.
    """
    cfg = config or StreakConfig()
    planes = bin_anomalies(camera, residuals, cfg)
    # each exposure's search is independent, and its strip sums run in a numba kernel that releases
    # the GIL: one thread per core (the barrier is serial otherwise, and this search is most of it,
    # bench/results/barrier_scaling.md)
    n = min(len(planes), workers or worker_threads())
    if n <= 1:
        return {e: find_line(fp, cfg) for e, fp in planes.items()}
    with ThreadPoolExecutor(n, thread_name_prefix="calibflow-streaks") as pool:
        return dict(zip(planes, pool.map(lambda fp: find_line(fp, cfg), planes.values())))



def streak_reason(s: Streak) -> str:
    """The rejection reason of an exposure with a qualifying line."""
    what = "masked" if s.masked else "bright"
    return (f"a straight {what} strip {s.length_mm:.0f} mm long at angle {s.angle_deg:.1f} deg across the "
            f"focal plane (significance {s.score:.1f} sigma on {s.n_detectors} detectors): a satellite trail")
