"""Binned background models (afw ``BackgroundMI``, docs/algorithms.md#binned-background-model;
meas_algorithms ``SubtractBackgroundTask`` defaults, docs/algorithms.md#binned-background-defaults).

A background is a grid of per-bin statistics (MEANCLIP by default, masked planes ignored) over a
near-equal integer partition of the image, evaluated at full resolution by 1-D interpolation through
the bin centres, first along y (every bin column to every pixel row), then along x (every pixel
row to every pixel). Optionally a 2-D Chebyshev polynomial is fitted to the bins instead
(``use_approx``).

Interpolation styles and their minimum point counts: CONSTANT (1), LINEAR (2), NATURAL_SPLINE (3),
CUBIC_SPLINE (3, scipy not-a-knot), AKIMA_SPLINE (5). With ``REDUCE_INTERP_ORDER`` a style that
needs more points than there are good bins drops to the best that fits (1 CONSTANT, 2 LINEAR, 3-4
CUBIC_SPLINE, >= 5 AKIMA_SPLINE). Outside the first/last bin centre, values are extrapolated by the
quadratic Taylor expansion about the end point (``y0 + d*dx + d2*dx**2/2``) using the interpolant's
own derivatives there; CONSTANT is piecewise constant (nearest bin centre).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numba
import numpy as np
from pydantic import ConfigDict, Field
from scipy.interpolate import Akima1DInterpolator, CubicSpline, make_interp_spline

from calib_core.configmodel import ClipConfig
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats.binned import grid_statistics

__all__ = [
    "INTERP_STYLES", "MIN_POINTS", "BackgroundConfig", "BackgroundModel", "bin_edges",
    "bin_centres", "lookup_max_interp_style", "interpolate_1d", "measure_background",
    "subtract_background", "n_bins",
]

InterpStyle = Literal["CONSTANT", "LINEAR", "NATURAL_SPLINE", "CUBIC_SPLINE", "AKIMA_SPLINE"]
INTERP_STYLES = ("CONSTANT", "LINEAR", "NATURAL_SPLINE", "CUBIC_SPLINE", "AKIMA_SPLINE")
#: minimum number of points per style (afw Interpolate lookupMinInterpPoints)
MIN_POINTS = {"CONSTANT": 1, "LINEAR": 2, "NATURAL_SPLINE": 3, "CUBIC_SPLINE": 3, "AKIMA_SPLINE": 5}

DEFAULT_IGNORED = ["BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA"]


class BackgroundConfig(ClipConfig):
    """How a binned background is measured and evaluated.

    The defaults are meas_algorithms ``SubtractBackgroundConfig`` (docs/algorithms.md#binned-background-defaults).
    """

    model_config = ConfigDict(extra="forbid")
    renamed_keys: ClassVar[dict[str, str]] = {"nsigma_clip": "nsigma", "n_iter": "niter"}

    statistic: Literal["MEANCLIP", "MEAN", "MEDIAN"] = Field(
        "MEANCLIP", description="per-bin statistic (afw statisticsProperty)")
    bin_size: int = Field(128, ge=1, description="bin size in pixels along x (and y unless "
                                                 "bin_size_y is given)")
    bin_size_y: int | None = Field(None, ge=1, description="bin size along y; None = bin_size")
    grid: Literal["ceil", "round", "floor_plus_one"] = Field(
        "ceil", description="number of bins from the image size: ceil(W/b) (meas_algorithms HEAD, "
                            "default), round = max(int(W/b + 0.5), 1) (SkyMeasurement), "
                            "floor_plus_one = W//b + 1 (meas_algorithms 2020)")
    algorithm: InterpStyle = Field("AKIMA_SPLINE", description="interpolation style")
    undersample_style: Literal["REDUCE_INTERP_ORDER", "THROW_EXCEPTION"] = Field(
        "REDUCE_INTERP_ORDER", description="what to do with too few bins for the style")
    ignored_mask_planes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORED),
        description="pixels with these planes are not admitted (BAD, EDGE, DETECTED, "
                    "DETECTED_NEGATIVE, NO_DATA)")
    use_approx: bool = Field(True, description="fit a 2-D Chebyshev to the bins instead of "
                                               "interpolating")
    approx_order_x: int = Field(6, ge=0, description="Chebyshev order")
    approx_order_y: int = Field(-1, description="Chebyshev order in y; -1 = approx_order_x")
    weighting: bool = Field(True, description="inverse-variance weights in the Chebyshev fit")

    @property
    def ignore_bits(self) -> int:
        return mask_bits(self.ignored_mask_planes)


def n_bins(size: int, bin_size: int, rule: str = "ceil") -> int:
    """Number of bins along an axis of ``size`` pixels for a nominal ``bin_size``."""
    if rule == "ceil":
        return max(-(-size // bin_size), 1)
    if rule == "round":
        return max(int(size / bin_size + 0.5), 1)
    if rule == "floor_plus_one":
        return size // bin_size + 1
    raise ValueError(f"unknown grid rule {rule!r}")


def bin_edges(size: int, nbins: int) -> np.ndarray:
    """Edges (length nbins+1) of the afw partition of ``size`` pixels into ``nbins`` bins.

    Bin i ends at ``min(((i+1)*size + nbins//2) // nbins, size)`` and starts where bin i-1 ended.
    """
    if nbins < 1 or nbins > size:
        raise ValueError(f"cannot split {size} pixels into {nbins} bins")
    i = np.arange(1, nbins + 1, dtype=np.int64)
    ends = np.minimum((i * size + nbins // 2) // nbins, size)
    return np.concatenate([[0], ends])


def bin_centres(edges: np.ndarray) -> np.ndarray:
    """Bin centres ``start + size/2 - 0.5`` in pixel coordinates (0 = first pixel centre)."""
    edges = np.asarray(edges, dtype=np.float64)
    return edges[:-1] + np.diff(edges) / 2.0 - 0.5


def lookup_max_interp_style(n: int) -> str:
    """The best style that ``n`` points support (REDUCE_INTERP_ORDER)."""
    if n < 1:
        raise ValueError("no points to interpolate")
    if n == 1:
        return "CONSTANT"
    if n == 2:
        return "LINEAR"
    if n < 5:
        return "CUBIC_SPLINE"
    return "AKIMA_SPLINE"


def _reduce(style: str, n: int, undersample: str) -> str:
    if n >= MIN_POINTS[style]:
        return style
    if undersample == "THROW_EXCEPTION":
        raise ValueError(f"{style} needs {MIN_POINTS[style]} points, got {n}")
    return lookup_max_interp_style(n)


def interpolate_1d(x, y, xnew, style: str = "AKIMA_SPLINE",
                   undersample: str = "REDUCE_INTERP_ORDER") -> np.ndarray:
    """Interpolate ``y(x)`` (NaNs dropped) at ``xnew`` with the afw rules.

    Parameters
    ----------
    x : (n,) float array, strictly increasing
    y : (n,) or (n, m) float array
        Values; with 2-D ``y`` every column is interpolated (NaN rows are dropped only for 1-D y;
        2-D y must be finite).
    xnew : (k,) float array
    style : str
        One of :data:`INTERP_STYLES`.
    undersample : {"REDUCE_INTERP_ORDER", "THROW_EXCEPTION"}

    Returns
    -------
    (k,) or (k, m) float64 array; all NaN when there are no good points.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xnew = np.asarray(xnew, np.float64)
    if y.ndim == 1:
        good = np.isfinite(y)
        x, y = x[good], y[good]
    n = x.size
    if n == 0:
        return np.full((xnew.size,) + y.shape[1:], np.nan)
    style = _reduce(style, n, undersample)
    if style == "CONSTANT":
        if n == 1:
            return np.broadcast_to(y[0], (xnew.size,) + y.shape[1:]).copy()
        mids = 0.5 * (x[1:] + x[:-1])
        return y[np.searchsorted(mids, xnew, side="right")]
    f, d1, d2 = _interpolant(x, y, style)
    out = f(np.clip(xnew, x[0], x[-1]))
    for end, sel in ((x[0], xnew < x[0]), (x[-1], xnew > x[-1])):
        if sel.any():
            e = np.array([end])
            y0, g1, g2 = f(e)[0], d1(e)[0], d2(e)[0]
            dx = (xnew[sel] - end).reshape((-1,) + (1,) * (y.ndim - 1))
            out[sel] = y0 + g1 * dx + 0.5 * g2 * dx * dx
    return out


def _interpolant(x, y, style):
    """The interpolant of a non-CONSTANT style through >= MIN_POINTS[style] points (axis 0 of
    ``y``), with its first and second derivatives."""
    if style == "LINEAR":
        f = make_interp_spline(x, y, k=1, axis=0)
        d1 = lambda xx: f(xx, nu=1)  # noqa: E731
        d2 = lambda xx: 0.0 * f(xx)  # noqa: E731
        return f, d1, d2
    if style == "NATURAL_SPLINE":
        f = CubicSpline(x, y, bc_type="natural", axis=0)
    elif style == "CUBIC_SPLINE":
        f = CubicSpline(x, y, bc_type="not-a-knot", axis=0)
    else:
        f = Akima1DInterpolator(x, y, axis=0)
    return f, (lambda xx: f(xx, nu=1)), (lambda xx: f(xx, nu=2))


@numba.njit(cache=True, nogil=True)
def _fill_ppoly_kernel(image, mask, bits, every, seg, s, coef, ext):
    """image[y, x] = the x-interpolant of row y at column x, where mask & bits (every pixel with
    ``every``; ``mask`` is then not read), as :func:`interpolate_1d` computes it bit for bit: inside,
    scipy PPoly's power accumulation (``res += c[K-1-kp] * z; z *= s``) on its interval; outside
    (``seg`` -1: left, -2: right), the Taylor expansion ``y0 + g1*dx + 0.5*g2*dx*dx`` with ``s`` = dx.
    ``coef``: (ny, nseg, K) with the highest power first; ``ext``: (ny, 6) = y0, g1, g2 at the left
    end, then the right. Releases the GIL (scipy's PPoly evaluation holds it)."""
    ny, nx = image.shape
    kk = coef.shape[2]
    for y in range(ny):
        for x in range(nx):
            if not every and (mask[y, x] & bits) == 0:
                continue
            i = seg[x]
            sv = s[x]
            if i >= 0:
                res = 0.0
                z = 1.0
                for kp in range(kk):
                    res = res + coef[y, i, kk - 1 - kp] * z
                    if kp < kk - 1:
                        z = z * sv
            else:
                o = 0 if i == -1 else 3
                res = (ext[y, o] + ext[y, o + 1] * sv) + ((0.5 * ext[y, o + 2]) * sv) * sv
            image[y, x] = res


@dataclass
class BackgroundModel:
    """A binned background: the per-bin statistics and how to evaluate them.

    Attributes
    ----------
    values : (ny_bins, nx_bins) float32 array
        The per-bin statistic; NaN for bins with no admitted pixel.
    errors : (ny_bins, nx_bins) float32 array
        The statistic's error per bin (afw stores this in the stats image's variance plane).
    npoint : (ny_bins, nx_bins) float32 array
        Admitted pixels per bin before clipping.
    bbox : (x0, y0, x1, y1)
        Inclusive integer bounding box of the image the model describes (afw BOX.MINX...).
    algorithm : str
        Interpolation style (:data:`INTERP_STYLES`).
    undersample_style : str
        ``REDUCE_INTERP_ORDER`` or ``THROW_EXCEPTION``.
    use_approx, approx_order_x, approx_order_y, weighting
        Chebyshev approximation settings (see :class:`BackgroundConfig`).
    """

    values: np.ndarray
    errors: np.ndarray
    npoint: np.ndarray
    bbox: tuple[int, int, int, int]
    algorithm: str = "AKIMA_SPLINE"
    undersample_style: str = "REDUCE_INTERP_ORDER"
    use_approx: bool = False
    approx_order_x: int = 6
    approx_order_y: int = -1
    weighting: bool = True
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values, np.float32)
        self.errors = (np.full(self.values.shape, np.nan, np.float32) if self.errors is None
                       else np.asarray(self.errors, np.float32))
        self.npoint = (np.zeros(self.values.shape, np.float32) if self.npoint is None
                       else np.asarray(self.npoint, np.float32))
        self.bbox = tuple(int(v) for v in self.bbox)

    @property
    def width(self) -> int:
        return self.bbox[2] - self.bbox[0] + 1

    @property
    def height(self) -> int:
        return self.bbox[3] - self.bbox[1] + 1

    @property
    def x_edges(self) -> np.ndarray:
        return bin_edges(self.width, self.values.shape[1])

    @property
    def y_edges(self) -> np.ndarray:
        return bin_edges(self.height, self.values.shape[0])

    def copy(self) -> "BackgroundModel":
        return BackgroundModel(self.values.copy(), self.errors.copy(), self.npoint.copy(), self.bbox,
                               self.algorithm, self.undersample_style, self.use_approx,
                               self.approx_order_x, self.approx_order_y, self.weighting,
                               dict(self.meta))

    def evaluate(self, x=None, y=None) -> np.ndarray:
        """The model at full resolution (or on given pixel coordinates).

        Parameters
        ----------
        x, y : 1-D float arrays, optional
            Pixel column and row coordinates (0 = first pixel centre) of the output grid; by
            default every pixel of the bbox. Evaluating on block centres gives the model of a
            binned image at no full-resolution cost.

        Returns
        -------
        (len(y), len(x)) float32 array
        """
        x = np.arange(self.width, dtype=np.float64) if x is None else np.asarray(x, np.float64)
        y = np.arange(self.height, dtype=np.float64) if y is None else np.asarray(y, np.float64)
        xc, yc = bin_centres(self.x_edges), bin_centres(self.y_edges)
        if self.use_approx:
            return self._evaluate_chebyshev(xc, yc, x, y)
        cols, style = self._columns(y)
        # pass 2: along x; only all-NaN columns can be NaN now, the same for every row
        good = np.isfinite(cols).all(axis=0)
        if not good.any():
            return np.full((y.size, x.size), np.nan, np.float32)
        parts = self._row_splines(cols, good, style, x)
        if parts is None:         # CONSTANT or LINEAR along x
            out = interpolate_1d(xc[good], cols[:, good].T, x, style, self.undersample_style)
            return np.ascontiguousarray(out.T, dtype=np.float32)
        out = np.empty((y.size, x.size), np.float32)
        _fill_ppoly_kernel(out, np.zeros((1, 1), np.int32), np.int32(0), True, *parts)
        return out

    def _row_splines(self, cols, good, style, x):
        """The x-interpolants of every row of ``cols`` (through the bin columns ``good``) as the
        ppoly kernels take them: (seg, s, coef, ext) for the columns ``x``; None when the style,
        reduced to the good columns' number, is CONSTANT or LINEAR (no piecewise cubic)."""
        xk = bin_centres(self.x_edges)[good]
        style = _reduce(style, int(good.sum()), self.undersample_style)
        if style in ("CONSTANT", "LINEAR"):
            return None
        f, d1, d2 = _interpolant(xk, cols[:, good].T, style)
        # the interval of each column as scipy's find_interval picks it (closed on the right at
        # the last knot); columns outside the knots take the Taylor expansion (seg -1 / -2)
        seg = np.clip(np.searchsorted(xk, x, side="right") - 1, 0, xk.size - 2).astype(np.int64)
        s = x - xk[seg]
        seg[x < xk[0]] = -1
        seg[x > xk[-1]] = -2
        s = np.where(seg == -1, x - xk[0], np.where(seg == -2, x - xk[-1], s))
        e = np.array([xk[0], xk[-1]])
        ext = np.ascontiguousarray(np.concatenate([f(e[:1]), d1(e[:1]), d2(e[:1]), f(e[1:]), d1(e[1:]),
                                                   d2(e[1:])], axis=0).T)
        coef = np.ascontiguousarray(np.transpose(f.c, (2, 1, 0)))
        return seg, s, coef, ext

    def _columns(self, y):
        """Pass 1 of the evaluation: every bin column interpolated along y to the rows ``y``;
        returns the (len(y), nx_bins) values and the interpolation style."""
        vals = self.values.astype(np.float64)
        nbx = vals.shape[1]
        cols = np.empty((y.size, nbx))
        finite = np.isfinite(vals)
        # the style is that of the smaller dimension (afw), then reduced per column/row
        style = _reduce(self.algorithm, min(vals.shape), self.undersample_style)
        yc = bin_centres(self.y_edges)
        all_good = finite.all(axis=0)
        if all_good.any():
            cols[:, all_good] = interpolate_1d(yc, vals[:, all_good], y, style, self.undersample_style)
        for j in np.flatnonzero(~all_good):
            cols[:, j] = interpolate_1d(yc, vals[:, j], y, style, self.undersample_style)
        return cols, style

    def fill(self, image: np.ndarray, mask: np.ndarray, bits: int) -> None:
        """Set ``image`` to the model wherever ``mask & bits``, in place: the same values as
        ``image[sel] = self.evaluate()[sel]`` (bit for bit), without the full-resolution model.

        Parameters
        ----------
        image : (height, width) float32 array
            Written in place.
        mask : (height, width) int array
        bits : int
            Mask bits selecting the pixels to replace.
        """
        if image.shape != (self.height, self.width) or mask.shape != image.shape:
            raise ValueError(f"image {image.shape} / mask {mask.shape} do not match the model's "
                             f"{(self.height, self.width)}")
        bits = np.int32(bits)
        if self.use_approx:
            return self._fill_rows(image, mask, bits)
        cols, style = self._columns(np.arange(self.height, dtype=np.float64))
        good = np.isfinite(cols).all(axis=0)
        parts = self._row_splines(cols, good, style, np.arange(self.width, dtype=np.float64)) if good.any() else None
        if parts is None:
            return self._fill_rows(image, mask, bits)
        _fill_ppoly_kernel(image, np.asarray(mask, np.int32), bits, False, *parts)

    def _fill_rows(self, image, mask, bits):
        bad = (mask & bits) != 0
        if not bad.any():
            return
        rows = np.flatnonzero(bad.any(axis=1))
        full = self.evaluate(y=rows.astype(np.float64))
        block = image[rows]
        np.copyto(block, full, where=bad[rows])
        image[rows] = block

    def _evaluate_chebyshev(self, xc, yc, x, y) -> np.ndarray:
        from numpy.polynomial import chebyshev as C

        ox = self.approx_order_x
        oy = ox if self.approx_order_y < 0 else self.approx_order_y
        gy, gx = np.meshgrid(yc, xc, indexing="ij")
        v = self.values.astype(np.float64)
        e = self.errors.astype(np.float64)
        ok = np.isfinite(v)
        if self.weighting:
            ok &= np.isfinite(e) & (e > 0)
        if not ok.any():
            return np.full((y.size, x.size), np.nan, np.float32)
        # afw reduces the order when there are too few bins
        ox = min(ox, v.shape[1] - 1)
        oy = min(oy, v.shape[0] - 1)
        sx = lambda t: 2.0 * (t - (self.width - 1) / 2.0) / max(self.width - 1, 1)  # noqa: E731
        sy = lambda t: 2.0 * (t - (self.height - 1) / 2.0) / max(self.height - 1, 1)  # noqa: E731
        terms = [(i, j) for j in range(oy + 1) for i in range(ox + 1) if i + j <= max(ox, oy)]
        Tx = C.chebvander(sx(gx[ok]), ox)
        Ty = C.chebvander(sy(gy[ok]), oy)
        A = np.stack([Tx[:, i] * Ty[:, j] for i, j in terms], axis=1)
        w = 1.0 / e[ok] if self.weighting else np.ones(ok.sum())
        coef, *_ = np.linalg.lstsq(A * w[:, None], v[ok] * w, rcond=None)
        cm = np.zeros((oy + 1, ox + 1))
        for c, (i, j) in zip(coef, terms):
            cm[j, i] = c
        out = C.chebvander(sy(y), oy) @ cm @ C.chebvander(sx(x), ox).T
        return out.astype(np.float32)

    # -- FITS ----------------------------------------------------------------------------------------

    def to_hdulist(self):
        """FITS HDUs: primary = bin values, ``ERRORS`` and ``NPOINT`` image extensions.

        The primary header has ``BOXMINX/BOXMINY/BOXMAXX/BOXMAXY`` (inclusive bbox, also written
        as ``HIERARCH BOX.MINX`` etc. as afw does) and ``ALGORITHM``.
        """
        from astropy.io import fits

        hdr = fits.Header()
        for key, val in zip(("MINX", "MINY", "MAXX", "MAXY"), self.bbox):
            hdr[f"BOX{key}"] = (val, f"image bbox {key} (inclusive)")
            hdr[f"HIERARCH BOX.{key}"] = (val, "as afw writes it")
        hdr["HIERARCH ALGORITHM"] = (self.algorithm, "interpolation style")
        hdr["UNDERSMP"] = (self.undersample_style, "undersample style")
        hdr["USEAPPRX"] = (bool(self.use_approx), "Chebyshev approximation")
        hdr["APPRXOX"] = (self.approx_order_x, "Chebyshev order in x")
        hdr["APPRXOY"] = (self.approx_order_y, "Chebyshev order in y (-1: as x)")
        hdr["APPRXWT"] = (bool(self.weighting), "inverse-variance weights in the fit")
        for k, v in self.meta.items():
            hdr[k if len(k) <= 8 else f"HIERARCH {k}"] = v
        return fits.HDUList([fits.PrimaryHDU(self.values, header=hdr),
                             fits.ImageHDU(self.errors, name="ERRORS"),
                             fits.ImageHDU(self.npoint, name="NPOINT")])

    def to_fits(self, path, overwrite: bool = False) -> None:
        """Write the bin grid (see :meth:`to_hdulist`)."""
        self.to_hdulist().writeto(path, overwrite=overwrite)

    @classmethod
    def from_fits(cls, path_or_hdul) -> "BackgroundModel":
        """Read a model written by :meth:`to_fits` (or an afw-style single-HDU bin grid)."""
        from astropy.io import fits

        own = not isinstance(path_or_hdul, fits.HDUList)
        hdul = fits.open(path_or_hdul) if own else path_or_hdul
        try:
            hdr = hdul[0].header
            values = np.array(hdul[0].data, np.float32)
            names = [h.name for h in hdul]
            errors = np.array(hdul["ERRORS"].data) if "ERRORS" in names else None
            npoint = np.array(hdul["NPOINT"].data) if "NPOINT" in names else None

            def key(k):
                return hdr[f"BOX{k}"] if f"BOX{k}" in hdr else hdr[f"BOX.{k}"]

            bbox = tuple(int(key(k)) for k in ("MINX", "MINY", "MAXX", "MAXY"))
            return cls(values, errors, npoint, bbox, str(hdr.get("ALGORITHM", "NATURAL_SPLINE")),
                       str(hdr.get("UNDERSMP", "REDUCE_INTERP_ORDER")),
                       bool(hdr.get("USEAPPRX", False)), int(hdr.get("APPRXOX", 6)),
                       int(hdr.get("APPRXOY", -1)), bool(hdr.get("APPRXWT", True)))
        finally:
            if own:
                hdul.close()


def measure_background(masked_image: MaskedImage, config: BackgroundConfig | None = None,
                       nx: int | None = None, ny: int | None = None) -> BackgroundModel:
    """Measure a binned background of a masked image.

    Parameters
    ----------
    masked_image : MaskedImage
        The image (its bbox is taken to start at (0, 0)).
    config : BackgroundConfig, optional
        Defaults to ``BackgroundConfig()`` (128-px bins, MEANCLIP, AKIMA, Chebyshev approx).
    nx, ny : int, optional
        Explicit numbers of bins (override the bin sizes).

    Returns
    -------
    BackgroundModel
    """
    cfg = config or BackgroundConfig()
    h, w = masked_image.shape
    bsy = cfg.bin_size_y or cfg.bin_size
    nx = nx or min(n_bins(w, cfg.bin_size, cfg.grid), w)
    ny = ny or min(n_bins(h, bsy, cfg.grid), h)
    xe, ye = bin_edges(w, nx), bin_edges(h, ny)
    val, err, npt, _ = grid_statistics(masked_image.image, masked_image.mask, cfg.ignore_bits, xe, ye,
                                       cfg.statistic, cfg.nsigma, cfg.niter)
    return BackgroundModel(val, err, npt, (0, 0, w - 1, h - 1), cfg.algorithm, cfg.undersample_style,
                           cfg.use_approx, cfg.approx_order_x, cfg.approx_order_y, cfg.weighting)


def subtract_background(masked_image: MaskedImage, config: BackgroundConfig | None = None
                        ) -> BackgroundModel:
    """Measure a background and subtract it from the image plane in place; return the model."""
    model = measure_background(masked_image, config)
    masked_image.image -= model.evaluate()
    return model
