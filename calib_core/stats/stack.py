"""The stacking engine: combine N inputs of one detector per pixel, within a memory budget.

Inputs are intermediate products (IMAGE/MASK/UNCERT FITS, :mod:`calib_core.io.products`) or
in-memory masked images. Files are opened once each; the engine reads bands of rows of every input
(``os.preadv`` into reused buffers), so the working memory is set by ``CombineConfig.memory_budget``
whatever N is, and each byte of each file is read exactly once (ccdproc re-reads whole files per
tile, so its cost grows as N**2, docs/algorithms.md#memory-and-io).

Statistics follow :mod:`calib_core.stats.clipped` (the NumPy reference); MEANCLIP runs in the block /
sorting-network kernel of :mod:`calib_core.stats._kernels` (``meanclip_blocks``), MEAN, MEDIAN and MINMAX
in its per-pixel kernel (``stack_kernel``), SIGMACLIP uses the astropy-backed reference.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Sequence

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from calib_core.configmodel import ClipConfig
from calib_core.io.products import ProductError, RowReader
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.clipped import stack_statistic

__all__ = ["CombineConfig", "stack_arrays", "stack_files", "fill_nans", "rows_per_block", "worker_threads"]


class CombineConfig(ClipConfig):
    """How to combine a stack (pipe_drivers ``CalibCombineConfig`` / cp_pipe ``CalibCombineConfig``)."""

    model_config = ConfigDict(extra="forbid")

    statistic: Literal["MEANCLIP", "MEAN", "MEDIAN", "SIGMACLIP", "MINMAX"] = Field(
        "MEANCLIP", description="per-pixel statistic")
    nlow: int = Field(1, ge=0, description="MINMAX: lowest values rejected per pixel")
    nhigh: int = Field(1, ge=0, description="MINMAX: highest values rejected per pixel")
    mask: list[str] = Field(["SAT", "DETECTED", "INTRP"],
                            description="mask planes whose pixels are not admitted to the stack")
    max_visits_to_calc_error_from_input_variance: int = Field(
        5, ge=0, description="with fewer inputs than this, the output variance comes from the inputs' "
                             "variance planes (cp_pipe default 5) instead of the clipped spread")
    no_good_pixels_mask: str = Field("NO_DATA", description="plane set where no input was admitted")
    memory_budget: int = Field(1 << 30, gt=0, description="bytes of working buffers for the combine")
    fill_nans: bool = Field(True, description="replace remaining NaNs by the plane median and flag BAD")

    @field_validator("mask")
    @classmethod
    def _known_planes(cls, v):
        for name in v:
            try:
                MASK_PLANES.bit(name)
            except KeyError as exc:          # a ValueError, so pydantic reports it as a validation error
                raise ValueError(f"unknown mask plane {name!r}") from exc
        return [n.upper() for n in v]

    @property
    def ignore_bits(self) -> int:
        return MASK_PLANES.bits(self.mask)


def rows_per_block(n_inputs: int, nx: int, bytes_per_pixel: int, budget: int) -> int:
    """Rows per band so that ``n_inputs * rows * nx * bytes_per_pixel <= budget`` (at least 1)."""
    return max(1, int(budget // max(1, n_inputs * nx * bytes_per_pixel)))


def _kernel_stat(config: CombineConfig):
    from calib_core.stats._kernels import STACK_CODES

    return STACK_CODES.get(config.statistic)


_DRIVER = None


def _driver():
    """One thread that runs the combine of a band while the caller reads the next band."""
    global _DRIVER
    if _DRIVER is None:
        from concurrent.futures import ThreadPoolExecutor

        _DRIVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibflow-combine")
    return _DRIVER


#: upper bound on the band buffers actually allocated, whatever the budget: touching fresh memory
#: costs page faults (~2.5 ns/byte on a VM, more than reading the data), so a small buffer reused
#: band after band is faster than one band of the whole budget.
BAND_TARGET_BYTES = 32 << 20


def _heap_zeros(shape, dtype) -> np.ndarray:
    """A zero-filled array for a large output or band buffer, from the heap.

    Memory the process has touched before is reused: with the allocator set for array traffic
    (``tasks.allocator``: blocks up to 32 MB come from the heap, which is kept) a stack's buffers and
    outputs are the pages the previous stack freed, and clearing them is a memset. An anonymous
    ``mmap`` of their own (as before) was shared memory, new pages for every stack: on the benchmark
    VM the kernel took 90 ms per 2 Mpix stack of five inputs to fault and zero them, 15 ms from the
    heap (``docs/architecture.md#fresh-memory``).
    """
    return np.zeros(shape, dtype)


_POOL = None


def worker_threads() -> int:
    """Threads for the numba kernels that release the GIL (the MEANCLIP stack, the trail search):
    numba's thread count (the CPUs, or NUMBA_NUM_THREADS)."""
    import numba

    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def _pool():
    """Worker threads for the MEANCLIP kernel (it releases the GIL)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=worker_threads(), thread_name_prefix="calibflow-meanclip")
    return _POOL


def _forget_pools():
    """In a forked child the pools' threads do not exist: start new ones on first use."""
    global _POOL, _DRIVER
    _POOL = _DRIVER = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


#: work pieces per worker thread and band: the pieces are taken from a queue, so a core slowed by
#: other work takes fewer of them instead of holding up the band
PIECES_PER_THREAD = 8


def _meanclip(data, masks, variances, h, ignore_bits, nsigma, niter, no_data, outs):
    """MEANCLIP of rows :h of a band with the block/sorting-network kernel, on all worker threads.

    The whole buffers are passed with the blocks to do, never a slice of them: a slice of a partly
    filled buffer is not C-contiguous, which numba would compile as a second specialisation.
    """
    from calib_core.stats._kernels import block_width, meanclip_blocks, sorting_program

    n, _, nx = data.shape
    w = block_width(n)
    nb = h * ((nx + w - 1) // w)
    ops, srows = sorting_program(n)
    m = masks if masks is not None else np.zeros((1, 1, 1), np.int32)
    v = variances if variances is not None else np.zeros((1, 1, 1), np.float32)
    args = (data, m, masks is not None, v, variances is not None, np.int32(ignore_bits), ops, srows, w)
    tail = (float(nsigma), int(niter), np.int32(no_data), *outs)
    pool = _pool()
    pieces = max(1, min(nb, PIECES_PER_THREAD * worker_threads()))
    bounds = [k * nb // pieces for k in range(pieces + 1)]
    futures = [pool.submit(meanclip_blocks, *args, bounds[k], bounds[k + 1], *tail) for k in range(pieces)]
    for f in futures:
        f.result()


def _apply_scales(data, variances, scales):
    """Divide input i by scales[i] in float32, as afw ``MaskedImage /= s`` (image/s, variance/s**2)."""
    if scales is None:
        return
    for i, sc in enumerate(scales):
        if sc != 1.0:
            data[i] /= np.float32(sc)
            if variances is not None:
                variances[i] /= np.float32(sc * sc)


def _combine_block(config, data, masks, variances, scales, use_var, out: MaskedImage, n_out, y0, y1):
    """Combine one band: rows :y1-y0 of the buffers ``data`` (N, >= y1-y0, nx), ``masks``,
    ``variances`` -> rows y0:y1 of ``out``. Those rows of ``data``/``variances`` are scaled in place."""
    code = _kernel_stat(config)
    nb = data.shape[0]
    h = y1 - y0
    has_var = bool(use_var and variances is not None)
    if scales is not None:
        _apply_scales(data[:, :h], variances[:, :h] if has_var else None, scales)
    no_data = MASK_PLANES.bit(config.no_good_pixels_mask)
    outs = (out.image[y0:y1], out.variance[y0:y1], out.mask[y0:y1], n_out[y0:y1])
    from calib_core.stats._kernels import STACK_CODES, stack_kernel

    if code == STACK_CODES["MEANCLIP"]:
        _meanclip(data, masks, variances if has_var else None, h, config.ignore_bits,
                  config.nsigma, config.niter, no_data, outs)
        return
    data = data[:, :h]
    masks = None if masks is None else masks[:, :h]
    variances = None if variances is None else variances[:, :h]
    if code is not None:
        dummy_m = masks if masks is not None else np.zeros((1, 1, 1), np.int32)
        dummy_v = variances if has_var else np.zeros((1, 1, 1), np.float32)
        stack_kernel(data, dummy_m, masks is not None, dummy_v, has_var, np.ones(nb),
                     np.int32(config.ignore_bits), code, int(config.nlow), int(config.nhigh),
                     np.int32(no_data), *outs)
        return
    res = stack_statistic(config.statistic, data, masks, config.ignore_bits,
                          variances if has_var else None,
                          sigma=config.nsigma, maxiters=config.niter, no_data_bit=no_data)
    outs[0][...] = res.value
    outs[1][...] = res.variance
    outs[2][...] = res.mask
    outs[3][...] = res.n_used


def _check_scales(scales, n):
    if scales is None:
        return None
    scales = [float(s) for s in scales]
    if len(scales) != n:
        raise ValueError(f"{len(scales)} scales for {n} inputs")
    for i, s in enumerate(scales):
        if not math.isfinite(s) or s == 0:
            raise ValueError(f"scale of input {i} is {s}; scales must be finite and non-zero")
    return scales


def stack_arrays(images: Sequence[MaskedImage], config: CombineConfig | None = None,
                 scales: Sequence[float] | None = None) -> tuple[MaskedImage, np.ndarray]:
    """Combine in-memory masked images per pixel.

    Parameters
    ----------
    images : sequence of MaskedImage
        N inputs of identical shape (ny, nx).
    config : CombineConfig, optional
        Defaults: MEANCLIP 3 sigma, 3 passes, ignore SAT/DETECTED/INTRP.
    scales : sequence of float, optional
        Input i is divided by ``scales[i]`` (image / s, variance / s**2).

    Returns
    -------
    (MaskedImage, n_used)
        The combined image (float32 planes) and the int16 count of inputs used per pixel.
    """
    config = config or CombineConfig()
    if len(images) == 0:
        raise ValueError("no inputs to combine")
    shape = images[0].shape
    for i, im in enumerate(images):
        if im.shape != shape:
            raise ValueError(f"input {i} has shape {im.shape}, input 0 has {shape}")
    scales = _check_scales(scales, len(images))
    data = np.stack([im.image for im in images]).astype(np.float32)  # a copy: scaled in place
    masks = np.stack([im.mask for im in images]).astype(np.int32, copy=False)
    use_var = len(images) < config.max_visits_to_calc_error_from_input_variance
    variances = np.stack([im.variance for im in images]).astype(np.float32, copy=False) if use_var else None
    out = MaskedImage.empty(shape)
    n_out = np.zeros(shape, np.int16)
    _combine_block(config, data, masks, variances, scales, use_var, out, n_out, 0, shape[0])
    if config.fill_nans:
        fill_nans(out)
    return out, n_out


def stack_files(paths: Sequence, config: CombineConfig | None = None,
                scales: Sequence[float] | None = None) -> tuple[MaskedImage, np.ndarray]:
    """Combine intermediate FITS files per pixel, reading row bands within the memory budget.

    Parameters
    ----------
    paths : sequence of path
        N files with an IMAGE plane (and optionally MASK and VARIANCE), all of the same shape.
        A file without MASK is treated as unmasked; without VARIANCE, the output variance comes from
        the spread of the inputs.
    config : CombineConfig, optional
        ``memory_budget`` bounds the two input band buffers (one being combined, one being read):
        2 * N * rows * nx * (4 image + 4 mask + 4 variance when used) bytes <= budget; they are
        also capped at 2 * ``BAND_TARGET_BYTES`` whatever the budget.
    scales : sequence of float, optional
        Input i is divided by ``scales[i]``.

    Returns
    -------
    (MaskedImage, n_used)
    """
    config = config or CombineConfig()
    if len(paths) == 0:
        raise ValueError("no inputs to combine")
    scales = _check_scales(scales, len(paths))
    readers: list[RowReader] = []
    try:
        for p in paths:
            readers.append(RowReader(p))
        shape = readers[0].shape
        for r in readers[1:]:
            if r.shape != shape:
                raise ProductError(r.path, f"shape {r.shape} differs from {readers[0].path} {shape}")
        n = len(readers)
        ny, nx = shape
        has_mask = all(r.has_mask for r in readers)
        use_var = (n < config.max_visits_to_calc_error_from_input_variance
                   and all(r.has_variance for r in readers))
        bpp = 4 + (4 if has_mask else 0) + (4 if use_var else 0)
        # two band buffers: the next band is read while the current one is combined
        rows = min(ny, rows_per_block(n, nx, bpp, min(config.memory_budget // 2, BAND_TARGET_BYTES)))
        buffers = [(_heap_zeros((n, rows, nx), np.float32),
                    _heap_zeros((n, rows, nx), np.int32) if has_mask else None,
                    _heap_zeros((n, rows, nx), np.float32) if use_var else None) for _ in range(2)]
        out = MaskedImage(_heap_zeros(shape, np.float32), _heap_zeros(shape, np.int32),
                          _heap_zeros(shape, np.float32))
        n_out = _heap_zeros(shape, np.int16)

        def read_band(k):
            y0, y1 = k * rows, min(ny, (k + 1) * rows)
            data, masks, variances = buffers[k % 2]
            for i, r in enumerate(readers):
                r.read_into("IMAGE", y0, y1, data[i, : y1 - y0])
                if has_mask:
                    r.read_into("MASK", y0, y1, masks[i, : y1 - y0])
                if use_var:
                    r.read_into("VARIANCE", y0, y1, variances[i, : y1 - y0])

        def combine_band(k):
            y0, y1 = k * rows, min(ny, (k + 1) * rows)
            data, masks, variances = buffers[k % 2]
            _combine_block(config, data, masks, variances, scales, use_var, out, n_out, y0, y1)

        nbands = (ny + rows - 1) // rows
        read_band(0)
        for k in range(nbands):
            pending = _driver().submit(combine_band, k)
            try:
                if k + 1 < nbands:
                    read_band(k + 1)       # file reads release the GIL: overlapped with the combine
            finally:
                pending.result()
    finally:
        for r in readers:
            r.close()
    if config.fill_nans:
        fill_nans(out)
    return out, n_out


def fill_nans(mi: MaskedImage, flag: str = "BAD") -> int:
    """Replace NaNs left in a combined image, cp_pipe style (docs/algorithms.md#nan-fill, ``interpolateNans``).

    A pixel whose image *or* variance is NaN gets the median of the finite image pixels and the
    median of the finite variance pixels, and the ``flag`` plane is set on it.

    This fixes the Gen2 (pipe_drivers) behaviour (docs/algorithms.md#nan-fill), which filled
    the image and variance NaNs independently and set no mask bit, so filled pixels looked like
    valid data downstream and a NaN variance under a finite image was left in place.

    Returns
    -------
    int
        The number of pixels filled.
    """
    bad = ~np.isfinite(mi.image) | ~np.isfinite(mi.variance)
    count = int(bad.sum())
    if count:
        good_img = mi.image[np.isfinite(mi.image)]
        good_var = mi.variance[np.isfinite(mi.variance)]
        mi.image[bad] = np.median(good_img) if good_img.size else np.nan
        mi.variance[bad] = np.median(good_var) if good_var.size else np.nan
        mi.mask[bad] |= np.int32(MASK_PLANES.bit(flag))
    return count
