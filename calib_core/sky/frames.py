"""Sky frames: build and apply (pipe_drivers ``SkyTask`` and pipe_tasks ``SkyMeasurementTask``;
docs/algorithms.md#sky-frames).

Model. After ISR a science exposure j reads ``I_j(x) = L_j(u, v) * (1 + F(x)) + objects + noise``:
``L_j`` is the large-scale illumination of that exposure over the focal plane (sky level times
moonlight gradient; (u, v) are focal-plane mm) and ``F`` is the camera's small-scale response to
sky light (scattered light, ghosts, edge glow), the same for every exposure of a filter. The sky
frame is ``F``, stored as a 32-px binned model per detector (dimensionless).

Build, per filter, as the reference's barriers (each step a plain function, so a flow maps it per
(exposure, detector) and gathers at the barrier):

1. per (exposure, detector): object masking (:func:`mask_detector`) and the 32-px binned model of
   the masked image (:func:`measure_sky_background`): bin means in ADU, their errors, NPOINT;
2. per filter, on bins only (cheap): :func:`solve_sky_frames` alternates
   a. per exposure, a smooth surface ``L_j`` (a polynomial of order 2 in focal-plane mm, fitted
      to every bin of the exposure divided by ``1 + F``; :func:`fit_surface`),
   b. per (exposure, detector) the residual ``R_j = I_j / L_j - 1`` (:func:`exposure_residuals`),
   c. :func:`find_outlier_exposures` (structure above noise against the per-bin median),
   d. per detector ``F`` = per-bin MEANCLIP of the kept residuals (:func:`average_backgrounds`);
3. per detector the product is ``F``.

Where calibflow departs from the reference, and why (each measured against injected truth on
simulated nights; docs/algorithms.md#departures-from-the-reference-and-why):

* The reference removes each exposure's large-scale background with ``FocalPlaneBackground``: cell
  means on a grid as coarse as a detector, bilinearly interpolated. That cannot follow a moonlight
  gradient of a few per cent (0.4-1.4 % RMS left on a small focal plane) and it absorbs the part of
  the pattern that varies on the cell scale, differently at each cell boundary. A polynomial
  surface follows linear and quadratic gradients exactly and takes from the pattern only its
  quadratic part, which no single exposure can tell from illumination anyway.
* The reference subtracts the background and divides by one scale per exposure, so the pattern
  enters each residual multiplied by that exposure's gradient (``L_j(u,v)/median(L_j)``, up to
  +-10 %). Dividing by the surface gives ``F`` itself whatever the gradient.
* The surface is refitted with the current frame divided out (``n_iter`` alternations), so the
  pattern does not pull it.
* Exposures are rejected on structure above their own noise, not on an absolute RMS that the
  pipeline's own leftovers can exceed; a build that would reject most of a night refuses loudly.

Apply (:func:`fit_sky`, :func:`apply_sky_frame`): mask objects on the image minus a provisional
sky, bin it, then alternate the surface fit and a single scale ``s`` pooled over all bins of the
exposure (``I/L - 1 = s * F``; :func:`solve_scales`, the reference's no-intercept fit with
clipping, on bins instead of 4x4 boxes per detector); subtract ``L * (1 + s * F)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calib_core.camera import Camera, Detector
from calib_core.configmodel import ClipConfig
from calib_core.errors import DataError
from calib_core.isr.process import IsrConfig
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.sky.objectmask import MaskObjectsConfig, mask_objects
from calib_core.sky.streaks import StreakConfig, find_streaks, streak_reason
from calib_core.stats.background import BackgroundConfig, BackgroundModel, bin_centres, measure_background
from calib_core.stats.binned import box_statistics
from calib_core.stats.clipped import stack_statistic
from calib_core.stats.warnfilters import nanmedian_quiet

__all__ = [
    "SkyStatsConfig", "SkyMeasurementConfig", "ExposureRejectionConfig", "LargeScaleConfig", "SkyConfig",
    "SkyBuildConfig", "SkyRejectionError", "ScaleSolution", "SkySurface", "SkyBuildResult", "mask_detector",
    "measure_sky_background", "fit_surface", "exposure_residuals", "average_backgrounds",
    "find_outlier_exposures", "normalise_frames", "solve_sky_frames", "build_sky_frames", "measure_scale", "solve_scales",
    "subtract_sky_frame", "fit_sky", "apply_sky_frame", "bin_coordinates",
]


def _sky_background_default() -> BackgroundConfig:
    return BackgroundConfig(bin_size=32, grid="round", algorithm="NATURAL_SPLINE", use_approx=False,
                            ignored_mask_planes=["SAT", "BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE",
                                                 "NO_DATA", "INTRP"])


class SkyStatsConfig(ClipConfig):
    """Statistics of the scale samples (pipe_tasks SkyStatsConfig)."""

    model_config = ConfigDict(extra="forbid")
    renamed_keys: ClassVar[dict[str, str]] = {"clip": "nsigma", "n_iter": "niter"}

    statistic: Literal["MEANCLIP", "MEAN", "MEDIAN"] = Field("MEANCLIP", description="box statistic")
    mask: list[str] = Field(default_factory=lambda: ["SAT", "DETECTED", "DETECTED_NEGATIVE", "BAD",
                                                     "NO_DATA"], description="planes ignored")


class SkyMeasurementConfig(BaseModel):
    """pipe_tasks SkyMeasurementConfig (docs/algorithms.md#sky-frames)."""

    model_config = ConfigDict(extra="forbid")

    sky_iter: int = Field(3, ge=1, description="rejection rounds in solve_scales")
    sky_rej: float = Field(3.0, gt=0, description="rejection threshold (sigma) in solve_scales")
    background: BackgroundConfig = Field(
        default_factory=_sky_background_default,
        description="binned model: 32-px bins, nx = max(int(W/32+0.5), 1), MEANCLIP, "
                    "NATURAL_SPLINE, no approximation, mask SAT/BAD/EDGE/DETECTED/"
                    "DETECTED_NEGATIVE/NO_DATA/INTRP")
    x_num_samples: int = Field(4, ge=1, description="scale samples along x per detector (measure_scale)")
    y_num_samples: int = Field(4, ge=1, description="scale samples along y per detector (measure_scale)")
    stats: SkyStatsConfig = Field(default_factory=SkyStatsConfig)


class LargeScaleConfig(ClipConfig):
    """Each exposure's large-scale illumination: a polynomial surface over the focal plane."""

    model_config = ConfigDict(extra="forbid")
    renamed_keys: ClassVar[dict[str, str]] = {"clip": "nsigma", "n_clip": "niter"}

    order: int = Field(2, ge=0, le=6, description="total order of the polynomial in focal-plane (u, v); 2 "
                                                  "follows linear and quadratic (moonlight) gradients")
    nsigma: float = Field(4.0, gt=0, description="bins further than this many robust sigma from the surface "
                                               "are left out of its fit")
    niter: int = Field(3, ge=0, description="clip passes of the surface fit")


class ExposureRejectionConfig(BaseModel):
    """Rejection of whole exposures whose residual is not the night's pattern plus noise (not in the
    reference; it replaces DES's 0.5 % RMS cut by one relative to each exposure's own noise)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="apply the cut")
    max_excess: float = Field(0.002, gt=0, description="reject when the RMS of the residual against the per-bin "
                                                       "median of all exposures, less the bins' noise in "
                                                       "quadrature, exceeds this fraction of the sky")
    outlier_sigma: float = Field(5.0, gt=0, description="a bin is an outlier beyond this many sigma of its "
                                                        "noise from the per-bin median")
    max_outlier_fraction: float = Field(0.02, gt=0, le=1, description="reject when more than this fraction of the "
                                                                      "exposure's bins are outliers")
    min_outlier_bins: int = Field(4, ge=1, description="... and at least this many")
    max_lost_bins: float = Field(0.05, gt=0, le=1, description="reject when masking left the exposure this fraction "
                                                              "fewer usable bins than the night's median exposure "
                                                              "(a trail, glow or cloud detected as objects)")
    min_exposures: int = Field(3, ge=1, description="never reject when fewer exposures")
    max_rejected_fraction: float = Field(
        0.5, gt=0, le=1, description="a cut that would reject more than this fraction of the exposures is not "
                                     "applied: the build never makes a frame from the few left")
    on_mass_rejection: Literal["warn", "fail"] = Field(
        "warn", description="what such a cut does: 'warn' builds from every exposure and records the refused "
                            "cut with its reasons (logged as a warning, kept in the result and the product's "
                            "stats); 'fail' raises SkyRejectionError")
    streak: StreakConfig = Field(
        default_factory=StreakConfig,
        description="reject an exposure crossed by a straight masked or bright strip that runs across the focal "
                    "plane (a satellite trail; calib_core/sky/streaks.py); checked before the other rules")


class SkyConfig(BaseModel):
    """Everything a sky-frame build (and apply-sky) needs; the flows' config of the ``sky`` type.

    The ISR is the full one (bias, dark, flat, the fringe frame where one is certified for the
    filter) with bad pixels interpolated, so no garbage value reaches object detection."""

    model_config = ConfigDict(extra="forbid")

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_fringe=True, do_interpolate=True))
    large_scale: LargeScaleConfig = Field(default_factory=LargeScaleConfig)
    sky: SkyMeasurementConfig = Field(default_factory=SkyMeasurementConfig)
    mask: MaskObjectsConfig = Field(default_factory=MaskObjectsConfig)
    do_mask_objects: bool = Field(True, description="run object masking")
    keep_detected: bool = Field(
        True, description="re-flag the detected pixels DETECTED after their replacement so the binned "
                          "models ignore them (not in the reference, which clears DETECTED and averages "
                          "the smooth replacement values into the sky frame)")
    rejection: ExposureRejectionConfig = Field(default_factory=ExposureRejectionConfig)
    n_iter: int = Field(3, ge=1, description="alternations of the per-exposure surfaces and the frame")
    n_passes: int = Field(
        2, ge=1, le=3, description="build passes; 2. The first, without object masking, gives a guiding sky; the "
                                   "second detects objects down to the noise on each image minus that sky, so faint "
                                   "objects are masked and the pattern is not. 1 = a single pass, masking with "
                                   "the pattern in the image")

    guide_masks_objects: bool = Field(
        False, description="mask objects in the passes before the last; False. Those passes only guide the "
                           "next one's masking; unmasked, their per-bin clipped mean across exposures already "
                           "drops the bright objects, while any detection there (which must run with the "
                           "pattern still in the image) masks pattern peaks and biases the guide low at them")

    def pass_config(self, k: int) -> "SkyConfig":
        """The config of pass ``k`` (0-based). Every pass but the last only guides the next pass's
        masking: it masks objects only with ``guide_masks_objects`` and rejects no exposure."""
        if k >= self.n_passes - 1:
            return self
        cfg = self.model_copy(deep=True)
        cfg.do_mask_objects = self.guide_masks_objects
        # no exposure is rejected on a guiding pass: its unmasked objects would make outlier bins;
        # the per-bin clipped mean keeps a single bad exposure out of it
        cfg.rejection.enabled = False
        # the guiding frame is measured on bins half the product's size, so it follows structure
        # narrower than the product's bins (a ghost ring, glow along an edge) closely enough that
        # the remainder stays below the next pass's detection threshold
        cfg.sky.background.bin_size = max(cfg.sky.background.bin_size // 2, 4)
        return cfg


#: the flows' name for the sky config (one model: ``SkyConfig``)
SkyBuildConfig = SkyConfig


class SkyRejectionError(DataError):
    """The exposure cut would reject most of a night: the build refuses instead of building from
    the few exposures left."""


# ---------------------------------------------------------------------------------------------------
# surfaces
# ---------------------------------------------------------------------------------------------------


def _fp_frame(camera: Camera) -> tuple[float, float, float]:
    """Centre (u0, v0) and half-size R of the focal plane, mm: polynomial terms use (u-u0)/R."""
    corners = np.array([camera.detector_corners_mm(d) for d in camera.detectors])
    xmin, xmax = corners[:, 0].min(), corners[:, 1].max()
    ymin, ymax = corners[:, 2].min(), corners[:, 3].max()
    return (xmin + xmax) / 2.0, (ymin + ymax) / 2.0, max(xmax - xmin, ymax - ymin) / 2.0


def _terms(order: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Design matrix (n, k) of the monomials a**i * b**j, i + j <= order."""
    cols = [a ** i * b ** j for n in range(order + 1) for j in range(n + 1) for i in (n - j,)]
    return np.stack([np.broadcast_to(c, np.broadcast(a, b).shape) for c in cols], axis=-1)


def weighted_lstsq(A: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The coefficients c minimising ``sum w (A c - y)**2`` (``w`` = 0 leaves a row out).

    By the normal equations ``(A'WA) c = A'Wy``: a surface has a handful of terms on coordinates
    scaled to [-1, 1], so the 6 x 6 system is well conditioned and its solution agrees with an
    SVD of the whole weighted design matrix (``numpy.linalg.lstsq``, which cost ~80 ms for the
    318k bins of a 40-CCD exposure, four times a fit) to ~1e-13 (tests/test_sky.py). Where the
    system is ill conditioned (condition number above 1e8: too few bins, or bins on a line) the
    SVD solves it, as before (docs/algorithms.md#focal-plane-surface-solve)."""
    Aw = A * w[:, None]
    normal = Aw.T @ A
    try:
        if np.linalg.cond(normal) < 1e8:
            return np.linalg.solve(normal, Aw.T @ y)
    except np.linalg.LinAlgError:
        pass
    ok = w > 0
    sw = np.sqrt(w[ok])
    return np.linalg.lstsq(A[ok] * sw[:, None], y[ok] * sw, rcond=None)[0]


@dataclass
class SkySurface:
    """A polynomial over the focal plane: ``L(u, v) = sum c_k ((u-u0)/R)**i ((v-v0)/R)**j``.

    Attributes
    ----------
    coeffs : (k,) float64 array
        In the order of :func:`_terms` (1, a, b, a^2, ab, b^2, ...).
    order : int
    centre : (u0, v0), mm
    half_size : float, mm
    n_used, n_total : int
        Bins kept by the clipped fit / offered.
    """

    coeffs: np.ndarray
    order: int
    centre: tuple[float, float]
    half_size: float
    n_used: int = 0
    n_total: int = 0

    def at(self, u, v) -> np.ndarray:
        """The surface at focal-plane mm (arrays broadcast)."""
        a = (np.asarray(u, np.float64) - self.centre[0]) / self.half_size
        b = (np.asarray(v, np.float64) - self.centre[1]) / self.half_size
        return _terms(self.order, a, b) @ self.coeffs

    def on_detector(self, camera: Camera, det: Detector, x=None, y=None) -> np.ndarray:
        """(len(y), len(x)) float32 image of the surface on pixel columns ``x`` and rows ``y`` of a
        detector (default: every pixel)."""
        x = np.arange(det.nx, dtype=np.float64) if x is None else np.asarray(x, np.float64)
        y = np.arange(det.ny, dtype=np.float64) if y is None else np.asarray(y, np.float64)
        u, v = camera.pixel_to_focal_plane(det, x[None, :], y[:, None])
        a = (np.asarray(u, np.float64) - self.centre[0]) / self.half_size
        b = (np.asarray(v, np.float64) - self.centre[1]) / self.half_size
        # a detector is placed by quarter turns, so u and v each vary along one pixel axis only;
        # the polynomial is then (powers along y) @ coefficients @ (powers along x), a small
        # matrix product instead of a (pixels x terms) design matrix (the same values to float64
        # rounding; tests/test_sky.py)
        ny, nx = y.size, x.size
        cm = np.zeros((self.order + 1, self.order + 1))    # cm[j, i]: the coefficient of a**i b**j
        k = 0
        for n in range(self.order + 1):
            for j in range(n + 1):
                cm[j, n - j] = self.coeffs[k]
                k += 1
        powers = np.arange(self.order + 1)
        if a.shape == (1, nx) and b.shape == (ny, 1):          # u along x, v along y
            out = (b[:, 0, None] ** powers) @ cm @ (a[0, :, None] ** powers).T
        elif a.shape == (ny, 1) and b.shape == (1, nx):        # u along y, v along x
            out = (a[:, 0, None] ** powers) @ cm.T @ (b[0, :, None] ** powers).T
        else:
            gx, gy = np.meshgrid(x, y)
            return self.at(*camera.pixel_to_focal_plane(det, gx, gy)).astype(np.float32)
        return out.astype(np.float32)

    @property
    def level(self) -> float:
        """The surface at the focal-plane centre (the exposure's sky level, ADU)."""
        return float(self.coeffs[0])


def bin_coordinates(camera: Camera, det: Detector, model: BackgroundModel) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane mm (u, v) of the bin centres of a binned model of a detector, (ny_bins, nx_bins)."""
    gx, gy = np.meshgrid(bin_centres(model.x_edges), bin_centres(model.y_edges))
    u, v = camera.pixel_to_focal_plane(det, gx, gy)
    return np.asarray(u, np.float64), np.asarray(v, np.float64)


def _frame_values(frames, d, scale: float):
    if frames is None or d not in frames:
        return None
    f = frames[d].values if isinstance(frames[d], BackgroundModel) else np.asarray(frames[d])
    return 1.0 + scale * np.where(np.isfinite(f), f, 0.0)


def fit_surface(camera: Camera, models: Mapping[int, BackgroundModel], config: LargeScaleConfig | None = None,
                frames: Mapping[int, BackgroundModel | np.ndarray] | None = None, scale: float = 1.0
                ) -> SkySurface:
    """The exposure's large-scale surface, fitted to the bins of all its detectors.

    Parameters
    ----------
    models : {detector id: BackgroundModel}
        Binned models of the exposure's masked images (ADU).
    frames : {detector id: BackgroundModel or bin values}, optional
        The current sky frame: the bins are divided by ``1 + scale * F`` before the fit, so the
        pattern does not pull the surface.

    The fit is least squares weighted by each bin's NPOINT (the noise per pixel is nearly the
    same over an exposure), with ``n_clip`` passes dropping bins beyond ``clip`` x 1.4826 MAD of the
    residuals (unmasked object wings, a satellite trail).

    Raises
    ------
    ValueError
        If fewer good bins than terms remain.
    """
    cfg = config or LargeScaleConfig()
    u0, v0, half = _fp_frame(camera)
    us, vs, vals, wts = [], [], [], []
    for d, m in models.items():
        u, v = bin_coordinates(camera, camera.detector(d), m)
        val = m.values.astype(np.float64)
        fv = _frame_values(frames, d, scale)
        if fv is not None:
            val = val / fv
        ok = np.isfinite(val) & (m.npoint > 0)
        us.append(u[ok])
        vs.append(v[ok])
        vals.append(val[ok])
        wts.append(m.npoint[ok].astype(np.float64))
    u, v, val, w = (np.concatenate(a) for a in (us, vs, vals, wts))
    A = _terms(cfg.order, (u - u0) / half, (v - v0) / half)
    if val.size < A.shape[1]:
        raise ValueError(f"only {val.size} good bins for a surface of {A.shape[1]} terms")
    keep = np.ones(val.size, bool)
    coef = None
    for it in range(cfg.niter + 1):
        coef = weighted_lstsq(A, val, np.where(keep, w, 0.0))
        if it == cfg.niter:
            break
        r = val - A @ coef
        med = np.median(r[keep])
        sig = 1.4826 * np.median(np.abs(r[keep] - med))
        new = np.abs(r - med) <= cfg.nsigma * sig if sig > 0 else keep
        if new.sum() < A.shape[1] or np.array_equal(new, keep):
            break
        keep = new
    return SkySurface(coef, cfg.order, (u0, v0), half, int(keep.sum()), int(val.size))


def exposure_residuals(camera: Camera, models: Mapping[int, BackgroundModel], surface: SkySurface
                       ) -> dict[int, BackgroundModel]:
    """``R = I / L - 1`` per detector (values and errors divided by the surface at each bin)."""
    out = {}
    for d, m in models.items():
        L = surface.at(*bin_coordinates(camera, camera.detector(d), m))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = m.copy()
            r.values = (m.values / L - 1.0).astype(np.float32)
            r.errors = (m.errors / np.abs(L)).astype(np.float32)
        out[d] = r
    return out


# ---------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------


def mask_detector(masked_image: MaskedImage, config: SkyConfig, variance_median: float | None = None) -> np.ndarray:
    """Object masking as the sky build does it (in place); returns the detected pixels.
    ``variance_median``: see :func:`calib_core.sky.objectmask.find_objects`."""
    det = mask_objects(masked_image, config.mask, variance_median)
    if config.keep_detected:
        masked_image.mask[det] |= np.int32(mask_bits(["DETECTED"]))
    return det


def measure_sky_background(masked_image: MaskedImage, config: SkyMeasurementConfig | None = None
                           ) -> BackgroundModel:
    """The 32-px binned model of one detector (SkyMeasurementTask.measureBackground)."""
    cfg = config or SkyMeasurementConfig()
    return measure_background(masked_image, cfg.background)


def average_backgrounds(models: Sequence[BackgroundModel]) -> BackgroundModel:
    """Per-bin MEANCLIP across exposures (SkyMeasurementTask.averageBackgrounds).

    NaN bins are flagged BAD and ignored; bins with no good input get the median of the finite
    output bins. ``errors`` is the combined error of each bin: sqrt(sum of the inputs' squared
    errors) / N (the noise of the mean of independent inputs; the clip's small loss of efficiency
    is not included).

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
    errs = np.stack([m.errors for m in models]).astype(np.float64)
    n = np.sum(np.isfinite(data) & np.isfinite(errs), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.sqrt(np.nansum(np.where(np.isfinite(data), errs ** 2, np.nan), axis=0)) / n
    out = BackgroundModel(values, err, np.sum([m.npoint for m in models], axis=0),
                          ref.bbox, ref.algorithm, ref.undersample_style, False)
    out.meta["NCOMBINE"] = len(models)
    return out


@dataclass
class ExposureStructure:
    """What :func:`find_outlier_exposures` measured of one exposure."""

    excess: float               # RMS structure above noise, fraction of the sky
    noise: float                # RMS bin noise, fraction of the sky
    outlier_bins: int           # over the exposure
    bins: int                   # usable bins of the exposure (finite, with a fifth of the typical NPOINT)


def exposure_structure(models: Mapping[object, Mapping[object, BackgroundModel]], outlier_sigma: float = 5.0
                       ) -> dict[object, ExposureStructure]:
    """Each exposure's residual against the per-bin median of all exposures, in units of noise.

    ``r = R_j - median_k R_k`` per bin, with noise ``e_j * sqrt(1 + (pi/2) / N)`` (the median of N
    values has ~pi/2 times the variance of their mean). ``excess = sqrt(max(mean r^2 - mean
    noise^2, 0))``; outlier bins have ``|r| > outlier_sigma * noise``."""
    exps = list(models)
    dets = sorted({d for e in exps for d in models[e]}, key=str)
    med = {}
    for d in dets:
        stack = np.stack([models[e][d].values.astype(np.float64) for e in exps if d in models[e]])
        med[d] = nanmedian_quiet(stack, axis=0)     # a bin empty in every exposure: NaN, left out below
    n = len(exps)
    out = {}
    for e in exps:
        # a bin's own error is unreliable when few pixels are left in it (masked objects): it is
        # floored at the exposure's typical per-pixel noise over sqrt(NPOINT), and bins with under a
        # fifth of the typical NPOINT are left out
        npt = np.concatenate([m.npoint.ravel() for m in models[e].values()]).astype(np.float64)
        err = np.concatenate([m.errors.ravel() for m in models[e].values()]).astype(np.float64)
        good = np.isfinite(err) & (npt > 0)
        pix = float(np.median(err[good] * np.sqrt(npt[good]))) if good.any() else math.nan
        n_typ = float(np.median(npt[good])) if good.any() else 0.0
        rs, ns, n_out, n_all = [], [], 0, 0
        for d, m in models[e].items():
            r = m.values.astype(np.float64) - med[d]
            npd = m.npoint.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                noise = np.fmax(m.errors.astype(np.float64), pix / np.sqrt(npd))
            noise *= math.sqrt(1 + (math.pi / 2) / max(n, 1))
            ok = np.isfinite(r) & np.isfinite(noise) & (noise > 0) & (npd >= 0.2 * n_typ)
            rs.append(r[ok])
            ns.append(noise[ok])
            n_out += int(np.sum(np.abs(r[ok]) > outlier_sigma * noise[ok]))
            n_all += int(ok.sum())
        r, noise = np.concatenate(rs), np.concatenate(ns)
        if r.size == 0:
            out[e] = ExposureStructure(math.inf, math.nan, 0, 0)
            continue
        ms = float(np.mean(r ** 2) - np.mean(noise ** 2))
        out[e] = ExposureStructure(math.sqrt(max(ms, 0.0)), float(np.sqrt(np.mean(noise ** 2))), n_out, n_all)
    return out


def find_outlier_exposures(models: Mapping[object, Mapping[object, BackgroundModel]],
                           config: ExposureRejectionConfig | None = None, *, camera: Camera | None = None
                           ) -> dict[object, str]:
    """Exposures whose residual is not the night's pattern plus noise, with the reason.

    Parameters
    ----------
    models : {exposure: {detector: BackgroundModel}}
        The binned residuals ``I/L - 1`` (dimensionless), with errors and NPOINT.
    camera : optional
        Places the bins on the focal plane for the satellite-trail rule (``config.streak``); without
        it that rule does not run.

    Returns
    -------
    {exposure: reason}

    Raises
    ------
    SkyRejectionError
        If more than ``max_rejected_fraction`` of the exposures would be rejected.
    """
    cfg = config or ExposureRejectionConfig()
    exps = list(models)
    if not cfg.enabled or len(exps) < cfg.min_exposures:
        return {}
    st = exposure_structure(models, cfg.outlier_sigma)
    typical = float(np.median([s.bins for s in st.values()]))
    # satellite trails (calib_core/sky/streaks.py): a straight strip across the focal plane
    streaks = find_streaks(camera, models, cfg.streak) if camera is not None and cfg.streak.enabled else {}
    out = {}
    for e in exps:
        s = st[e]
        if not math.isfinite(s.excess):
            out[e] = "no finite bins"
        elif e in streaks and streaks[e].qualifies:
            out[e] = streak_reason(streaks[e])
        elif s.bins < (1 - cfg.max_lost_bins) * typical:
            out[e] = (f"object masking left {s.bins} usable bins against the night's median {typical:.0f} "
                      f"(more than {cfg.max_lost_bins:.0%} fewer): something large was detected as objects "
                      f"(a trail, glow or cloud)")
        elif s.excess > cfg.max_excess:
            out[e] = (f"structure above noise {s.excess:.3%} of the sky > max_excess {cfg.max_excess:.3%} "
                      f"(bin noise {s.noise:.3%})")
        elif s.outlier_bins >= cfg.min_outlier_bins and s.outlier_bins > cfg.max_outlier_fraction * s.bins:
            out[e] = (f"{s.outlier_bins} of {s.bins} bins beyond {cfg.outlier_sigma:g} sigma of their noise "
                      f"(> {cfg.max_outlier_fraction:.0%}): a local defect (trail, glow)")
    if len(out) > cfg.max_rejected_fraction * len(exps):
        listing = "; ".join(f"{e}: {r}" for e, r in list(out.items())[:5])
        raise SkyRejectionError(
            f"the exposure cut would reject {len(out)} of {len(exps)} exposures (more than "
            f"max_rejected_fraction {cfg.max_rejected_fraction:g}), which says more about the night or the "
            f"model than about the exposures; refusing to build from the rest. First reasons: {listing}. "
            f"Raise rejection.max_excess or disable rejection (rejection.enabled=false) to build anyway")
    return out


@dataclass
class SkyBuildResult:
    """Output of :func:`solve_sky_frames` / :func:`build_sky_frames`.

    Attributes
    ----------
    frames : {detector id: BackgroundModel}
        The sky frame of each detector (a dimensionless bin grid).
    scales : {exposure: float}
        Each exposure's sky level (its surface at the focal-plane centre, ADU).
    residuals : {exposure: {detector id: BackgroundModel}}
        The binned residuals ``I/L - 1`` of the last alternation.
    surfaces : {exposure: SkySurface}
    warning : str
        Set when the exposure cut would have rejected most of the night and was not applied.
    rejected : {exposure: reason}
    used : list of exposures
    """

    frames: dict
    scales: dict
    residuals: dict
    rejected: dict = field(default_factory=dict)
    used: list = field(default_factory=list)
    surfaces: dict = field(default_factory=dict)
    warning: str = ""


def normalise_frames(camera: Camera, frames: Mapping[int, BackgroundModel], config: LargeScaleConfig | None = None
                     ) -> dict[int, BackgroundModel]:
    """Divide ``1 + F`` by its own large-scale surface (the same polynomial as the exposures'),
    fitted over the whole focal plane: the frame keeps only structure that no exposure's surface
    can take, and ``I / (1 + F)`` stays as smooth as the illumination (a frame carrying a
    quadratic ``Q`` would make it ``L * Q``, whose quartic part the surface misses, by
    ``gradient x (Q - 1)``). Which quadratic the frame carries is arbitrary (only the product
    ``L (1 + F)`` is observed), so this choice loses nothing."""
    ones = {d: BackgroundModel((1.0 + f.values.astype(np.float64)), f.errors, f.npoint, f.bbox)
            for d, f in frames.items()}
    surface = fit_surface(camera, ones, config)
    out = {}
    for d, f in frames.items():
        L = surface.at(*bin_coordinates(camera, camera.detector(d), f))
        g = f.copy()
        g.values = ((1.0 + f.values) / L - 1.0).astype(np.float32)
        g.errors = (f.errors / np.abs(L)).astype(np.float32)
        out[d] = g
    return out


def solve_sky_frames(camera: Camera, binned: Mapping[object, Mapping[int, BackgroundModel]],
                     config: SkyConfig | None = None, frames: Mapping[int, BackgroundModel] | None = None
                     ) -> SkyBuildResult:
    """The build's barrier, on binned models only: alternate surfaces, residuals and the per-bin
    average ``n_iter`` times, rejecting exposures on the last (see the module docstring).

    Parameters
    ----------
    binned : {exposure: {detector id: BackgroundModel}}
        Binned models of the masked post-ISR images (ADU), one per (exposure, detector).
    frames : optional
        A first estimate of the frame (a previous pass's), divided out of the first surface fits.
    """
    cfg = config or SkyConfig()
    rejected, warning = {}, ""
    exps = list(binned)
    if frames is not None:      # a previous pass's frame, on this pass's bins
        first = binned[exps[0]]
        frames = {d: (f.values if f.values.shape == first[d].values.shape
                      else f.evaluate(bin_centres(first[d].x_edges), bin_centres(first[d].y_edges)))
                  for d, f in frames.items() if d in first}
    for it in range(cfg.n_iter):
        surfaces = {e: fit_surface(camera, binned[e], cfg.large_scale, frames) for e in exps}
        residuals = {e: exposure_residuals(camera, binned[e], surfaces[e]) for e in exps}
        # earlier alternations carry the pattern's pull on the surfaces: only the converged
        # residuals judge an exposure (the per-bin clipped mean keeps outliers out meanwhile)
        rejected = {}
        if it == cfg.n_iter - 1:
            try:
                rejected = find_outlier_exposures(residuals, cfg.rejection, camera=camera)
            except SkyRejectionError as exc:
                if cfg.rejection.on_mass_rejection == "fail":
                    raise
                warning = f"exposure rejection not applied: {exc}"
        used = [e for e in exps if e not in rejected]
        dets = sorted({d for e in used for d in residuals[e]})
        frames = normalise_frames(camera, {d: average_backgrounds([residuals[e][d] for e in used if d in residuals[e]])
                                           for d in dets}, cfg.large_scale)
    return SkyBuildResult(frames, {e: surfaces[e].level for e in exps}, residuals, rejected,
                          [e for e in exps if e not in rejected], surfaces, warning)


def build_sky_frames(camera: Camera, exposures: Mapping[object, Mapping[int, MaskedImage]],
                     config: SkyConfig | None = None,
                     variance_medians: Mapping[object, Mapping[int, float | None]] | None = None) -> SkyBuildResult:
    """The whole build in memory (for notebooks, tests and small runs; the flows run the same
    functions per (exposure, detector) and :func:`solve_sky_frames` at their barrier). Inputs are
    not modified.

    Parameters
    ----------
    exposures : {exposure: {detector id: MaskedImage}}
        Post-ISR images of one filter.
    variance_medians : {exposure: {detector id: float}}, optional
        Each image's :func:`~calib_core.sky.objectmask.detection_variance_median`, for images without
        their variance plane (the sky build's intermediates keep the median in their record instead).
    """
    cfg = config or SkyConfig()
    vms = variance_medians or {}
    result = None
    for k in range(cfg.n_passes):
        pcfg = cfg.pass_config(k)
        binned = {e: {d: bin_detector(camera, d, mi, pcfg, result and _pass_pattern(camera, result, e, d),
                                      vms.get(e, {}).get(d))
                      for d, mi in dets.items()} for e, dets in exposures.items()}
        result = solve_sky_frames(camera, binned, pcfg, result and result.frames)
    return result


def _pass_pattern(camera: Camera, result: SkyBuildResult, e, d) -> np.ndarray | None:
    """The whole sky model ``L * (1 + F)`` of a previous pass at full resolution: a later pass detects
    on the image minus it (objects and noise only), so neither the pattern nor a gradient across the
    detector (which the detection's 1024-px background cannot follow on a small detector) is
    mistaken for objects."""
    if d not in result.frames or e not in result.surfaces:
        return None
    det = camera.detector(d)
    return result.surfaces[e].on_detector(camera, det) * (1.0 + result.frames[d].evaluate())


def bin_detector(camera: Camera, d: int, masked_image: MaskedImage, config: SkyConfig,
                 pattern: np.ndarray | None = None, variance_median: float | None = None) -> BackgroundModel:
    """Step 1 of the build for one (exposure, detector), on a copy: objects masked (on the image
    minus ``pattern`` when given, a previous pass's sky structure), then the binned model.
    ``variance_median``: the image's :func:`~calib_core.sky.objectmask.detection_variance_median`,
    when its variance plane is not at hand (the intermediates do not keep it)."""
    mi = masked_image.copy()
    if config.do_mask_objects:
        if pattern is not None:
            mi.image -= pattern
            mask_detector(mi, config, variance_median)
            mi.image += pattern
        else:
            mask_detector(mi, config, variance_median)
    return measure_sky_background(mi, config.sky)


# ---------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------


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
                         st.nsigma, st.niter)[:, 0]
    sky = box_statistics(np.asarray(sky_image, np.float32), None, 0, boxes, st.statistic, st.nsigma,
                         st.niter)[:, 0]
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


def fit_sky(camera: Camera, binned: Mapping[int, BackgroundModel], frames: Mapping[int, BackgroundModel],
            config: SkyConfig | None = None) -> tuple[SkySurface, ScaleSolution]:
    """The surface and the sky-frame scale of one exposure from its binned masked images.

    Alternates ``n_iter`` times: the surface fitted to ``I / (1 + s F)``, then ``s`` from
    ``I/L - 1 = s F`` over every bin of every detector (:func:`solve_scales`: no intercept,
    clipped), starting from ``s = 1`` (the scale of the exposures the frame was built from)."""
    cfg = config or SkyConfig()
    sol = ScaleSolution(1.0, math.nan, 0, 0)
    surface = None
    for _ in range(max(cfg.n_iter, 2)):
        surface = fit_surface(camera, binned, cfg.large_scale, frames, sol.scale)
        resid = exposure_residuals(camera, binned, surface)
        samples = [(resid[d].values, frames[d].values) for d in binned if d in frames]
        sol = solve_scales(samples, cfg.sky)
    return surface, sol


def apply_sky_frame(camera: Camera, images: Mapping[int, MaskedImage], frames: Mapping[int, BackgroundModel],
                    config: SkyConfig | None = None, binned: Mapping[int, BackgroundModel] | None = None
                    ) -> tuple[SkySurface, ScaleSolution]:
    """Sky-correct one exposure in place: objects masked on the image minus a provisional sky (the
    frame at scale 1 on a first surface), bins measured, :func:`fit_sky`, then
    ``image -= L * (1 + s * F)``: the output holds objects and noise only.

    Parameters
    ----------
    images : {detector id: MaskedImage}
        Post-ISR images of one exposure (modified: image plane, and DETECTED where objects are).
    frames : {detector id: BackgroundModel}
        The sky frame.
    binned : optional
        Binned models of the masked images, if already measured.
    """
    cfg = config or SkyConfig()
    full = {d: frames[d].evaluate() for d in images}
    if binned is None:
        first = {d: measure_sky_background(mi, cfg.sky) for d, mi in images.items()}
        provisional = fit_surface(camera, first, cfg.large_scale, frames, 1.0)
        binned = {}
        for d, mi in images.items():
            work = mi.copy()
            if cfg.do_mask_objects:
                # detection replaces the objects' pixels by a smooth background: done on a copy,
                # only the mask comes back, so the output keeps its objects
                model = provisional.on_detector(camera, camera.detector(d)) * (1.0 + full[d])
                work.image -= model
                mask_detector(work, cfg)
                work.image += model
                mi.mask |= work.mask & np.int32(mask_bits(["DETECTED", "DETECTED_NEGATIVE"]))
            binned[d] = measure_sky_background(work, cfg.sky)
    surface, sol = fit_sky(camera, binned, frames, cfg)
    for d, mi in images.items():
        L = surface.on_detector(camera, camera.detector(d))
        mi.image -= L * (np.float32(1.0) + np.float32(sol.scale) * full[d])
    return surface, sol
