"""Object masking for sky frames (pipe_tasks ``MaskObjectsTask``, docs/algorithms.md#object-masking), plus the
source detection it and the fringe preparation use.

Detection (``detect_sources``): smooth the background-subtracted image with a Gaussian of
``sigma`` px, threshold at ``threshold`` x the noise of the smoothed image (``threshold_type``
"noise": from the variance plane; the sky build masks at 5 sigma, see :class:`MaskObjectsConfig`)
or x its clipped standard deviation ("stdev", the reference's), and grow every footprint isotropically by ``n_sigma_to_grow * sigma``
px. Because every footprint grows by the same radius, growing the union of the above-threshold
pixels is identical to growing each footprint, so no labelling is needed: growth is a dilation by
the disk of pixel offsets within the radius (the same pixels as a Euclidean distance transform
of the complement thresholded at the radius), done with per-row distances to the nearest detected
pixel.

Speed (deliberate, tested): when ``sigma`` is large the smoothing and growth run on an image binned
``b x b`` (``b`` = 2 or 4). Binning is a convolution with a b-px box (variance (b^2-1)/12 per
axis), so the binned image is smoothed with ``sqrt(sigma^2 - (b^2-1)/12) / b`` binned px; the
total smoothing kernel then has the same second moment as the full-resolution one, and the
threshold is relative to the noise measured on the same smoothed image, so detections agree
within noise. The grown binned mask is upsampled by pixel replication (edges uncertain by < b px,
negligible against the ~12-px growth). The background subtracted before detection is evaluated
directly on the block centres. Between iterations the binned detections set the mask planes
directly (no full-resolution boolean image), and the replacement of the detected pixels evaluates
the 256-px background only where it is needed (:meth:`BackgroundModel.fill`).
"""

from __future__ import annotations

import math
from typing import Literal

import numba
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats.background import BackgroundConfig, measure_background
from calib_core.stats.binned import box_statistics, quartiles

__all__ = ["DetectionConfig", "MaskObjectsConfig", "detect_sources", "find_objects",
           "remove_objects", "mask_objects", "auto_binning"]


class DetectionConfig(BaseModel):
    """Source detection (meas_algorithms SourceDetectionTask, as MaskObjects configures it)."""

    model_config = ConfigDict(extra="forbid")

    sigma: float = Field(5.0, gt=0, description="Gaussian smoothing sigma in pixels "
                                                "(MaskObjects detectSigma 5.0)")
    threshold: float = Field(2.5, gt=0, description="threshold in sigma of the smoothed image's noise")
    threshold_type: Literal["noise", "stdev"] = Field(
        "noise", description="what 'sigma' is: 'noise' = the noise of the smoothed image, from the variance "
                             "plane (or, without one, a robust estimate from differences of neighbouring "
                             "binned pixels) propagated through the binning and the Gaussian; 'stdev' = the "
                             "clipped standard deviation of the smoothed image itself, which structure "
                             "in the image (a sky pattern, fringes) inflates, so only features well above "
                             "that structure are detected (the fringe preparation wants exactly that)")
    n_sigma_to_grow: float = Field(2.4, ge=0, description="footprint growth in units of sigma")
    binning: int | Literal["auto"] = Field("auto", description="detect on a b x b binned image; 'auto' "
                                                            "picks 4 for sigma>=4, 2 for >=2, else 1")
    polarity: Literal["positive", "both"] = Field(
        "positive", description="positive (reference) or both: also flag negative excursions "
                                "(DETECTED_NEGATIVE), which makes masking of noise symmetric")
    stats_mask_planes: list[str] = Field(
        default_factory=lambda: ["BAD", "SAT", "EDGE", "NO_DATA"],
        description="planes excluded when measuring the smoothed image's noise")


