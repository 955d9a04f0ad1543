"""Sky frames: build (pipe_drivers ``SkyTask``, ALGORITHMS.md 4.5) and apply (pipe_tasks
``SkyMeasurementTask``, 5.1).

Build, per filter, in the reference's three barriers (each step is a plain function so a flow can
map it per (exposure, detector) and gather at the barriers):

1. per (exposure, detector): object masking (:func:`calib_core.objectmask.mask_objects`) and a
   partial :class:`~calib_core.focalplane.FocalPlaneBackground` (``add_detector``);
2. per exposure: :func:`exposure_background` merges the partials and takes the scale (median of
   the stats image);
3. per (exposure, detector): :func:`residual_background` subtracts the focal-plane model, divides by
   the scale and measures a 32-px binned model (:func:`measure_sky_background`);
4. across the focal plane: :func:`find_outlier_exposures` (beyond the reference: a DES-like RMS cut
   on each exposure's residual against the provisional average);
5. per detector: :func:`average_backgrounds` (per-bin MEANCLIP across exposures).

Apply: :func:`measure_scale` per detector, :func:`solve_scales` pooled over the focal plane,
:func:`subtract_sky_frame`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .background import BackgroundConfig, BackgroundModel, measure_background
from .binstats import box_statistics
from .camera import Camera, Detector
from .focalplane import FocalPlaneBackground, FocalPlaneBackgroundConfig
from .isr import IsrConfig
from .maskedimage import MaskedImage, mask_bits
from .objectmask import MaskObjectsConfig, mask_objects
from .stats import stack_statistic

__all__ = [
    "SkyStatsConfig", "SkyMeasurementConfig", "ExposureRejectionConfig", "SkyConfig",
    "SkyBuildConfig", "ScaleSolution", "SkyBuildResult", "mask_detector", "measure_sky_background", "exposure_background",
    "residual_background", "average_backgrounds", "find_outlier_exposures", "build_sky_frames",
    "subtract_exposure_background", "measure_scale", "solve_scales", "subtract_sky_frame", "fit_and_subtract_sky",
]


def _sky_background_default() -> BackgroundConfig:
    return BackgroundConfig(bin_size=32, grid="round", algorithm="NATURAL_SPLINE", use_approx=False,
                            ignored_mask_planes=["SAT", "BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE",
                                                 "NO_DATA"])


class SkyStatsConfig(BaseModel):
    """Statistics of the scale samples (pipe_tasks SkyStatsConfig)."""

    model_config = ConfigDict(extra="forbid")

    statistic: str = Field("MEANCLIP", description="MEANCLIP, MEAN or MEDIAN; MEANCLIP")
    clip: float = Field(3.0, gt=0, description="clip half-width in sigma; 3.0")
    n_iter: int = Field(3, ge=0, description="clip passes; 3")
    mask: list[str] = Field(default_factory=lambda: ["SAT", "DETECTED", "DETECTED_NEGATIVE", "BAD",
                                                     "NO_DATA"], description="planes ignored")


class SkyMeasurementConfig(BaseModel):
    """pipe_tasks SkyMeasurementConfig (ALGORITHMS.md 7.2)."""

    model_config = ConfigDict(extra="forbid")

    sky_iter: int = Field(3, ge=1, description="rejection rounds in solve_scales; 3")
    sky_rej: float = Field(3.0, gt=0, description="rejection threshold (sigma) in solve_scales; 3.0")
    background: BackgroundConfig = Field(
        default_factory=_sky_background_default,
        description="binned residual model: 32-px bins, nx = max(int(W/32+0.5), 1), MEANCLIP, "
                    "NATURAL_SPLINE, no approximation, mask SAT/BAD/EDGE/DETECTED/"
                    "DETECTED_NEGATIVE/NO_DATA")
    x_num_samples: int = Field(4, ge=1, description="scale samples along x per detector; 4")
    y_num_samples: int = Field(4, ge=1, description="scale samples along y per detector; 4")
    stats: SkyStatsConfig = Field(default_factory=SkyStatsConfig)


class ExposureRejectionConfig(BaseModel):
    """Rejection of whole exposures whose residual model is an outlier (not in the reference;
    after DES's fractional-RMS cut)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="apply the cut; True")
    n_sigma: float = Field(5.0, gt=0, description="reject RMS > median + n_sigma * robust sigma "
                                                  "(0.741 * IQR over exposures); 5.0")
    max_rms: float = Field(0.005, gt=0, description="reject RMS above this fraction of the sky "
                                                    "(DES uses 0.5%); 0.005")
    min_exposures: int = Field(3, ge=1, description="never reject when fewer exposures; 3")


class SkyConfig(BaseModel):
    """Everything a sky-frame build needs."""

    model_config = ConfigDict(extra="forbid")

    large_scale: FocalPlaneBackgroundConfig = Field(..., description="focal-plane superpixels "
                                                                       "(x_size, y_size in mm)")
    sky: SkyMeasurementConfig = Field(default_factory=SkyMeasurementConfig)
    mask: MaskObjectsConfig = Field(default_factory=MaskObjectsConfig)
    do_mask_objects: bool = Field(True, description="run object masking; True")
    keep_detected: bool = Field(
        True, description="re-flag the detected pixels DETECTED after their replacement so the "
                          "focal-plane and binned residual models ignore them (not in the reference, "
                          "which clears DETECTED and averages the smooth replacement values into "
                          "the sky frame, biasing it toward the 256-px model where objects were)")
    rejection: ExposureRejectionConfig = Field(default_factory=ExposureRejectionConfig)
    n_passes: int = Field(
        1, ge=1, description="build passes (1 = the reference, default). With 2, objects are detected again "
                             "on each image minus its scaled first-pass sky frame, so sky-frame "
                             "structure itself is not flagged as objects (which biases the frame "
                             "low at its peaks through the iterative background of the detection)")


class SkyBuildConfig(BaseModel):
    """A sky-frame build from raw science exposures (the flows' config): the full ISR (bias, dark,
    flat, and the fringe frame where one is certified for the filter), then :class:`SkyConfig`'s
    steps. ``large_scale`` may be left out: the focal-plane cells are then squares as large as the
    camera's largest detector side (as HSC's 8192-px cells are coarser than its 2048x4176 CCDs), so
    detector-scale structure is left for the sky frame."""

    model_config = ConfigDict(extra="forbid")

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(doFringe=True))
    large_scale: FocalPlaneBackgroundConfig | None = Field(
        None, description="focal-plane cells; None = squares of the camera's largest detector side")
    sky: SkyMeasurementConfig = Field(default_factory=SkyMeasurementConfig)
    mask: MaskObjectsConfig = Field(default_factory=MaskObjectsConfig)
    do_mask_objects: bool = Field(True, description="run object masking; True")
    keep_detected: bool = Field(True, description="see SkyConfig.keep_detected")
    rejection: ExposureRejectionConfig = Field(default_factory=ExposureRejectionConfig)

    def sky_config(self, camera: Camera) -> SkyConfig:
        large = self.large_scale
        if large is None:
            side = max(max(d.nx, d.ny) * camera.pixel_size(d) for d in camera.detectors)
            large = FocalPlaneBackgroundConfig(x_size=side, y_size=side)
        return SkyConfig(large_scale=large, sky=self.sky, mask=self.mask, do_mask_objects=self.do_mask_objects,
                         keep_detected=self.keep_detected, rejection=self.rejection)


