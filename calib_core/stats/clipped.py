"""Clipped statistics with the reference (afw ``Statistics``) semantics, for one array or per pixel
across a stack.

This module is the NumPy *reference* implementation. ``calib_core.stats.stack`` has a numba kernel for the
hot path (MEANCLIP/MEAN over many inputs); it is tested to agree with :func:`stack_statistic`.

Statistics, selected by name (docs/algorithms.md#clipped-statistics):

``MEANCLIP``
    Iterated clipped mean. Pixels are *admitted* when finite and ``(mask & ignore_bits) == 0``.
    Pass 0 keeps ``|x - median| <= nsigma * 0.741301109252802 * IQR`` (numpy linear percentiles);
    pass k > 0 keeps ``|x - mean_{k-1}| <= nsigma * sqrt(max(var_{k-1}, 0))`` (the IQR width again
    when pass k-1 kept <= 1 pixel). Every pass selects from *all* admitted pixels (rejections do not
    accumulate); bounds are inclusive; the variance is ddof=1 about the pass mean, in float64. The
    result is the mean of the last pass, error = sqrt(var / n_used).
``MEAN``
    Mean of the admitted pixels, ddof=1 variance, error = sqrt(var / n).
``MEDIAN``
    Median (linear interpolation) of the admitted pixels, error = sqrt(pi/2 * var / n).
``SIGMACLIP``
    ``astropy.stats.sigma_clip`` (same ``sigma``, ``sigma_lower``, ``sigma_upper``, ``maxiters``,
    ``cenfunc``, ``stdfunc``) on the admitted pixels; the value is the mean of the survivors. The
    survivors are exactly astropy's, because astropy does the clipping.
``MINMAX``
    Drop the ``nlow`` lowest and ``nhigh`` highest admitted values, mean of the rest.

``npoint`` is the number of admitted pixels *before* clipping, ``n_used`` the number that enter the
final value; ``or_mask`` is the OR of the mask bits of all admitted pixels (unclipped), as afw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calib_core.maskedimage import mask_bits
from calib_core.stats.warnfilters import nanmedian_quiet

__all__ = ["IQR_TO_SIGMA", "STATISTICS", "ClippedStats", "StackResult", "clipped_mean",
           "compute_statistic", "stack_statistic", "admitted", "nanpercentile0"]

#: afw's IQR -> sigma factor for a Gaussian (1 / (2 * 0.6744897...)).
IQR_TO_SIGMA = 0.741301109252802

STATISTICS = ("MEANCLIP", "MEAN", "MEDIAN", "SIGMACLIP", "MINMAX")

_DEFAULT_NO_DATA = mask_bits(["NO_DATA"])


@dataclass
class ClippedStats:
    """Result of one statistic on one array.

    Attributes
    ----------
    mean : float
        The statistic's value (clipped mean, mean, median, ...); NaN when nothing was admitted.
    variance : float
        ddof=1 variance of the pixels that entered ``mean`` (for MEDIAN, of all admitted pixels).
    error : float
        Standard error of ``mean`` (see the module docstring).
    npoint : int
        Pixels admitted before clipping (finite, not masked).
    n_used : int
        Pixels that entered the final value.
    median : float
        Median of the admitted pixels.
    or_mask : int
        OR of the mask bits of the admitted pixels.
    """

    mean: float
    variance: float
    error: float
    npoint: int
    n_used: int
    median: float
    or_mask: int


@dataclass
class StackResult:
    """Per-pixel result of :func:`stack_statistic`; every array has shape (ny, nx).

    Attributes
    ----------
    value : float32 array
        The statistic, NaN where no input was admitted.
    variance : float32 array
        error**2 of the statistic (or from the input variances, see :func:`stack_statistic`).
    mask : int32 array
        OR of the masks of the admitted inputs; ``no_data_bit`` where none was admitted.
    n_used : int16 array
        Number of inputs that entered the value.
    """

    value: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_used: np.ndarray


def admitted(values: np.ndarray, mask: np.ndarray | None, ignore_bits: int) -> np.ndarray:
    """Boolean array: finite and ``(mask & ignore_bits) == 0``."""
    ok = np.isfinite(values)
    if mask is not None and ignore_bits:
        ok &= (np.asarray(mask) & np.int32(ignore_bits)) == 0
    return ok


def _check_name(name: str) -> str:
    key = str(name).upper()
    if key not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}; choose one of {', '.join(STATISTICS)}")
    return key


def _mean_var(x: np.ndarray) -> tuple[float, float, int]:
    n = x.size
    if n == 0:
        return math.nan, math.nan, 0
    m = float(x.mean())
    if n > 1:
        d = x - m
        var = float(np.dot(d, d)) / (n - 1)
    else:
        var = math.nan
    return m, var, n


def _meanclip_1d(x: np.ndarray, nsigma: float, niter: int) -> tuple[float, float, int, float]:
    """MEANCLIP of finite float64 values ``x``: (mean, variance, n_used, median)."""
    if x.size == 0:
        return math.nan, math.nan, 0, math.nan
    q1, med, q3 = np.percentile(x, [25.0, 50.0, 75.0])
    iqr_width = nsigma * IQR_TO_SIGMA * (q3 - q1)
    if niter < 1:
        m, v, n = _mean_var(x)
        return m, v, n, float(med)
    centre, width = float(med), float(iqr_width)
    mean, var, n = math.nan, math.nan, 0
    for it in range(niter):
        if it > 0:
            centre = mean
            width = nsigma * math.sqrt(max(var, 0.0)) if n > 1 else iqr_width
        if not (math.isfinite(centre) and math.isfinite(width)):
            return math.nan, math.nan, 0, float(med)
        mean, var, n = _mean_var(x[np.abs(x - centre) <= width])
    return mean, var, n, float(med)


def clipped_mean(values, mask=None, ignore_bits: int = 0, nsigma: float = 3.0,
                 niter: int = 3) -> ClippedStats:
    """Reference MEANCLIP of one array (any shape), afw semantics (docs/algorithms.md#meanclip).

    Parameters
    ----------
    values : array_like
        Pixel values (any float dtype; accumulated in float64). NaN/inf are never admitted.
    mask : array_like of int, optional
        Mask bits, same shape as ``values``.
    ignore_bits : int, default 0
        Pixels with any of these bits set are not admitted (afw ``andMask``).
    nsigma : float, default 3.0
        Clip half-width in sigma.
    niter : int, default 3
        Number of clipping passes.

    Returns
    -------
    ClippedStats
    """
    return compute_statistic("MEANCLIP", values, mask, ignore_bits, nsigma=nsigma, niter=niter)


def _sigma_clip_kwargs(params: dict) -> dict:
    return {"sigma": params.get("sigma", params.get("nsigma", 3.0)),
            "sigma_lower": params.get("sigma_lower"), "sigma_upper": params.get("sigma_upper"),
            "maxiters": params.get("maxiters", 5), "cenfunc": params.get("cenfunc", "median"),
            "stdfunc": params.get("stdfunc", "std")}


def compute_statistic(name: str, values, mask=None, ignore_bits: int = 0, **params) -> ClippedStats:
    """One statistic of one array, chosen by name.

    Parameters
    ----------
    name : {"MEANCLIP", "MEAN", "MEDIAN", "SIGMACLIP", "MINMAX"}
    values : array_like
        Pixel values, any shape.
    mask : array_like of int, optional
        Mask bits, same shape.
    ignore_bits : int, default 0
        Mask bits that exclude a pixel.
    **params
        MEANCLIP: ``nsigma`` (3.0), ``niter`` (3).
        SIGMACLIP: ``sigma`` (3.0), ``sigma_lower``, ``sigma_upper``, ``maxiters`` (5),
        ``cenfunc`` ("median"), ``stdfunc`` ("std") as in astropy.
        MINMAX: ``nlow`` (1), ``nhigh`` (1): how many of the lowest/highest values to drop.

    Returns
    -------
    ClippedStats
    """
    key = _check_name(name)
    values = np.asarray(values)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {mask.shape} differs from values shape {values.shape}")
    ok = admitted(values, mask, ignore_bits)
    x = values[ok].astype(np.float64).ravel()
    npoint = int(x.size)
    or_mask = int(np.bitwise_or.reduce(mask[ok].ravel())) if (mask is not None and npoint) else 0
    median = float(np.median(x)) if npoint else math.nan

    if key == "MEANCLIP":
        mean, var, n, _ = _meanclip_1d(x, float(params.get("nsigma", 3.0)), int(params.get("niter", 3)))
        err = math.sqrt(var / n) if n > 0 else math.nan
    elif key == "MEAN":
        mean, var, n = _mean_var(x)
        err = math.sqrt(var / n) if n > 0 else math.nan
    elif key == "MEDIAN":
        _, var, n = _mean_var(x)
        mean = median
        err = math.sqrt(math.pi / 2 * var / n) if n > 0 else math.nan
    elif key == "SIGMACLIP":
        from astropy.stats import sigma_clip

        kept = x
        if npoint:
            clipped = sigma_clip(x, masked=True, copy=True, **_sigma_clip_kwargs(params))
            kept = np.asarray(clipped.data[~np.ma.getmaskarray(clipped)], dtype=np.float64)
        mean, var, n = _mean_var(kept)
        err = math.sqrt(var / n) if n > 0 else math.nan
    else:  # MINMAX
        nlow, nhigh = int(params.get("nlow", 1)), int(params.get("nhigh", 1))
        if nlow < 0 or nhigh < 0:
            raise ValueError(f"MINMAX needs nlow, nhigh >= 0, got {nlow}, {nhigh}")
        xs = np.sort(x)
        mean, var, n = _mean_var(xs[nlow:xs.size - nhigh] if xs.size > nlow + nhigh else xs[:0])
        err = math.sqrt(var / n) if n > 0 else math.nan
    return ClippedStats(mean=float(mean), variance=float(var), error=float(err), npoint=npoint,
                        n_used=int(n), median=median, or_mask=or_mask)


# ---------------------------------------------------------------------------------------------------
# per pixel across a stack (vectorised NumPy reference)
# ---------------------------------------------------------------------------------------------------


def _masked_mean_var(x: np.ndarray, sel: np.ndarray):
    """Mean, ddof=1 variance and count along axis 0 of float64 ``x`` where ``sel``."""
    n = sel.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sel, x, 0.0).sum(axis=0) / n
        d = np.where(sel, x - mean, 0.0)
        var = (d * d).sum(axis=0) / (n - 1)
    mean = np.where(n > 0, mean, np.nan)
    var = np.where(n > 1, var, np.nan)
    return mean, var, n


def nanpercentile0(x: np.ndarray, qs) -> np.ndarray:
    """``np.nanpercentile(x, qs, axis=0)`` (its default ``linear`` method), the same values, vectorised.

    NumPy computes a NaN-aware percentile column by column (``apply_along_axis``) as soon as one value
    is NaN; on the sky build's (exposures x bins) stacks that was half of the serial focal-plane
    barrier. Here: one sort along axis 0 (NaNs sort last), then NumPy's own rule per column: virtual
    index ``(n - 1) q / 100`` over the ``n`` finite values, interpolated as its ``_lerp`` does. A
    column without a finite value gives NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    xs = np.sort(x, axis=0)
    n = np.sum(~np.isnan(x), axis=0)
    last = np.maximum(n - 1, 0)
    out = np.empty((len(qs),) + x.shape[1:])
    for i, q in enumerate(qs):
        pos = last * (float(q) / 100.0)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, last)
        t = pos - lo
        a = np.take_along_axis(xs, lo[None], axis=0)[0]
        b = np.take_along_axis(xs, hi[None], axis=0)[0]
        d = b - a
        with np.errstate(invalid="ignore"):
            value = np.where(t >= 0.5, b - d * (1 - t), a + d * t)
        out[i] = np.where(n > 0, value, np.nan)
    return out