class MaskObjectsConfig(BaseModel):
    """pipe_tasks MaskObjectsConfig (docs/algorithms.md#object-masking-defaults)."""

    model_config = ConfigDict(extra="forbid")

    n_iter: int = Field(3, ge=1, description="detection iterations")
    subtract_background: BackgroundConfig = Field(
        default_factory=lambda: BackgroundConfig(bin_size=1024, use_approx=False),
        description="background removed before each detection: 1024-px bins, MEANCLIP, AKIMA, "
                    "no approximation")
    detection: DetectionConfig = Field(
        default_factory=lambda: DetectionConfig(threshold=5.0),
        description="detection as MaskObjects configures it (5-px Gaussian, grow 2.4 sigma) but at 5 sigma "
                    "of the noise, not 2.5: see docs/algorithms.md#departures-from-the-reference-and-why. Pure noise "
                    "smoothed by sigma=5 px has ~1.4e-4 peaks per px^2 above 2.5 sigma (the Euler "
                    "characteristic of a Gaussian field); grown by 12 px they mask ~8 % of a blank sky, "
                    "each region a positive noise excursion, biasing every bin low by a varying amount "
                    "several times a sky frame's floor. Above 5 sigma: 2.4e-8 per px^2, none per CCD")
    do_interpolate: bool = Field(True, description="replace masked pixels by a smooth background "
                                                   "and clear DETECTED")
    interpolate: BackgroundConfig = Field(
        default_factory=lambda: BackgroundConfig(bin_size=256, use_approx=False),
        description="the replacement background: 256-px bins, no approximation")
    mask_planes: list[str] = Field(default_factory=lambda: ["BAD", "SAT", "DETECTED", "NO_DATA"],
                                   description="planes whose pixels are replaced (SkyTask config.mask)")


def auto_binning(sigma: float, binning="auto") -> int:
    """Binning factor used for detection."""
    if binning != "auto":
        return int(binning)
    return 4 if sigma >= 4.0 else (2 if sigma >= 2.0 else 1)


@numba.njit(cache=True, nogil=True)
def _bin_kernel(img, mask, bits, b):
    """b x b block means of img (non-finite pixels count as 0) and OR of (mask & bits)."""
    ny, nx = img.shape[0] // b, img.shape[1] // b
    out = np.zeros((ny, nx), np.float32)
    bad = np.zeros((ny, nx), np.int32)
    inv = 1.0 / (b * b)
    for j in range(ny):
        for dy in range(b):
            y = j * b + dy
            for i in range(nx):
                s = 0.0
                m = 0
                for dx in range(b):
                    v = img[y, i * b + dx]
                    if math.isfinite(v):
                        s += v
                    m |= mask[y, i * b + dx] & bits
                out[j, i] += s
                bad[j, i] |= m
    for j in range(ny):
        for i in range(nx):
            out[j, i] *= inv
            bad[j, i] = 1 if bad[j, i] != 0 else 0
    return out, bad


def _upsample(m: np.ndarray, b: int, shape) -> np.ndarray:
    if b == 1:
        return m
    out = np.zeros(shape, bool)
    up = np.repeat(np.repeat(m, b, axis=0), b, axis=1)
    out[:up.shape[0], :up.shape[1]] = up
    # the remainder rows/columns copy their nearest binned neighbour
    if up.shape[0] < shape[0]:
        out[up.shape[0]:, :up.shape[1]] = up[-1:, :]
    if up.shape[1] < shape[1]:
        out[:, up.shape[1]:] = out[:, up.shape[1] - 1:up.shape[1]]
    return out


