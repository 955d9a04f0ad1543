"""Quality of a sky frame, scored on held-out exposures (not used to build it).

For each exposure: objects masked, bins measured, the exposure's large-scale surface fitted
without the frame ("before") and, by :func:`calib_core.sky.apply_sky_frame`, with it ("after").
The structure of a residual is the RMS of its bins (fraction of the sky) less their measured
noise in quadrature: what is left above noise. The score is before / after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .background import BackgroundModel
from .camera import Camera
from .maskedimage import MaskedImage
from .sky import (SkyConfig, apply_sky_frame, bin_coordinates, exposure_residuals, fit_surface,
                  measure_sky_background)

__all__ = ["SkyQuality", "sky_frame_quality", "structure_above_noise", "detrend"]


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