# ---------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------


def mask_detector(masked_image: MaskedImage, config: SkyConfig) -> np.ndarray:
    """Object masking as the sky build does it (in place); returns the detected pixels."""
    det = mask_objects(masked_image, config.mask)
    if config.keep_detected:
        masked_image.mask[det] |= np.int32(mask_bits(["DETECTED"]))
    return det


def measure_sky_background(masked_image: MaskedImage, config: SkyMeasurementConfig | None = None
                           ) -> BackgroundModel:
    """The binned residual model of one detector (SkyMeasurementTask.measureBackground)."""
    cfg = config or SkyMeasurementConfig()
    return measure_background(masked_image, cfg.background)


def exposure_background(partials: Sequence[FocalPlaneBackground]) -> tuple[FocalPlaneBackground, float]:
    """Merge an exposure's per-detector partial models; the scale is the median of the merged
    stats image (every cell, border and filled ones included, as the reference)."""
    merged = FocalPlaneBackground.merged(partials)
    return merged, float(np.median(merged.get_stats_image()))


def residual_background(camera: Camera, det: Detector, masked_image: MaskedImage,
                        background: FocalPlaneBackground, scale: float,
                        config: SkyMeasurementConfig | None = None, in_place: bool = False
                        ) -> BackgroundModel:
    """Subtract the exposure's focal-plane model, divide by ``scale``, measure the binned model
    (SkyTask.processSingle)."""
    mi = masked_image if in_place else masked_image.copy()
    mi -= background.to_detector_background(camera, det).evaluate()
    mi /= scale
    return measure_sky_background(mi, config)


