"""Fringe frames: the preparation of one post-ISR detector image (pipe_drivers ``FringeTask``,
docs/algorithms.md#fringe-preparation: normalise to the sky level, remove the smooth background, flag
sources) and, after the stack, the removal of the sky continuum's pattern from the combined frame (a
departure from the reference, :func:`remove_continuum`, docs/algorithms.md#continuum-removal).

Each prepared input j reads ``y_j = c_j F + K_j + noise``: ``F`` the fringe pattern, ``c_j`` its
amplitude relative to the input's sky level, and ``K_j`` what the smooth background leaves of the
sky continuum, i.e. the continuum's pattern on scales below the background's (128-px bins, then a
Chebyshev polynomial of order <= 6 over the detector: on a 256 x 512 detector only orders 1 x 3).
The reference stops at the stack, so its fringe frame is ``mean(c) F + mean(K)``: on a simulated
night the continuum's pattern (ghost rings, edge glow, ripples, the pattern's 100-600 px waves) is
1.8x the frame's noise floor, and the frame is 2.1x its floor against the injected fringes
(``bench/sky_accuracy.py``). It then does harm twice: defringing subtracts ``s_j mean(K)`` with a
fringe scale ``s_j`` that follows the fringe amplitude, not the continuum, and the sky frame, built
from defringed exposures, lacks that part of the pattern (a z sky frame came out at 0.56 of the
injected pattern, 23x its floor).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calib_core.configmodel import ClipConfig
from calib_core.isr.process import IsrConfig
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.sky.objectmask import DetectionConfig, detect_sources
from calib_core.stats._kernels import continuum_bins, continuum_deviations, continuum_totals
from calib_core.stats.background import BackgroundConfig, BackgroundModel, bin_edges, measure_background, n_bins
from calib_core.stats.binned import box_statistics
from calib_core.stats.stack import CombineConfig

__all__ = ["FringeConfig", "FringeContinuumConfig", "FringeBuildConfig", "prepare_fringe", "remove_continuum"]


class FringeConfig(ClipConfig):
    """FringeTask processing defaults (docs/algorithms.md#fringe-defaults)."""

    model_config = ConfigDict(extra="forbid")
    renamed_keys: ClassVar[dict[str, str]] = {"clip": "nsigma", "n_iter": "niter"}

    stats_mask: list[str] = Field(default_factory=lambda: ["DETECTED", "BAD", "NO_DATA"],
                                  description="planes ignored in the background level (MEANCLIP)")
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
                                 "MEANCLIP", cfg.nsigma, cfg.niter)[0, 0])
    if not (np.isfinite(level) and level > 0):
        raise ValueError(f"fringe preparation: background level {level!r} is not positive")
    model = measure_background(mi, cfg.subtract_background)
    mi.image -= model.evaluate()
    mi /= level
    det = detect_sources(mi.image, mi.mask, cfg.detection)
    mi.mask[det] |= np.int32(mask_bits(["DETECTED"]))
    return mi, level


