"""Focal-plane background (pipe_tasks ``FocalPlaneBackground``, docs/algorithms.md#focal-plane-background-legacy).

A superpixel model of the sky over the whole focal plane, in focal-plane mm, so that it is
continuous across chip gaps. Each detector contributes a *partial* model (``values`` = sum of
clipped mean x pixel count per cell, ``numbers`` = pixel count per cell; float64, see
``__init__``); partial
models merge by addition, so detectors are processed independently (in any grouping) and merged
at a per-exposure barrier.

Cell k (0-based, of ``dims = ceil(extent/size) + 2``) is centred at focal-plane
``camera_min + (k - 1) * size``: the focal-plane -> sample transform is
``s = (fp - camera_min) / size + 1``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field
from scipy import ndimage

from calib_core.camera import Camera, Detector
from calib_core.configmodel import ClipConfig
from calib_core.errors import DataError
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats.background import (BackgroundModel, InterpStyle, bin_centres, bin_edges, interpolate_1d,
                                         lookup_max_interp_style)
from calib_core.stats.binned import box_statistics

__all__ = ["FocalPlaneBackgroundConfig", "FocalPlaneBackground", "interpolate_bad_cells"]


class FocalPlaneBackgroundConfig(ClipConfig):
    """pipe_tasks FocalPlaneBackgroundConfig (docs/algorithms.md#focal-plane-background-legacy)."""

    model_config = ConfigDict(extra="forbid")
    renamed_keys: ClassVar[dict[str, str]] = {"nsigma_clip": "nsigma", "n_iter": "niter"}

    x_size: float = Field(..., gt=0, description="cell size along focal-plane x, mm (required; "
                                                 "HSC 122.88 = 8192 px)")
    y_size: float = Field(..., gt=0, description="cell size along focal-plane y, mm (required)")
    pixel_size: float | None = Field(
        None, gt=0, description="pixel size in mm; None = the camera's (the reference default 1.0 "
                                "assumes the caller sets it)")
    min_frac: float = Field(0.1, ge=0, description="min fraction of a full cell's pixels for a "
                                                   "cell to count as good; 0.1")
    mask: list[str] = Field(
        default_factory=lambda: ["BAD", "SAT", "INTRP", "DETECTED", "DETECTED_NEGATIVE", "EDGE",
                                 "NO_DATA"], description="planes ignored in the cell statistics")
    interpolation: InterpStyle = Field("AKIMA_SPLINE", description="style for bad-cell filling and the "
                                                           "per-detector model; AKIMA_SPLINE")
    do_smooth: bool = Field(False, description="NaN-aware Gaussian smoothing of the cells; False")
    smooth_scale: float = Field(2.0, gt=0, description="smoothing sigma in cells; 2.0")
    binning: int = Field(64, ge=1, description="detector binning for to_detector_background; 64")
    statistic: Literal["MEANCLIP", "MEAN", "MEDIAN"] = Field("MEANCLIP", description="cell statistic; the "
                                                                    "reference uses MEANCLIP")


class FocalPlaneBackground:
    """Superpixel background over the focal plane; see the module docstring.

    Parameters
    ----------
    config : FocalPlaneBackgroundConfig
    dims : (nx, ny)
        Grid size in cells.
    origin : (x, y)
        Focal-plane mm of the camera's lower-left corner (``camera_min``).
    pixel_size : float
        mm per pixel used for the min_frac threshold.
    values, numbers : (ny, nx) float64 arrays, optional
        Accumulators (zeros by default).
    """

    def __init__(self, config: FocalPlaneBackgroundConfig, dims, origin, pixel_size: float,
                 values=None, numbers=None):
        self.config = config
        self.dims = (int(dims[0]), int(dims[1]))
        self.origin = (float(origin[0]), float(origin[1]))
        self.pixel_size = float(pixel_size)
        shape = (self.dims[1], self.dims[0])
        # float64 accumulators (the reference uses float32): each contribution float32(mean) * n is
        # exact in float64, so sums do not depend on the order or grouping of the merges
        self.values = np.zeros(shape, np.float64) if values is None else np.asarray(values, np.float64)
        self.numbers = np.zeros(shape, np.float64) if numbers is None else np.asarray(numbers, np.float64)

    @classmethod
    def from_camera(cls, config: FocalPlaneBackgroundConfig, camera: Camera) -> "FocalPlaneBackground":
        """An empty model covering the camera (union of detector corners) plus one cell each side."""
        corners = np.array([camera.detector_corners_mm(d) for d in camera.detectors])
        xmin, xmax = corners[:, 0].min(), corners[:, 1].max()
        ymin, ymax = corners[:, 2].min(), corners[:, 3].max()
        dims = (math.ceil((xmax - xmin) / config.x_size) + 2, math.ceil((ymax - ymin) / config.y_size) + 2)
        pix = config.pixel_size or camera.pixel_size_mm
        return cls(config, dims, (xmin, ymin), pix)

    # -- transforms ----------------------------------------------------------------------------------

    def fp_to_sample(self, fx, fy):
        """Focal-plane mm -> sample (cell) coordinates; cell k is centred at k."""
        return ((np.asarray(fx) - self.origin[0]) / self.config.x_size + 1.0,
                (np.asarray(fy) - self.origin[1]) / self.config.y_size + 1.0)

    def sample_to_fp(self, sx, sy):
        return ((np.asarray(sx) - 1.0) * self.config.x_size + self.origin[0],
                (np.asarray(sy) - 1.0) * self.config.y_size + self.origin[1])

    # -- accumulation --------------------------------------------------------------------------------

    def add_detector(self, camera: Camera, det: Detector, masked_image: MaskedImage) -> None:
        """Accumulate one detector (FocalPlaneBackground.addCcd).

        For every cell, the cell's corners are mapped to detector pixels, rounded
        (floor(x + 0.5)), made an inclusive box clipped to the detector; MEANCLIP and NPOINT of
        the box (ignoring ``config.mask``) add ``mean * n`` to ``values`` and ``n`` to ``numbers``.
        """
        h, w = masked_image.shape
        if (det.nx, det.ny) != (w, h):
            raise ValueError(f"detector {det.name} is {det.nx}x{det.ny} but the image is {w}x{h}")
        nxc, nyc = self.dims
        # only cells that can overlap the detector: its corners in sample coordinates
        x0, x1, y0, y1 = camera.detector_corners_mm(det)
        sx0, sy0 = self.fp_to_sample(x0, y0)
        sx1, sy1 = self.fp_to_sample(x1, y1)
        cells = [(xx, yy) for yy in range(max(int(math.floor(sy0 - 0.5)), 0), min(int(math.ceil(sy1 + 0.5)) + 1, nyc))
                 for xx in range(max(int(math.floor(sx0 - 0.5)), 0), min(int(math.ceil(sx1 + 0.5)) + 1, nxc))]
        boxes, keep = [], []
        for xx, yy in cells:
            cx = np.array([xx - 0.5, xx + 0.5, xx - 0.5, xx + 0.5])
            cy = np.array([yy - 0.5, yy - 0.5, yy + 0.5, yy + 0.5])
            px, py = camera.focal_plane_to_pixel(det, *self.sample_to_fp(cx, cy))
            px, py = np.floor(px + 0.5), np.floor(py + 0.5)
            bx0, bx1 = max(int(px.min()), 0), min(int(px.max()), w - 1)
            by0, by1 = max(int(py.min()), 0), min(int(py.max()), h - 1)
            if bx1 < bx0 or by1 < by0:
                continue
            boxes.append((by0, by1 + 1, bx0, bx1 + 1))
            keep.append((yy, xx))
        if not boxes:
            return
        st = box_statistics(masked_image.image, masked_image.mask, mask_bits(self.config.mask),
                            np.array(boxes), self.config.statistic, self.config.nsigma, self.config.niter)
        for (yy, xx), (mean, _, npoint, _) in zip(keep, st):
            if not (np.isfinite(mean) and npoint > 0):
                continue
            self.values[yy, xx] += float(np.float32(mean)) * float(npoint)
            self.numbers[yy, xx] += float(npoint)

    def _check(self, other: "FocalPlaneBackground") -> None:
        if (self.dims != other.dims or self.config.x_size != other.config.x_size
                or self.config.y_size != other.config.y_size):
            raise DataError(f"cannot merge focal-plane backgrounds: dims {self.dims} vs {other.dims}, "
                               f"cell {self.config.x_size}x{self.config.y_size} vs "
                               f"{other.config.x_size}x{other.config.y_size}")

    def merge(self, other: "FocalPlaneBackground") -> "FocalPlaneBackground":
        """Add another partial model into this one (in place); returns self.

        Raises
        ------
        RuntimeError
            If the grids differ.
        """
        self._check(other)
        self.values += other.values
        self.numbers += other.numbers
        return self

    def __iadd__(self, other):
        return self.merge(other)

    def clone(self) -> "FocalPlaneBackground":
        return FocalPlaneBackground(self.config, self.dims, self.origin, self.pixel_size,
                                    self.values.copy(), self.numbers.copy())

    @classmethod
    def merged(cls, models) -> "FocalPlaneBackground":
        """Sum of partial models (a new object)."""
        models = list(models)
        out = models[0].clone()
        for m in models[1:]:
            out.merge(m)
        return out

    # -- products ------------------------------------------------------------------------------------

    def get_stats_image(self) -> np.ndarray:
        """Per-cell value (getStatsImage): values/numbers, bad cells filled.

        Cells with ``numbers < min_frac * (x_size/pixel)*(y_size/pixel)`` are bad; optionally the
        grid is NaN-aware smoothed; bad cells are filled by :func:`interpolate_bad_cells`.

        Returns
        -------
        (ny, nx) float32 array

        Raises
        ------
        RuntimeError
            If every cell is bad.
        """
        cfg = self.config
        with np.errstate(invalid="ignore", divide="ignore"):
            v = (self.values / self.numbers).astype(np.float32)
        thresh = cfg.min_frac * (cfg.x_size / self.pixel_size) * (cfg.y_size / self.pixel_size)
        bad = self.numbers < thresh
        if cfg.do_smooth:
            good = (~bad & np.isfinite(v)).astype(np.float64)
            num = ndimage.gaussian_filter(np.where(good > 0, v, 0.0).astype(np.float64),
                                          cfg.smooth_scale, mode="constant", cval=0.0)
            den = ndimage.gaussian_filter(good, cfg.smooth_scale, mode="constant", cval=0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = (num / den).astype(np.float32)
            bad = ~np.isfinite(v)
        if bad.any():
            v = interpolate_bad_cells(v, bad, cfg.interpolation)
        return v

    def to_detector_background(self, camera: Camera, det: Detector) -> BackgroundModel:
        """The model on one detector (toCcdBackground), as a :class:`BackgroundModel`.

        The stats image is sampled bilinearly (with edge normalisation: weights of cells outside
        the grid are dropped and the rest renormalised; NaN cells give NaN) at the bin centres of
        the afw partition of the detector into ``(W // binning, H // binning)`` bins; NaN bins get
        the mean of the finite ones. Evaluation at full resolution is the ``interpolation`` style
        with REDUCE_INTERP_ORDER.
        """
        stats = self.get_stats_image().astype(np.float64)
        w, h = det.nx, det.ny
        nbx, nby = max(w // self.config.binning, 1), max(h // self.config.binning, 1)
        xc, yc = bin_centres(bin_edges(w, nbx)), bin_centres(bin_edges(h, nby))
        gy, gx = np.meshgrid(yc, xc, indexing="ij")
        sx, sy = self.fp_to_sample(*camera.pixel_to_focal_plane(det, gx, gy))
        vals = _bilinear(stats, sx, sy)
        finite = np.isfinite(vals)
        if not finite.all():
            vals[~finite] = vals[finite].mean() if finite.any() else np.nan
        return BackgroundModel(vals, None, None, (0, 0, w - 1, h - 1), self.config.interpolation,
                               "REDUCE_INTERP_ORDER", use_approx=False)

    def __reduce__(self):
        return (FocalPlaneBackground, (self.config, self.dims, self.origin, self.pixel_size,
                                       self.values, self.numbers))


def _bilinear(img: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Bilinear sample of img (cell k centred at k) with edge normalisation."""
    ny, nx = img.shape
    x0 = np.floor(sx).astype(int)
    y0 = np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    num = np.zeros(sx.shape)
    den = np.zeros(sx.shape)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            wgt = np.where(inside, wx * wy, 0.0)
            val = img[np.clip(yi, 0, ny - 1), np.clip(xi, 0, nx - 1)]
            contrib = np.where(wgt > 0, wgt * val, 0.0)
            num += contrib
            den += wgt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _interp_line(x_good, y_good, x_bad, style):
    """interpolate1D of pipe_tasks: fall back to fewer-point styles, then CONSTANT, then NaN."""
    if x_good.size == 0:
        return np.full(x_bad.size, np.nan)
    try:
        return interpolate_1d(x_good, y_good, x_bad, style, "THROW_EXCEPTION")
    except ValueError:
        pass
    alt = lookup_max_interp_style(x_good.size)
    try:
        return interpolate_1d(x_good, y_good, x_bad, alt if alt != style else "CONSTANT",
                              "THROW_EXCEPTION")
    except ValueError:
        return np.full(x_bad.size, np.nan)


def interpolate_bad_cells(values: np.ndarray, bad: np.ndarray, style: str = "AKIMA_SPLINE") -> np.ndarray:
    """Fill bad cells by 1-D interpolation along rows, then (for cells still NaN) along columns.

    Parameters
    ----------
    values : (ny, nx) array
    bad : (ny, nx) bool array
    style : interpolation style

    Returns
    -------
    (ny, nx) float32 array

    Raises
    ------
    RuntimeError
        If no cell is good.
    """
    v = np.array(values, np.float64)
    bad = np.asarray(bad, bool)
    if bad.all():
        raise DataError("No good pixels")
    idx_x = np.arange(v.shape[1], dtype=np.float64)
    for y in range(v.shape[0]):
        b = bad[y]
        if b.any() and not b.all():
            v[y, b] = _interp_line(idx_x[~b], v[y, ~b], idx_x[b], style)
    bad = np.isnan(v)
    idx_y = np.arange(v.shape[0], dtype=np.float64)
    for x in range(v.shape[1]):
        b = bad[:, x]
        if b.any() and not b.all():
            v[b, x] = _interp_line(idx_y[~b], v[~b, x], idx_y[b], style)
    return v.astype(np.float32)