@numba.njit(cache=True, nogil=True)
def _set_planes_kernel(mask, pos, neg, use_neg, b, bit, nbit):
    """mask &= ~(bit | nbit), then bit where the b x b-binned ``pos`` is set (and nbit where
    ``neg`` is), with the remainder rows/columns taking their nearest binned neighbour: the same
    pixels as :func:`_upsample`."""
    ny, nx = mask.shape
    nyb, nxb = pos.shape
    keep = ~(bit | nbit)
    col = np.empty(nx, np.int64)
    for x in range(nx):
        col[x] = min(x // b, nxb - 1)
    for y in range(ny):
        j = min(y // b, nyb - 1)
        for x in range(nx):
            i = col[x]
            m = mask[y, x] & keep
            if pos[j, i]:
                m |= bit
            if use_neg and neg[j, i]:
                m |= nbit
            mask[y, x] = m


def _disk_half_widths(radius: float) -> np.ndarray:
    """For each row offset dy in [-r, r] (r = floor(radius)), the largest dx with
    sqrt(dx^2 + dy^2) <= radius, computed as the distance transform does (float64 square root of
    the integer squared distance)."""
    r = int(math.floor(radius))
    d = np.arange(-r, r + 1)
    dist = np.sqrt((d[:, None] ** 2 + d[None, :] ** 2).astype(np.float64))
    inside = dist <= radius
    return np.array([np.abs(d[row]).max() for row in inside], np.int64)


@numba.njit(cache=True, nogil=True)
def _grow_kernel(det, half):
    """Dilation of ``det`` by the disk whose row offset dy spans |dx| <= half[dy + r]: each row's
    distance to its nearest set pixel, then an OR over the 2r+1 row offsets."""
    ny, nx = det.shape
    r = (half.size - 1) // 2
    big = nx + 1
    h = np.empty((ny, nx), np.int64)
    for y in range(ny):
        last = -big
        for x in range(nx):
            if det[y, x]:
                last = x
            h[y, x] = x - last
        last = 2 * big
        for x in range(nx - 1, -1, -1):
            if det[y, x]:
                last = x
            d = last - x
            if d < h[y, x]:
                h[y, x] = d
    out = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        for dy in range(-r, r + 1):
            yy = y + dy
            if yy < 0 or yy >= ny:
                continue
            w = half[dy + r]
            for x in range(nx):
                if h[yy, x] <= w:
                    out[y, x] = True
    return out


def _grow(det: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within Euclidean distance ``radius`` of a set pixel of ``det`` (identical to
    ``ndimage.distance_transform_edt(~det) <= radius``)."""
    if radius <= 0 or not det.any():
        return det
    return _grow_kernel(np.ascontiguousarray(det), _disk_half_widths(radius))


def _gaussian_noise_factor(s: float) -> float:
    """sqrt(sum of squared weights) of scipy's 1-D Gaussian kernel of sigma ``s`` (truncate 4):
    the factor by which it scales white noise."""
    if s <= 0:
        return 1.0
    r = int(4.0 * s + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / s) ** 2)
    w /= w.sum()
    return float(np.sqrt(np.sum(w * w)))


@numba.njit(cache=True, nogil=True)
def _positive_median_kernel(v, m, bits):
    """Median (numpy's, in float64) of the finite, positive ``v`` whose ``m`` has none of ``bits``;
    NaN when there is none. One gathering pass and the binned statistics' selection."""
    buf = np.empty(v.size, np.float64)
    n = 0
    for i in range(v.size):
        x = v[i]
        if (m[i] & bits) == 0 and math.isfinite(x) and x > 0:
            buf[n] = x
            n += 1
    if n == 0:
        return math.nan
    _, med, _ = quartiles(buf, n, np.empty(n, np.float64))
    return med


def _variance_median(variance, mask, bits) -> float:
    """Median of the finite, positive variances whose mask has none of ``bits`` (NaN when none)."""
    v = np.ascontiguousarray(variance).ravel()
    m = np.zeros(v.size, np.int32) if mask is None else np.ascontiguousarray(mask, np.int32).ravel()
    return float(_positive_median_kernel(v, m, np.int32(bits)))


def _binned_noise(binned, bmask, variance, mask, bits, b, variance_median=None) -> float:
    """Noise (standard deviation) of one b x b-binned pixel.

    From the variance plane when it has positive values (median over the unflagged pixels, divided
    by b^2 for the block mean; ``variance_median``, when given, is that median already measured);
    otherwise from the binned image: the scaled MAD of the differences of horizontally neighbouring
    good binned pixels over sqrt(2), which smooth structure and compact objects barely touch."""
    if variance is not None:
        med = _variance_median(variance, mask, bits) if variance_median is None else variance_median
        if med == med:
            return float(np.sqrt(med) / b)
    d = np.diff(binned, axis=1)
    ok = (bmask[:, 1:] == 0) & (bmask[:, :-1] == 0) & np.isfinite(d)
    d = d[ok]
    if d.size < 10:
        return float("nan")
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _detect_binned(image, mask, cfg: DetectionConfig, background, variance=None, variance_median=None):
    """Detection on the b x b-binned image: (b, [grown positive mask, grown negative mask
    if polarity is "both"]) at the binned resolution. ``variance_median``: see :func:`_binned_noise`."""
    b = auto_binning(cfg.sigma, cfg.binning)
    img = np.asarray(image, np.float32)
    if mask is None:
        mask = np.zeros(img.shape, np.int32)
    binned, bmask = _bin_kernel(img, np.asarray(mask, np.int32), np.int32(mask_bits(cfg.stats_mask_planes)), b)
    if background is not None:
        xs = np.arange(binned.shape[1]) * b + (b - 1) / 2.0
        ys = np.arange(binned.shape[0]) * b + (b - 1) / 2.0
        binned = binned - background.evaluate(xs, ys)
    s_b = np.sqrt(max(cfg.sigma ** 2 - (b * b - 1) / 12.0, 0.0)) / b
    sm = binned
    if s_b > 0:
        sm = ndimage.gaussian_filter1d(sm, s_b, axis=0, truncate=4.0, mode="nearest")
        sm = ndimage.gaussian_filter1d(sm, s_b, axis=1, truncate=4.0, mode="nearest")
    if cfg.threshold_type == "noise":
        # calibflow departs from the reference here: MaskObjects thresholds at 2.5 x the standard
        # deviation of the smoothed image, which a sky pattern of a few per cent dominates (7-13x the
        # noise on a simulated night), so faint objects go unmasked while pattern peaks are masked in
        # every exposure and the sky frame comes out low there. The threshold meant is one of noise
        # (and then 5, not 2.5: MaskObjectsConfig.detection says why).
        sd = _binned_noise(binned, bmask, variance, mask, np.int32(mask_bits(cfg.stats_mask_planes)), b,
                           variance_median)
        sd *= _gaussian_noise_factor(s_b) ** 2 if s_b > 0 else 1.0
    else:
        st = box_statistics(sm, bmask, 1, [[0, sm.shape[0], 0, sm.shape[1]]], "MEANCLIP")
        sd = np.sqrt(st[0, 1] ** 2 * st[0, 3])  # error = sqrt(var/n)
    grow = cfg.n_sigma_to_grow * cfg.sigma / b
    out = []
    for sign in ((1.0, -1.0) if cfg.polarity == "both" else (1.0,)):
        out.append(_grow(sign * sm > cfg.threshold * sd, grow))
    return b, out


def detect_sources(image: np.ndarray, mask: np.ndarray | None = None,
                   config: DetectionConfig | None = None, background=None,
                   variance: np.ndarray | None = None) -> np.ndarray:
    """Boolean footprint mask (grown) of positive sources.

    Parameters
    ----------
    image : (ny, nx) float array
        Image, background already subtracted unless ``background`` is given.
    mask : (ny, nx) int array, optional
        Mask bits; ``config.stats_mask_planes`` are excluded from the noise estimate.
    config : DetectionConfig
    background : BackgroundModel, optional
        Subtracted before detection, evaluated at the (binned) pixel centres.
    variance : (ny, nx) array, optional
        Per-pixel variance, for ``threshold_type="noise"`` (else the noise is estimated from the image).

    Returns
    -------
    (ny, nx) bool array, or (positive, negative) with ``polarity="both"``
    """
    cfg = config or DetectionConfig()
    b, out = _detect_binned(image, mask, cfg, background, variance)
    out = [_upsample(d, b, np.shape(image)) for d in out]
    return out[0] if len(out) == 1 else (out[0], out[1])


def detection_variance_median(masked_image: MaskedImage, config: MaskObjectsConfig | None = None) -> float | None:
    """The one number :func:`find_objects` reads of the variance plane: the median of the finite,
    positive variances over the pixels without the detection's ``stats_mask_planes`` (the detection
    noise is its square root over the binning). None when a pass's result could change it (the
    stats planes include the DETECTED planes the passes set), the threshold does not use it, or no
    variance is positive (the detection then falls back on the binned image itself).

    A build that records it can drop the variance plane of an image it masks again later (the sky
    build's intermediates) and pass it back as ``variance_median``."""
    cfg = config or MaskObjectsConfig()
    det = cfg.detection
    stats_bits = mask_bits(det.stats_mask_planes)
    if det.threshold_type != "noise" or stats_bits & mask_bits(["DETECTED", "DETECTED_NEGATIVE"]):
        return None
    if masked_image.variance is None:
        return None
    med = _variance_median(masked_image.variance, masked_image.mask, stats_bits)
    return med if math.isfinite(med) else None


def find_objects(masked_image: MaskedImage, config: MaskObjectsConfig | None = None,
                 variance_median: float | None = None) -> np.ndarray:
    """Iterative detection (MaskObjectsTask.findObjects); sets DETECTED in place.

    Each of ``n_iter`` passes fits the 1024-px background ignoring the previous pass's
    detections, detects on the background-subtracted image and replaces the DETECTED plane
    (``clearMask=True``).

    ``variance_median``: :func:`detection_variance_median` of this image, measured before (then the
    variance plane is not read); by default it is measured here.

    Returns
    -------
    (ny, nx) bool array: the final DETECTED pixels.
    """
    cfg = config or MaskObjectsConfig()
    bit = np.int32(mask_bits(["DETECTED"]))
    nbit = np.int32(mask_bits(["DETECTED_NEGATIVE"]))
    mask = masked_image.mask
    # the noise's median variance is the same in every pass when the planes the passes set are not
    # among those it ignores (the default): measured once, not n_iter times (~22 ms a 2-Mpix CCD)
    if variance_median is None:
        variance_median = detection_variance_median(masked_image, cfg)
    b, pos = 1, np.zeros((1, 1), bool)
    for _ in range(cfg.n_iter):
        bg = measure_background(masked_image, cfg.subtract_background)
        b, out = _detect_binned(masked_image.image, mask, cfg.detection, bg, masked_image.variance,
                                variance_median)
        pos = out[0]
        neg = out[1] if len(out) > 1 else np.zeros((1, 1), bool)
        _set_planes_kernel(mask, pos, neg, len(out) > 1, b, bit, nbit)
    return _upsample(pos, b, mask.shape)


def remove_objects(masked_image: MaskedImage, config: MaskObjectsConfig | None = None) -> None:
    """Replace DETECTED (and ``mask_planes``) pixels by a smooth 256-px background and clear
    DETECTED (MaskObjectsTask.removeObjects). Without ``do_interpolate`` the median of the good
    pixels is used and DETECTED stays."""
    cfg = config or MaskObjectsConfig()
    bits = np.int32(mask_bits(cfg.mask_planes))
    if cfg.do_interpolate:
        model = measure_background(masked_image, cfg.interpolate)
        model.fill(masked_image.image, masked_image.mask, bits)
        masked_image.mask &= ~np.int32(mask_bits(["DETECTED"]))
    else:
        bad = (masked_image.mask & bits) != 0
        good = ~bad & np.isfinite(masked_image.image)
        masked_image.image[bad] = np.median(masked_image.image[good]) if good.any() else np.nan


def mask_objects(masked_image: MaskedImage, config: MaskObjectsConfig | None = None,
                 variance_median: float | None = None) -> np.ndarray:
    """MaskObjectsTask.run: :func:`find_objects` then :func:`remove_objects`, in place.

    Returns the boolean mask of the detected pixels (before DETECTED is cleared).
    """
    det = find_objects(masked_image, config, variance_median)
    remove_objects(masked_image, config)
    return det
