"""Quality of a sky frame, scored on held-out exposures (not used to build it).

:func:`sky_frame_quality`, for exposures the build never saw: objects masked, bins measured, the
exposure's large-scale surface fitted without the frame ("before") and, by
:func:`calib_core.sky.frames.apply_sky_frame`, with it ("after").

:func:`leave_one_out_structure`, for the build's own exposures (the verification gate's STRUCTURE
check, docs/algorithms.md#sky-frame-structure-check): each exposure is held out in turn and scored
against the frame made without it, from the build's binned residuals alone.

The structure of a residual is the RMS of its bins (fraction of the sky) less their measured
noise in quadrature: what is left above noise. The score is before / after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from calib_core.camera import Camera
from calib_core.maskedimage import MaskedImage
from calib_core.sky.frames import (SkyConfig, apply_sky_frame, average_backgrounds, bin_coordinates, exposure_residuals,
                                   fit_surface, measure_sky_background, normalise_frames, solve_scales)
from calib_core.stats.background import BackgroundModel

__all__ = ["SkyQuality", "sky_frame_quality", "structure_above_noise", "detrend", "Structure", "LeaveOneOut",
           "leave_one_out_structure"]


@dataclass
class SkyQuality:
    """Score of a sky frame.

    Attributes
    ----------
    rms_before, rms_after : float
        Pooled structure above noise (fraction of the sky) of the binned residual without / with
        the sky frame subtracted.
    improvement : float
        rms_before / rms_after.
    per_exposure : {exposure: (rms_before, rms_after, scale, scale_error)}
    """

    rms_before: float
    rms_after: float
    improvement: float
    per_exposure: dict = field(default_factory=dict)


def detrend(values: np.ndarray) -> np.ndarray:
    """Bins minus their least-squares plane ``a + b*i + c*j`` (NaN bins ignored and kept NaN)."""
    v = np.asarray(values, np.float64)
    jj, ii = np.mgrid[:v.shape[0], :v.shape[1]]
    ok = np.isfinite(v)
    out = np.full(v.shape, np.nan)
    if ok.sum() < 3:
        if ok.any():
            out[ok] = v[ok] - v[ok].mean()
        return out
    A = np.stack([np.ones(ok.sum()), ii[ok], jj[ok]], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, v[ok], rcond=None)
    out[ok] = v[ok] - A @ coef
    return out


def structure_above_noise(models) -> tuple[float, float, float]:
    """(structure, rms, noise) of binned residuals pooled over ``models``: ``rms`` of the finite
    bin values, ``noise`` the RMS of their errors, ``structure = sqrt(max(rms^2 - noise^2, 0))``."""
    vals = np.concatenate([np.asarray(m.values, np.float64).ravel() for m in models])
    errs = np.concatenate([np.asarray(m.errors, np.float64).ravel() for m in models])
    ok = np.isfinite(vals) & np.isfinite(errs)
    if not ok.any():
        return float("nan"), float("nan"), float("nan")
    rms = float(np.sqrt(np.mean(vals[ok] ** 2)))
    noise = float(np.sqrt(np.mean(errs[ok] ** 2)))
    return float(np.sqrt(max(rms ** 2 - noise ** 2, 0.0))), rms, noise


def exposure_quality(camera: Camera, images: Mapping[int, MaskedImage], frames: Mapping[int, BackgroundModel],
                     config: SkyConfig | None = None):
    """Sky-correct copies of one exposure's images and measure the structure above noise before
    and after. Returns (before, after, ScaleSolution, corrected images)."""
    cfg = config or SkyConfig()
    work = {d: mi.copy() for d, mi in images.items()}
    surface, sol = apply_sky_frame(camera, work, frames, cfg)
    # the same masks for both: bins of the input (objects flagged by apply) and of the output
    before_bins = {d: measure_sky_background(_with_mask(images[d], work[d]), cfg.sky) for d in work}
    plain = fit_surface(camera, before_bins, cfg.large_scale)
    before = structure_above_noise(exposure_residuals(camera, before_bins, plain).values())[0]
    after_models = []
    for d, mi in work.items():
        m = measure_sky_background(mi, cfg.sky)
        L = surface.at(*bin_coordinates(camera, camera.detector(d), m))
        m.values = (m.values / L).astype(np.float32)
        m.errors = (m.errors / np.abs(L)).astype(np.float32)
        after_models.append(m)
    after = structure_above_noise(after_models)[0]
    return before, after, sol, work


def _with_mask(src: MaskedImage, masked: MaskedImage) -> MaskedImage:
    out = src.copy()
    out.mask |= masked.mask
    return out


def sky_frame_quality(camera: Camera, exposures: Mapping[object, Mapping[int, MaskedImage]],
                      frames: Mapping[int, BackgroundModel], config: SkyConfig | None = None) -> SkyQuality:
    """Score ``frames`` on held-out ``exposures`` ({exposure: {detector id: post-ISR image}}).

    Inputs are not modified.
    """
    per = {}
    for e, dets in exposures.items():
        before, after, sol, _ = exposure_quality(camera, dets, frames, config)
        per[e] = (before, after, sol.scale, sol.error)
    rb = float(np.sqrt(np.mean([v[0] ** 2 for v in per.values()])))
    ra = float(np.sqrt(np.mean([v[1] ** 2 for v in per.values()])))
    return SkyQuality(rb, ra, rb / ra if ra > 0 else np.inf, per)


@dataclass
class Structure:
    """Structure above noise of binned residuals pooled over held-out exposures, fractions of the sky.

    Attributes
    ----------
    before, after : float
        ``sqrt(max(RMS(bins)^2 - noise^2, 0))`` of the residuals without the frame / with it
        subtracted at each exposure's fitted scale.
    noise : float
        RMS of the bins' measured errors (the same bins for both).
    """

    before: float
    after: float
    noise: float

    @property
    def ratio(self) -> float:
        """before / after (inf when nothing is left above noise, NaN when nothing was measured)."""
        if not (np.isfinite(self.before) and np.isfinite(self.after)):
            return float("nan")
        return self.before / self.after if self.after > 0 else float("inf")


@dataclass
class LeaveOneOut:
    """What :func:`leave_one_out_structure` measured: per detector, over the whole focal plane, and
    each held-out exposure's fitted scale of the frame."""

    detectors: dict
    focal_plane: Structure
    scales: dict