def average_backgrounds(models: Sequence[BackgroundModel]) -> BackgroundModel:
    """Per-bin MEANCLIP across exposures (SkyMeasurementTask.averageBackgrounds).

    NaN bins are flagged BAD and ignored; bins with no good input get the median of the finite
    output bins.

    Raises
    ------
    ValueError
        If the bboxes or grids differ.
    """
    models = list(models)
    if not models:
        raise ValueError("no backgrounds to average")
    ref = models[0]
    for m in models[1:]:
        if m.bbox != ref.bbox or m.values.shape != ref.values.shape:
            raise ValueError(f"backgrounds differ: bbox {m.bbox} grid {m.values.shape} vs "
                             f"{ref.bbox} {ref.values.shape}")
    data = np.stack([m.values for m in models])
    bad = mask_bits(["BAD"])
    masks = np.where(np.isnan(data), bad, 0).astype(np.int32)
    res = stack_statistic("MEANCLIP", data, masks=masks, ignore_bits=bad)
    values = np.array(res.value, np.float32)
    nan = ~np.isfinite(values)
    if nan.any() and (~nan).any():
        values[nan] = np.median(values[~nan])
    out = BackgroundModel(values, np.sqrt(res.variance), np.sum([m.npoint for m in models], axis=0),
                          ref.bbox, ref.algorithm, ref.undersample_style, False)
    out.meta["NCOMBINE"] = len(models)
    return out


def find_outlier_exposures(models: Mapping[object, Mapping[object, BackgroundModel]],
                           config: ExposureRejectionConfig | None = None) -> dict[object, str]:
    """Exposures whose residual models are outliers, with the reason.

    Parameters
    ----------
    models : {exposure: {detector: BackgroundModel}}
        The binned residual models (dimensionless, in units of each exposure's sky).

    Returns
    -------
    {exposure: reason}
        The per-exposure RMS is that of its bins minus the provisional per-detector average
        (all exposures), pooled over its detectors.
    """
    cfg = config or ExposureRejectionConfig()
    exps = list(models)
    if not cfg.enabled or len(exps) < cfg.min_exposures:
        return {}
    dets = sorted({d for e in exps for d in models[e]}, key=str)
    provisional = {d: average_backgrounds([models[e][d] for e in exps if d in models[e]]) for d in dets}
    rms = {}
    for e in exps:
        res = np.concatenate([(models[e][d].values - provisional[d].values).ravel() for d in models[e]])
        res = res[np.isfinite(res)]
        rms[e] = float(np.sqrt(np.mean(res ** 2))) if res.size else math.inf
    r = np.array([rms[e] for e in exps])
    finite = r[np.isfinite(r)]
    med = float(np.median(finite)) if finite.size else math.inf
    q1, q3 = np.percentile(finite, [25, 75]) if finite.size else (math.nan, math.nan)
    sig = 0.741 * (q3 - q1)
    out = {}
    for e in exps:
        if not np.isfinite(rms[e]):
            out[e] = "no finite bins"
        elif rms[e] > cfg.max_rms:
            out[e] = f"residual RMS {rms[e]:.4g} > max_rms {cfg.max_rms:.4g}"
        elif sig > 0 and rms[e] > med + cfg.n_sigma * sig:
            out[e] = (f"residual RMS {rms[e]:.4g} > median {med:.4g} + {cfg.n_sigma:g} x robust "
                      f"sigma {sig:.3g}")
    return out