def _stack_meanclip(x, ok, nsigma, niter):
    q1, med, q3 = nanpercentile0(np.where(ok, x, np.nan), [25.0, 50.0, 75.0])
    iqr_width = nsigma * IQR_TO_SIGMA * (q3 - q1)
    if niter < 1:
        return (*_masked_mean_var(x, ok), ok)
    centre, width = med, iqr_width
    mean = var = n = None
    for it in range(niter):
        if it > 0:
            centre = mean
            width = np.where(n > 1, nsigma * np.sqrt(np.maximum(np.nan_to_num(var, nan=0.0), 0.0)),
                             iqr_width)
        with np.errstate(invalid="ignore"):
            sel = ok & (np.abs(x - centre) <= width)
        mean, var, n = _masked_mean_var(x, sel)
    return mean, var, n, sel


def stack_statistic(name: str, data, masks=None, ignore_bits: int = 0, variances=None,
                    **params) -> StackResult:
    """A statistic per pixel across a stack of images (NumPy reference implementation).

    Parameters
    ----------
    name : {"MEANCLIP", "MEAN", "MEDIAN", "SIGMACLIP", "MINMAX"}
    data : array, shape (N, ny, nx)
        The input images (float32 or float64; accumulated in float64).
    masks : int32 array, shape (N, ny, nx), optional
        Mask bits of the inputs.
    ignore_bits : int, default 0
        Bits that exclude an input pixel (afw ``andMask``).
    variances : array, shape (N, ny, nx), optional
        Input variances. When given, the output variance is computed from them (afw
        ``calcErrorFromInputVariance``): ``sum(var_i over used inputs) / n_used**2`` (times pi/2 for
        MEDIAN). When None, it is error**2 from the spread of the inputs (ddof=1), NaN when
        fewer than two inputs are used.
    **params
        Parameters of the statistic (see :func:`compute_statistic`), plus ``no_data_bit``
        (default: the NO_DATA bit), the mask value of pixels with no admitted input.

    Returns
    -------
    StackResult
    """
    key = _check_name(name)
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must have shape (N, ny, nx), got {data.shape}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != data.shape:
            raise ValueError(f"masks shape {masks.shape} differs from data shape {data.shape}")
    if variances is not None:
        variances = np.asarray(variances)
        if variances.shape != data.shape:
            raise ValueError(f"variances shape {variances.shape} differs from data shape {data.shape}")
    no_data_bit = int(params.get("no_data_bit", _DEFAULT_NO_DATA))
    ok = admitted(data, masks, ignore_bits)
    x = data.astype(np.float64)
    npoint = ok.sum(axis=0)

    if key == "MEANCLIP":
        mean, var, n, used = _stack_meanclip(x, ok, float(params.get("nsigma", 3.0)),
                                             int(params.get("niter", 3)))
        value = mean
    elif key == "MEAN":
        value, var, n = _masked_mean_var(x, ok)
        used = ok
    elif key == "MEDIAN":
        xn = np.where(ok, x, np.nan)
        value = nanmedian_quiet(xn, axis=0)
        _, var, n = _masked_mean_var(x, ok)
        var = var * (math.pi / 2)
        used = ok
    elif key == "SIGMACLIP":
        from astropy.stats import sigma_clip

        xm = np.ma.masked_array(np.where(ok, x, np.nan), mask=~ok)
        clipped = sigma_clip(xm, axis=0, masked=True, copy=True, **_sigma_clip_kwargs(params))
        used = ok & ~np.ma.getmaskarray(clipped)
        value, var, n = _masked_mean_var(x, used)
    else:  # MINMAX
        nlow, nhigh = int(params.get("nlow", 1)), int(params.get("nhigh", 1))
        if nlow < 0 or nhigh < 0:
            raise ValueError(f"MINMAX needs nlow, nhigh >= 0, got {nlow}, {nhigh}")
        # rank of each admitted value among the admitted values of its pixel (stable)
        keyed = np.where(ok, x, np.inf)
        order = np.argsort(keyed, axis=0, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(x.shape[0])[:, None, None] * np.ones_like(order), axis=0)
        used = ok & (rank >= nlow) & (rank < (npoint - nhigh)[None])
        value, var, n = _masked_mean_var(x, used)

    with np.errstate(invalid="ignore", divide="ignore"):
        if variances is not None:
            vsum = np.where(used, variances.astype(np.float64), 0.0).sum(axis=0)
            out_var = vsum / (n.astype(np.float64) ** 2)
            if key == "MEDIAN":
                out_var = out_var * (math.pi / 2)
            out_var = np.where(n > 0, out_var, np.nan)
        else:
            out_var = var / n

    if masks is not None:
        out_mask = np.bitwise_or.reduce(np.where(ok, masks, 0).astype(np.int32), axis=0)
    else:
        out_mask = np.zeros(data.shape[1:], np.int32)
    out_mask = np.where(npoint == 0, np.int32(no_data_bit), out_mask).astype(np.int32)
    value = np.where(npoint == 0, np.nan, value)
    return StackResult(value=value.astype(np.float32), variance=np.asarray(out_var, np.float32),
                       mask=out_mask, n_used=n.astype(np.int16))