def leave_one_out_structure(camera: Camera, residuals: Mapping[object, Mapping[int, BackgroundModel]],
                            frames: Mapping[int, BackgroundModel], config: SkyConfig | None = None) -> LeaveOneOut:
    """Score a sky frame on the exposures it was built from, each held out in turn.

    Why leave-one-out: a night rarely has science exposures to spare, and a frame scored on its own
    inputs would be flattered by their noise, which it contains. The frame is a per-bin average of
    the exposures' binned residuals, so the frame without exposure j is cheap to make exactly as the
    build did (:func:`~calib_core.sky.frames.average_backgrounds`, the build's MEANCLIP, then
    :func:`~calib_core.sky.frames.normalise_frames`) from the residuals of the others.

    For exposure j the frame applied is ``frames + (F_-j - F_all)``: the product under test with
    exposure j's share taken out, where ``F_-j`` and ``F_all`` are averaged from the residuals
    without j and with every exposure. For the product as built ``F_all`` is the product itself,
    so exposure j meets exactly the frame made without it; a product that is not what its inputs
    make (corrupted, swapped, badly solved) carries its error into every held-out frame.

    ``before`` is the structure above noise of exposure j's binned residual ``R_j = I_j / L_j - 1``
    (the build's last surface ``L_j``, a quadratic over the focal plane, which the normalised frame
    does not carry); ``after`` that of ``R_j - s_j F_j``, ``s_j`` fitted over every bin of the
    exposure (:func:`~calib_core.sky.frames.solve_scales`, as :func:`~calib_core.sky.frames.apply_sky_frame`
    does). The noise is the bins' measured errors (from each bin's pixel scatter), the exposure's
    own only: the held-out frame's noise is a real error of the correction and counts as structure
    left. Bins with under a fifth of the exposure's median NPOINT (mostly masked objects, whose
    errors are unreliable) are left out of both.

    Parameters
    ----------
    residuals : {exposure: {detector id: BackgroundModel}}
        The build's binned residuals of the exposures the frame was made from (values, errors,
        NPOINT), at least two exposures.
    frames : {detector id: BackgroundModel}
        The sky frame under test.

    Raises
    ------
    ValueError
        With fewer than two exposures, or a detector of ``frames`` missing from the residuals.
    """
    cfg = config or SkyConfig()
    exps = list(residuals)
    if len(exps) < 2:
        raise ValueError(f"a leave-one-out score needs two or more exposures, got {len(exps)}")
    dets = sorted(frames)
    missing = [d for d in dets if any(d not in residuals[e] for e in exps)]
    if missing:
        raise ValueError(f"no residual of detector(s) {missing} in every exposure")

    def frame_of(keep):
        return normalise_frames(camera, {d: average_backgrounds([residuals[e][d] for e in keep]) for d in dets},
                                cfg.large_scale)

    full = frame_of(exps)
    before = {d: [] for d in dets}
    after = {d: [] for d in dets}
    scales = {}
    for j in exps:
        loo = frame_of([e for e in exps if e != j])
        held = {d: np.asarray(frames[d].values, np.float64) + (loo[d].values.astype(np.float64)
                                                               - full[d].values.astype(np.float64))
                for d in dets}
        npt = np.concatenate([residuals[j][d].npoint.ravel() for d in dets]).astype(np.float64)
        floor = 0.2 * float(np.median(npt[npt > 0])) if (npt > 0).any() else 0.0
        sol = solve_scales([(residuals[j][d].values, held[d]) for d in dets], cfg.sky)
        scales[j] = sol.scale
        for d in dets:
            r = residuals[j][d]
            ok = np.isfinite(held[d]) & (r.npoint >= floor)
            b = r.copy()
            b.values = np.where(ok, r.values, np.nan)
            a = b.copy()
            a.values = b.values - sol.scale * held[d]
            before[d].append(b)
            after[d].append(a)

    def structure(models_before, models_after) -> Structure:
        sb, _, noise = structure_above_noise(models_before)
        sa = structure_above_noise(models_after)[0]
        return Structure(sb, sa, noise)

    per = {d: structure(before[d], after[d]) for d in dets}
    whole = structure([m for d in dets for m in before[d]], [m for d in dets for m in after[d]])
    return LeaveOneOut(per, whole, scales)