@dataclass
class SkyBuildResult:
    """Output of :func:`build_sky_frames`.

    Attributes
    ----------
    frames : {detector id: BackgroundModel}
        The sky frame of each detector (a dimensionless bin grid).
    scales : {exposure: float}
        The sky level (median of the focal-plane model) of each exposure.
    residuals : {exposure: {detector id: BackgroundModel}}
        The binned residual models that were averaged.
    rejected : {exposure: reason}
    used : list of exposures
    """

    frames: dict
    scales: dict
    residuals: dict
    rejected: dict = field(default_factory=dict)
    used: list = field(default_factory=list)


def build_sky_frames(camera: Camera, exposures: Mapping[object, Mapping[int, MaskedImage]],
                     config: SkyConfig) -> SkyBuildResult:
    """The whole build in memory (for notebooks, tests and small runs; the flows run the same
    steps per detector behind barriers). Inputs are not modified.

    Parameters
    ----------
    camera : Camera
    exposures : {exposure: {detector id: MaskedImage}}
        Post-ISR images of one filter.
    config : SkyConfig
    """
    prev = None
    for _ in range(config.n_passes):
        result = _build_pass(camera, exposures, config, prev)
        prev = result
    return result


def _build_pass(camera, exposures, config, prev):
    scales, backgrounds, work = {}, {}, {}
    for e, dets in exposures.items():
        partials = []
        work[e] = {}
        for d, mi in dets.items():
            mi = mi.copy()
            if config.do_mask_objects:
                if prev is not None and d in prev.frames:
                    pattern = np.float32(prev.scales[e]) * prev.frames[d].evaluate()
                    mi.image -= pattern
                    mask_detector(mi, config)
                    mi.image += pattern
                else:
                    mask_detector(mi, config)
            det = camera.detector(d)
            fp = FocalPlaneBackground.from_camera(config.large_scale, camera)
            fp.add_detector(camera, det, mi)
            partials.append(fp)
            work[e][d] = mi
        backgrounds[e], scales[e] = exposure_background(partials)
    residuals = {e: {d: residual_background(camera, camera.detector(d), mi, backgrounds[e], scales[e],
                                            config.sky, in_place=True)
                     for d, mi in dets.items()} for e, dets in work.items()}
    rejected = find_outlier_exposures(residuals, config.rejection)
    used = [e for e in exposures if e not in rejected]
    dets = sorted({d for e in used for d in residuals[e]})
    frames = {d: average_backgrounds([residuals[e][d] for e in used if d in residuals[e]]) for d in dets}
    return SkyBuildResult(frames, scales, residuals, rejected, used)


# ---------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------


def subtract_exposure_background(camera: Camera, images: Mapping[int, MaskedImage],
                                 skies: Mapping[int, np.ndarray], config: SkyConfig) -> float:
    """Object masking and the focal-plane background of one exposure, subtracted in place, before a
    sky frame is fitted (``SkyCorrectionTask``; used by sky-frame application and quality scoring).

    Objects are found on each image minus the sky frame at a provisional scale (the clipped sky
    level), so the frame's own structure is not masked as objects.

    Returns
    -------
    float
        The exposure's sky level (median of its focal-plane background).
    """
    bits = mask_bits(config.sky.stats.mask)
    level = float(np.median([box_statistics(mi.image, mi.mask, bits, [[0, mi.shape[0], 0, mi.shape[1]]],
                                            "MEANCLIP")[0, 0] for mi in images.values()]))
    partials = []
    for d, mi in images.items():
        if config.do_mask_objects:
            provisional = np.float32(level) * skies[d]
            mi.image -= provisional
            mask_detector(mi, config)
            mi.image += provisional
        fp = FocalPlaneBackground.from_camera(config.large_scale, camera)
        fp.add_detector(camera, camera.detector(d), mi)
        partials.append(fp)
    background, sky_level = exposure_background(partials)
    for d, mi in images.items():
        mi -= background.to_detector_background(camera, camera.detector(d)).evaluate()
    return sky_level


