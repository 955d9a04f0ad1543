"""Quality of a sky frame, scored on held-out exposures (not used to build it).

For each exposure the build's own steps give the residual small-scale structure: objects masked,
the focal-plane model subtracted, the 32-px binned model of the residual measured in units of the
exposure's sky. "Before" is that structure as is; "after" is the same once the sky frame, fitted
with one pooled scale per exposure (:func:`calib_core.sky.solve_scales`), is subtracted. The score
is the RMS of the binned structure (bins minus a least-squares plane per detector, which the
focal-plane model absorbs) pooled over detectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .background import BackgroundModel
from .camera import Camera
from .maskedimage import MaskedImage
from .sky import SkyConfig, measure_scale, measure_sky_background, solve_scales, subtract_exposure_background

__all__ = ["SkyQuality", "sky_frame_quality", "structure_rms", "detrend"]


@dataclass
class SkyQuality:
    """Score of a sky frame.

    Attributes
    ----------
    rms_before, rms_after : float
        Pooled RMS (fraction of the sky) of the binned residual structure without / with the
        sky frame subtracted.
    improvement : float
        rms_before / rms_after.
    per_exposure : {exposure: (rms_before, rms_after, scale, scale_error)}
    """

    rms_before: float
    rms_after: float
    improvement: float
    per_exposure: dict = field(default_factory=dict)


def detrend(values: np.ndarray) -> np.ndarray:
    """Bins minus their least-squares plane ``a + b*i + c*j`` (NaN bins ignored and kept NaN).

    The focal-plane model subtracted with the sky frame absorbs structure on the scale of a
    detector, so only what is left after a plane counts as small-scale structure.
    """
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


def structure_rms(models) -> tuple[float, int]:
    """Sum of squares and count of the finite, :func:`detrend`-ed bins of several models."""
    ss, n = 0.0, 0
    for m in models:
        d = detrend(m.values)
        d = d[np.isfinite(d)]
        ss += float(np.sum(d ** 2))
        n += d.size
    return ss, n


def sky_frame_quality(camera: Camera, exposures: Mapping[object, Mapping[int, MaskedImage]],
                      frames: Mapping[int, BackgroundModel], config: SkyConfig) -> SkyQuality:
    """Score ``frames`` on held-out ``exposures`` ({exposure: {detector id: post-ISR image}}).

    Inputs are not modified.
    """
    tot = {"b": [0.0, 0], "a": [0.0, 0]}
    per = {}
    skies = {d: f.evaluate() for d, f in frames.items()}
    for e, dets in exposures.items():
        work = {d: mi.copy() for d, mi in dets.items()}
        scale = subtract_exposure_background(camera, work, skies, config)
        before = [_scaled_model(mi, scale, config) for mi in work.values()]
        sol = solve_scales([measure_scale(mi, skies[d], config.sky) for d, mi in work.items()], config.sky)
        for d, mi in work.items():
            mi.image -= np.float32(sol.scale) * skies[d]
        after = [_scaled_model(mi, scale, config) for mi in work.values()]
        sb, nb = structure_rms(before)
        sa, na = structure_rms(after)
        tot["b"][0] += sb
        tot["b"][1] += nb
        tot["a"][0] += sa
        tot["a"][1] += na
        per[e] = (float(np.sqrt(sb / max(nb, 1))), float(np.sqrt(sa / max(na, 1))), sol.scale, sol.error)
    rb = float(np.sqrt(tot["b"][0] / max(tot["b"][1], 1)))
    ra = float(np.sqrt(tot["a"][0] / max(tot["a"][1], 1)))
    return SkyQuality(rb, ra, rb / ra if ra > 0 else np.inf, per)


def _scaled_model(mi: MaskedImage, scale: float, config: SkyConfig) -> BackgroundModel:
    m = mi.copy()
    m /= scale
    return measure_sky_background(m, config.sky)
