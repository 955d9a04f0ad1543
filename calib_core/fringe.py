"""Fringe-frame preparation of one post-ISR detector image (pipe_drivers ``FringeTask``,
docs/algorithms.md#fringe-preparation): normalise to the sky level, remove the smooth background, flag sources.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .background import BackgroundConfig, measure_background
from .binstats import box_statistics
from .isr import IsrConfig
from .maskedimage import MaskedImage, mask_bits
from .objectmask import DetectionConfig, detect_sources
from .stack import CombineConfig

__all__ = ["FringeConfig", "FringeBuildConfig", "prepare_fringe"]


class FringeConfig(BaseModel):
    """FringeTask processing defaults (docs/algorithms.md#fringe-defaults)."""

    model_config = ConfigDict(extra="forbid")

    stats_mask: list[str] = Field(default_factory=lambda: ["DETECTED", "BAD", "NO_DATA"],
                                  description="planes ignored in the background level (MEANCLIP)")
    clip: float = Field(3.0, gt=0, description="MEANCLIP clip for the level; 3.0")
    n_iter: int = Field(3, ge=0, description="MEANCLIP passes for the level; 3")
    subtract_background: BackgroundConfig = Field(
        default_factory=BackgroundConfig,
        description="SubtractBackgroundTask defaults: 128-px bins, MEANCLIP, AKIMA, "
                    "REDUCE_INTERP_ORDER, Chebyshev approximation (order 6, weighted)")
    detection: DetectionConfig = Field(
        default_factory=lambda: DetectionConfig(sigma=1.0, threshold=5.0, n_sigma_to_grow=2.4,
                                                binning=1, threshold_type="stdev"),
        description="Gaussian sigma 1.0 px (detectSigma), threshold 5 sigma of the smoothed image "
                    "(stdev: the fringes themselves set the level, so they are not masked as "
                    "sources), grow 2.4 sigma, full resolution")


def prepare_fringe(masked_image: MaskedImage, config: FringeConfig | None = None
                   ) -> tuple[MaskedImage, float]:
    """Prepare one image for the fringe combine (a new MaskedImage; the input is not modified).

    1. level = MEANCLIP of the image ignoring ``stats_mask``;
    2. subtract the binned background (``subtract_background``);
    3. divide the masked image by the level (variance by level**2);
    4. detect positive sources on the result and OR them into DETECTED (which the combine
       rejects).

    Returns
    -------
    (MaskedImage, float)
        The normalised, background-free image and the level (ADU or e-, as the input).

    Raises
    ------
    ValueError
        If the level is not finite and positive (no usable pixels).
    """
    cfg = config or FringeConfig()
    mi = masked_image.copy()
    h, w = mi.shape
    level = float(box_statistics(mi.image, mi.mask, mask_bits(cfg.stats_mask), [[0, h, 0, w]],
                                 "MEANCLIP", cfg.clip, cfg.n_iter)[0, 0])
    if not (np.isfinite(level) and level > 0):
        raise ValueError(f"fringe preparation: background level {level!r} is not positive")
    model = measure_background(mi, cfg.subtract_background)
    mi.image -= model.evaluate()
    mi /= level
    det = detect_sources(mi.image, mi.mask, cfg.detection)
    mi.mask[det] |= np.int32(mask_bits(["DETECTED"]))
    return mi, level


class FringeBuildConfig(BaseModel):
    """Fringe build (docs/algorithms.md#fringe-build): ISR with bias, dark and flat (doFringe off), the
    preparation above per input, a plain MEANCLIP stack without scaling that rejects DETECTED."""

    model_config = ConfigDict(extra="forbid")

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(doFringe=False))
    fringe: FringeConfig = Field(default_factory=FringeConfig)
    combine: CombineConfig = Field(default_factory=CombineConfig)