def measure_scale(masked_image: MaskedImage, sky_image: np.ndarray,
                  config: SkyMeasurementConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples for the sky-frame scale (SkyMeasurementTask.measureScale).

    Boxes: limits ``linspace(0, W, n+1).astype(int)``, visited x-outer, y-inner; in each, the
    clipped statistic of the image (masked) and of the full-resolution sky frame (no mask).

    Returns
    -------
    image_samples, sky_samples : (nx*ny,) float64 arrays
    """
    cfg = config or SkyMeasurementConfig()
    h, w = masked_image.shape
    xl = np.linspace(0, w, min(cfg.x_num_samples, w) + 1).astype(int)
    yl = np.linspace(0, h, min(cfg.y_num_samples, h) + 1).astype(int)
    boxes = np.array([(yl[j], yl[j + 1], xl[i], xl[i + 1])
                      for i, j in itertools.product(range(xl.size - 1), range(yl.size - 1))])
    st = cfg.stats
    img = box_statistics(masked_image.image, masked_image.mask, mask_bits(st.mask), boxes, st.statistic,
                         st.clip, st.n_iter)[:, 0]
    sky = box_statistics(np.asarray(sky_image, np.float32), None, 0, boxes, st.statistic, st.clip,
                         st.n_iter)[:, 0]
    return img, sky


@dataclass
class ScaleSolution:
    """A fitted sky-frame scale.

    Attributes
    ----------
    scale : float
    error : float
        Least-squares standard error: sqrt(sum(r^2)/(n-1) / sum(sky^2)) over the samples kept.
    n_used, n_total : int
        Samples kept after rejection / offered.
    """

    scale: float
    error: float
    n_used: int
    n_total: int


def solve_scales(samples: Sequence[tuple[np.ndarray, np.ndarray]],
                 config: SkyMeasurementConfig | None = None) -> ScaleSolution:
    """No-intercept least squares ``img = s * sky`` over samples pooled from all detectors, with
    ``sky_iter`` rounds of rejecting ``|r| > sky_rej * 0.741 * IQR(r)``; rejections accumulate
    (SkyMeasurementTask.solveScales)."""
    cfg = config or SkyMeasurementConfig()
    img = np.concatenate([np.asarray(s[0], np.float64).ravel() for s in samples])
    sky = np.concatenate([np.asarray(s[1], np.float64).ravel() for s in samples])
    good = np.isfinite(img) & np.isfinite(sky)

    def fit(sel):
        den = float(np.sum(sky[sel] ** 2))
        return float(np.sum(sky[sel] * img[sel]) / den) if den > 0 else math.nan

    for _ in range(cfg.sky_iter):
        s = fit(good)
        r = img - s * sky
        q1, q3 = np.percentile(r[good], [25.0, 75.0])
        good &= ~(np.abs(r) > cfg.sky_rej * 0.741 * (q3 - q1))
    s = fit(good)
    n = int(good.sum())
    r = (img - s * sky)[good]
    err = math.sqrt(float(np.sum(r ** 2)) / (n - 1) / float(np.sum(sky[good] ** 2))) if n > 1 else math.nan
    return ScaleSolution(s, err, n, int(img.size))


def subtract_sky_frame(masked_image: MaskedImage, sky_image: np.ndarray, scale: float) -> None:
    """image -= scale * sky (image plane only, in place; SkyMeasurementTask.subtractSkyFrame)."""
    masked_image.image -= np.float32(scale) * np.asarray(sky_image, np.float32)


def fit_and_subtract_sky(masked_images: Mapping[int, MaskedImage], frames: Mapping[int, BackgroundModel],
                         config: SkyMeasurementConfig | None = None) -> ScaleSolution:
    """Fit one scale for an exposure (samples pooled over its detectors) and subtract
    ``scale * frame`` from each detector in place; returns the solution."""
    skies = {d: frames[d].evaluate() for d in masked_images}
    sol = solve_scales([measure_scale(mi, skies[d], config) for d, mi in masked_images.items()], config)
    for d, mi in masked_images.items():
        subtract_sky_frame(mi, skies[d], sol.scale)
    return sol