class FringeContinuumConfig(ClipConfig):
    """Removal of the sky continuum's pattern from the stacked fringe frame (:func:`remove_continuum`;
    not in the reference)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="remove the continuum's pattern after the stack (False: the "
                                            "reference's frame, fringes plus the continuum's short scales)")
    bin_size: int = Field(32, ge=4, description="bin size [px] on which the continuum's pattern is measured "
                                               "and interpolated: the sky frame's (32 px, SkyConfig)")
    algorithm: Literal["NATURAL_SPLINE", "CUBIC_SPLINE", "AKIMA_SPLINE", "LINEAR"] = Field(
        "NATURAL_SPLINE", description="interpolation through the bin centres (the sky frame's)")
    nsigma: float = Field(3.0, gt=0, description="per-bin clip of the inputs in the regression (sigma of each "
                                                 "input's bin mean, from its variance plane)")
    renamed_keys: ClassVar[dict[str, str]] = {"n_iter": "niter"}
    niter: int = Field(3, ge=1, description="regression passes (the first admits every input)")
    mean_preserving_passes: int = Field(4, ge=0, description="passes that correct the spline's nodes until "
                                                            "its mean over each bin is the measured one; 0 = a "
                                                            "spline through the bin means at the bin centres")
    min_inputs: int = Field(5, ge=3, description="fewest inputs for the regression; with fewer the "
                                                "reference's frame is kept")
    mask: list[str] = Field(default_factory=lambda: ["BAD", "SAT", "DETECTED", "NO_DATA", "INTRP"],
                            description="input and frame pixels left out of every statistic")


def _bin_labels(shape, bin_size: int):
    ny, nx = shape
    xe = bin_edges(nx, min(n_bins(nx, bin_size, "round"), nx))
    ye = bin_edges(ny, min(n_bins(ny, bin_size, "round"), ny))
    lab = ((np.searchsorted(ye, np.arange(ny), side="right") - 1)[:, None] * (len(xe) - 1)
           + (np.searchsorted(xe, np.arange(nx), side="right") - 1)[None, :])
    return lab.ravel(), xe, ye


def _flat_planes(mi: MaskedImage):
    """Image, variance and mask of a MaskedImage as flat contiguous arrays (views where they can be)."""
    return tuple(np.ascontiguousarray(p).ravel() for p in (mi.image, mi.variance, mi.mask))


def _load(x) -> MaskedImage:
    if isinstance(x, MaskedImage):
        return x
    from calib_core.io.products import read_product

    return read_product(x)[0]


def _input_amplitudes(inputs: Sequence, shape, bits: int, lab: np.ndarray, nb: int):
    """Step 1 of :func:`remove_continuum` and the inputs' bin means: ``(amp, amp_var, ybin, vbin)``
    (each input's amplitude and its variance; (n_inputs, nb) bin means and their variances), or
    None when an input has no structure within the bins to regress on.

    Per input in numba kernels (calib_core.stats._kernels.continuum_*): what NumPy did with a dozen
    full-image passes per input, in two; the per-bin sums run in pixel order as np.bincount's, so
    the values are the same to the bit (tests/test_fringe.py keeps the NumPy formulation)."""
    def checked(mi):
        if mi.shape != tuple(shape):
            raise ValueError(f"fringe input of shape {mi.shape} does not match the frame's {tuple(shape)}")
        return mi

    n = len(inputs)
    bits = np.int64(bits)
    size = int(np.prod(shape))
    total, count = np.zeros(size), np.zeros(size)
    for x in inputs:
        continuum_totals(*_flat_planes(checked(_load(x))), bits, total, count)
    amp, amp_var, ybin, vbin = np.zeros(n), np.zeros(n), np.full((n, nb), np.nan), np.full((n, nb), np.nan)
    dref, dy, wv = np.empty(size), np.empty(size), np.empty(size)
    for j, x in enumerate(inputs):
        planes = _flat_planes(checked(_load(x)))
        k, sy, sv, kb, sref, syb = continuum_bins(*planes, bits, total, count, lab, nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            ybin[j] = np.where(k > 0, sy / k, np.nan)
            vbin[j] = np.where(k > 0, sv / k ** 2, np.nan)
        # deviations from the bin means, over the pixels both this input and the others have
        kb = np.maximum(kb, 1)
        continuum_deviations(*planes, bits, total, count, lab, sref / kb, syb / kb, dref, dy, wv)
        norm = float(np.sum(dref * dref))
        if norm <= 0:
            return None
        amp[j] = float(np.sum(dy * dref)) / norm
        amp_var[j] = float(np.sum(wv * dref * dref)) / norm ** 2
    return amp, amp_var, ybin, vbin


def remove_continuum(frame: MaskedImage, inputs: Sequence, config: FringeContinuumConfig | None = None
                     ) -> tuple[MaskedImage, dict]:
    """Remove the sky continuum's pattern ``mean(K)`` from a stacked fringe frame (a new MaskedImage).

    Only the exposure-to-exposure variation of the fringe amplitude tells fringes from the continuum:
    fringes follow the OH lines, the continuum the sky level (the reference's FringeTask notes the
    same: "the fringe amplitudes need not scale with the continuum"; cp_pipe's combine moves to a
    PCA for many inputs). Per input alone that separation is several times noisier than the stack,
    so it is made on ``bin_size`` bins, where the continuum's pattern is as smooth as the sky frame
    assumes, and the fringes keep their full resolution:

    1. the amplitude ``c_j`` of each input: its deviations from its own bin means regressed on those
       of the mean of the other inputs (leaving input j out keeps its noise out of its amplitude;
       continuum structure below the bin size and the flat's noise, common to all inputs, add the same
       offset to every ``c_j`` and cancel below);
    2. per bin b, the inputs' bin means regressed on ``c_j`` (weights from their variance planes,
       ``n_iter`` passes clipping inputs beyond ``nsigma``: a cloud, a trail's wings):
       ``y_jb = K_b + c_j F_b``, whose slope ``F_b`` is the fringes' bin mean;
    3. the frame's continuum on bin b is its own bin mean less ``mean(c) F_b``; its noise
       ``mean(c) sigma(F_b)`` sets a shrink factor ``1 - sum(noise^2) / sum(K^2)`` (the least-squares
       optimal one: no pattern, no correction), and the shrunk bins, interpolated, are subtracted.

    Inputs are read one at a time (twice); each must have the frame's shape. The frame's large-scale
    background goes with the continuum (the preparation already removed it, up to noise).

    Parameters
    ----------
    frame : MaskedImage
        The stacked fringe frame (normalised inputs, ``prepare_fringe``).
    inputs : sequence of path or MaskedImage
        The prepared inputs that were stacked.
    config : FringeContinuumConfig, optional

    Returns
    -------
    (MaskedImage, dict)
        The frame less the continuum (variance plus the correction's), and what was done:
        ``applied``, ``reason`` (when not), ``n_inputs``, ``amplitude_spread`` (std of ``c_j`` over
        their mean), ``spread_significance`` (chi^2 of ``c_j`` about their mean per degree of freedom),
        ``shrink``, ``removed_rms`` and ``noise_rms`` (the correction and its noise, RMS over bins),
        ``clipped_fraction``.
    """
    cfg = config or FringeContinuumConfig()
    out = frame.copy()
    n = len(inputs)
    info: dict = {"applied": False, "n_inputs": n}
    if not cfg.enabled:
        return out, {**info, "reason": "disabled"}
    if n < cfg.min_inputs:
        return out, {**info, "reason": f"{n} inputs, fewer than {cfg.min_inputs}"}
    bits = mask_bits(cfg.mask)
    shape = frame.shape
    lab, xe, ye = _bin_labels(shape, cfg.bin_size)
    nb = (len(xe) - 1) * (len(ye) - 1)

    def bsum(values, where):
        return np.bincount(lab, np.where(where, values, 0.0).ravel(), nb)

    def usable(mi):
        return ((mi.mask & bits) == 0) & np.isfinite(mi.image) & np.isfinite(mi.variance)

    measured = _input_amplitudes(inputs, shape, bits, lab, nb)
    if measured is None:
        return out, {**info, "reason": "no structure within the bins to measure fringe amplitudes on"}
    amp, amp_var, ybin, vbin = measured
    cbar = float(amp.mean())
    chi2 = float(np.sum((amp - cbar) ** 2 / np.maximum(amp_var, 1e-300)) / (n - 1))
    info.update(amplitude_spread=float(amp.std() / cbar) if cbar > 0 else float("nan"),
                spread_significance=chi2)
    if not (np.isfinite(cbar) and cbar > 0):
        return out, {**info, "reason": "no fringe signal (mean amplitude not positive)"}
    # the spread must be real: chi^2 per degree of freedom beyond 1 + 3 sigma of its noise
    if chi2 < 1 + 3 * np.sqrt(2.0 / (n - 1)):
        return out, {**info, "reason": "the fringe amplitudes do not vary beyond their noise: the continuum "
                                       "cannot be told from the fringes"}
    keep = np.isfinite(ybin) & np.isfinite(vbin) & (vbin > 0)
    c = amp[:, None]
    for _ in range(cfg.niter):
        w = np.where(keep, 1.0 / np.where(keep, vbin, 1.0), 0.0)
        yv = np.where(keep, ybin, 0.0)
        sw, sc, scc = w.sum(0), (w * c).sum(0), (w * c * c).sum(0)
        sy, scy = (w * yv).sum(0), (w * c * yv).sum(0)
        det = sw * scc - sc * sc
        good = (keep.sum(0) >= 3) & (det > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(good, (sw * scy - sc * sy) / det, np.nan)
            slope_var = np.where(good, sw / det, np.nan)
            icpt = np.where(good, (sy - sc * slope) / sw, np.nan)
            r = np.abs(ybin - icpt - c * slope) / np.sqrt(vbin)
        keep = np.isfinite(ybin) & np.isfinite(vbin) & (vbin > 0) & (np.nan_to_num(r, nan=np.inf) <= cfg.nsigma)
    fok = usable(frame)
    kf = bsum(np.ones(shape), fok)
    with np.errstate(invalid="ignore", divide="ignore"):
        fbin = np.where(kf > 0, bsum(frame.image.astype(np.float64), fok) / kf, np.nan)
    cont = fbin - cbar * slope
    noise2 = cbar ** 2 * slope_var
    fin = np.isfinite(cont) & np.isfinite(noise2)
    if fin.sum() < 1:
        return out, {**info, "reason": "no bin with a measured continuum"}
    power = float(np.sum(cont[fin] ** 2))
    shrink = max(0.0, 1.0 - float(np.sum(noise2[fin])) / power) if power > 0 else 0.0
    grid = (len(ye) - 1, len(xe) - 1)
    target = np.where(fin, shrink * cont, np.nan).reshape(grid)
    ones = np.ones(grid, np.float32)
    bbox = (0, 0, shape[1] - 1, shape[0] - 1)

    def spline(nodes):
        return BackgroundModel(nodes.astype(np.float32), ones, ones.astype(np.int32), bbox, cfg.algorithm,
                               "REDUCE_INTERP_ORDER", False)

    # the interpolated continuum must have, on each bin, the bin mean that was measured: a spline
    # through the bin means at the bin centres falls short of them wherever the pattern curves (a
    # peak, a ring), and the fringe frame then kept that part of the continuum, which the z sky
    # frame lacked (it carried the pattern at 0.96; 0.99 with this). docs/algorithms.md#continuum-removal
    nodes = target.copy()
    npix = np.maximum(np.bincount(lab, minlength=nb), 1)
    for _ in range(cfg.mean_preserving_passes):
        # (np.bincount takes float32 weights as float64)
        binned = (np.bincount(lab, spline(nodes).evaluate().ravel(), nb) / npix).reshape(grid)
        nodes = np.where(np.isfinite(target), nodes + (target - binned), np.nan)
    model = spline(nodes)
    varm = BackgroundModel(np.where(fin, shrink ** 2 * noise2, np.nan).reshape(grid).astype(np.float32), ones,
                           ones.astype(np.int32), bbox, "LINEAR", "REDUCE_INTERP_ORDER", False)
    out.image -= model.evaluate()
    out.variance += np.maximum(varm.evaluate(), 0.0)
    info.update(applied=True, shrink=shrink, removed_rms=float(np.sqrt(np.mean((shrink * cont[fin]) ** 2))),
                noise_rms=float(np.sqrt(np.mean(shrink ** 2 * noise2[fin]))),
                clipped_fraction=float(1.0 - keep[:, fin].sum() / max(np.isfinite(ybin[:, fin]).sum(), 1)))
    return out, info


class FringeBuildConfig(BaseModel):
    """Fringe build (docs/algorithms.md#fringe-build): ISR with bias, dark and flat (do_fringe off), the
    preparation above per input, a plain MEANCLIP stack without scaling that rejects DETECTED, then
    (calibflow, not the reference) the continuum's pattern removed from the stack."""

    model_config = ConfigDict(extra="forbid")

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_fringe=False))
    fringe: FringeConfig = Field(default_factory=FringeConfig)
    combine: CombineConfig = Field(default_factory=CombineConfig)
    continuum: FringeContinuumConfig = Field(default_factory=FringeContinuumConfig)
