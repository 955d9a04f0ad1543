"""Instrument signature removal (ISR) of one raw detector (docs/algorithms.md#instrument-signature-removal).

Order, per detector: saturation masking on the raw ADU -> overscan correction per amplifier ->
trim and assemble the amplifiers -> defects (BAD) -> bias subtraction -> variance -> dark
subtraction (scaled by dark time) -> fringe subtraction -> flat division.

Every step is switched by :class:`IsrConfig` (field names follow ip_isr's ``IsrConfig``).
Units: the output image is in ADU (gains are only used for the variance).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field

from calib_core.configmodel import ConfigModel
from calib_core.errors import DataError
from calib_core.io.raw import RawAmp, RawDetector
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats._kernels import (bridge_rows, calibrate_pixels, fringe_fit_inputs, fringe_fit_pass,
                                       subtract_level)
from calib_core.stats.background import BackgroundConfig, measure_background
from calib_core.stats.binned import image_statistic
from calib_core.stats.warnfilters import nanmean_quiet, nanmedian_quiet

__all__ = ["IsrConfig", "IsrError", "run_isr", "interpolate_over", "overscan_correction", "fit_fringe_scale"]


class IsrError(DataError):
    """ISR cannot run: a missing calibration, a shape mismatch, a bad overscan."""


class IsrConfig(ConfigModel):
    """Switches and parameters of :func:`run_isr` (ip_isr ``IsrTask`` defaults where they exist)."""

    model_config = ConfigDict(extra="forbid")
    reference_names: ClassVar[dict[str, str]] = {"do_overscan": "doOverscan", "do_assemble": "doAssemble", "do_saturation": "doSaturation", "do_defect": "doDefect", "use_ptc_gains": "usePtcGains", "do_bias": "doBias", "do_variance": "doVariance", "do_dark": "doDark", "do_flat": "doFlat", "do_fringe": "doFringe", "fringe_after_flat": "fringeAfterFlat", "overscan_fit_type": "overscanFitType", "overscan_order": "overscanOrder", "overscan_nsigma": "overscanNumSigmaClip", "overscan_niter": "overscanNumIter", "fringe_mask": "fringeMask", "do_interpolate": "doInterpolate", "mask_list_to_interpolate": "maskListToInterpolate", "interpolate_along": "interpolateAlong"}

    do_overscan: bool = Field(True, description="subtract the overscan level per amplifier")
    do_assemble: bool = Field(True, description="trim and assemble the amplifiers into the detector; "
                             "if False the output keeps the raw HDU geometry (one HDU per detector only)")
    do_saturation: bool = Field(True, description="flag SAT where the raw ADU >= the amp's saturation")
    do_defect: bool = Field(True, description="flag BAD where the certified defects mask (if one exists) is set")
    use_ptc_gains: bool = Field(True, description="gains and read noises of the certified PTC product (where one "
                              "exists) instead of the camera file's, for the variance plane")
    do_bias: bool = Field(True, description="subtract the master bias (MaskedImage subtraction)")
    do_variance: bool = Field(True, description="variance = max(image,0)/gain + (read_noise/gain)**2, ADU**2")
    do_dark: bool = Field(True, description="subtract the dark scaled by darktime / dark's darktime")
    do_flat: bool = Field(True, description="divide by the flat")
    do_fringe: bool = Field(False, description="subtract a scaled fringe frame")
    fringe_after_flat: bool = Field(True, description="subtract the fringe after flat-fielding (ip_isr default "
                                  "True: fringe frames are built from flat-fielded images)")
    overscan_fit_type: Literal["MEDIAN", "MEAN", "MEANCLIP", "MEDIAN_PER_ROW", "MEAN_PER_ROW", "POLY"] = Field(
        "MEDIAN", description="overscan statistic: one level per amp, one per row (column for "
                              "parallel overscans), or a polynomial along the readout")
    overscan_order: int = Field(1, ge=0, le=10, description="POLY order")
    overscan_nsigma: float = Field(3.0, gt=0, description="MEANCLIP clip (sigma)")
    overscan_niter: int = Field(3, ge=1, description="MEANCLIP passes")
    fringe_mask: list[str] = Field(["BAD", "SAT", "DETECTED", "NO_DATA", "CR"],
                                  description="planes excluded from the fringe scale fit")
    do_interpolate: bool = Field(False, description="at the end of ISR, replace the pixels of "
                                "mask_list_to_interpolate (and any non-finite pixel, flagged BAD) by linear "
                                "interpolation along their row, flagged INTRP (ip_isr do_interpolate); "
                                "the sky build and apply-sky switch it on")
    mask_list_to_interpolate: list[str] = Field(["BAD"], description="planes interpolated over; SAT is "
                                             "left alone so saturated stars stay bright for detection")
    interpolate_along: Literal["row", "column", "shorter"] = Field(
        "row", description="bridge a bad pixel along its row (ip_isr's default), its column, or whichever "
                           "of the two crosses the shorter run of bad pixels (a bad row along columns)")


def _overscan_profile(amp: RawAmp, config: IsrConfig, path: str) -> np.ndarray:
    """The overscan level to subtract from ``amp.data``: a scalar array or a 1-D per-row/column
    profile broadcastable against ``amp.data``."""
    over = amp.overscan
    if over is None or over.size == 0:
        raise IsrError(f"{path}: amplifier {amp.name} has no overscan region but do_overscan is set")
    over = np.asarray(over, dtype=np.float64)
    # saturated overscan pixels (bleed trails) are not part of the level
    over = np.where(over >= amp.saturation, np.nan, over)
    fit = config.overscan_fit_type
    if fit in ("MEDIAN", "MEAN", "MEANCLIP"):
        good = over[np.isfinite(over)]
        if good.size == 0:
            raise IsrError(f"{path}: amplifier {amp.name}: no unsaturated overscan pixels")
        if fit == "MEDIAN":
            return np.array(np.median(good))
        if fit == "MEAN":
            return np.array(good.mean())
        return np.array(image_statistic("MEANCLIP", good, nsigma=config.overscan_nsigma,
                                        niter=config.overscan_niter).mean)

    axis = amp.overscan_axis          # 1: overscan columns -> one value per row
    collapse = nanmean_quiet if fit == "MEAN_PER_ROW" else nanmedian_quiet
    values = collapse(over, axis=axis)
    # coordinates of the profile and of the data along the readout, in raw pixels
    os_sl = amp.overscan_slices[0 if axis == 1 else 1]
    d_sl = amp.data_slices[0 if axis == 1 else 1]
    n_raw = amp.raw.shape[0 if axis == 1 else 1]
    ocoord = np.arange(n_raw)[os_sl]
    dcoord = np.arange(n_raw)[d_sl]
    good = np.isfinite(values)
    if fit == "POLY":
        if good.sum() <= config.overscan_order:
            raise IsrError(f"{path}: amplifier {amp.name}: too few overscan rows for a POLY "
                           f"of order {config.overscan_order}")
        # fit in a centred, scaled coordinate for conditioning
        c0, cs = ocoord.mean(), max(1.0, (ocoord.max() - ocoord.min()) / 2)
        coef = np.polynomial.polynomial.polyfit((ocoord[good] - c0) / cs, values[good], config.overscan_order)
        prof = np.polynomial.polynomial.polyval((dcoord - c0) / cs, coef)
    else:
        lookup = dict(zip(ocoord.tolist(), values.tolist()))
        missing = [c for c in dcoord.tolist() if c not in lookup]
        if missing:
            raise IsrError(f"{path}: amplifier {amp.name}: the overscan does not cover data "
                           f"{'rows' if axis == 1 else 'columns'} {missing[0]}..{missing[-1]}; "
                           f"use a scalar or POLY overscan fit")
        prof = np.array([lookup[c] for c in dcoord.tolist()])
        if not np.any(np.isfinite(prof)):
            raise IsrError(f"{path}: amplifier {amp.name}: no unsaturated overscan pixels")
        if not np.all(np.isfinite(prof)):
            # a fully saturated overscan row: use the median of the others
            prof = np.where(np.isfinite(prof), prof, np.nanmedian(prof))
    return prof[:, None] if axis == 1 else prof[None, :]


def overscan_correction(amp: RawAmp, config: IsrConfig | None = None, path: str = "") -> np.ndarray:
    """Overscan-subtracted data of one amplifier (float32, the shape of ``amp.data``).

    Parameters
    ----------
    amp : RawAmp
        ``overscan_axis`` 1 means overscan columns (a level per row), 0 overscan rows (per column).
    config : IsrConfig, optional
        ``overscan_fit_type``: MEDIAN (default), MEAN, MEANCLIP (a single level); MEDIAN_PER_ROW,
        MEAN_PER_ROW (one level per row/column); POLY (polynomial of ``overscan_order`` fitted to the
        per-row medians along the readout).
    path : str
        For error messages.
    """
    config = config or IsrConfig()
    level = np.asarray(_overscan_profile(amp, config, path), np.float64)
    data = np.asarray(amp.data)
    out = np.empty(data.shape, np.float32)
    subtract_level(data, level.reshape((1, 1) if level.ndim == 0 else level.shape), out)   # float64 difference
    return out


def fit_fringe_scale(image: MaskedImage, fringe, ignore_bits: int, background: BackgroundConfig | None = None,
                     clip: float = 3.0, n_iter: int = 10) -> float:
    """Amplitude of a fringe frame in an image (docs/algorithms.md#fringe-subtraction-in-isr).

    1. the image's binned background (``background``: the fringe preparation's, so image and frame
       are compared on the same footing) is subtracted: the sky pattern's structure, which a plain
       regression would read as fringes wherever it happens to correlate with them, goes with it
       (the reference measures the same way: each fringe sample is a small box less its
       surroundings);
    2. ``image = a + s * fringe`` by weighted least squares (weights from the variance plane; an
       intercept absorbs what the background leaves) on finite pixels whose image and frame masks
       have none of ``ignore_bits``;
    3. up to ``n_iter`` passes drop the pixels beyond ``clip`` robust sigma of the fit: ISR runs before
       object detection, so stars and galaxies are unmasked, and one bright star on a detector moved
       a plain fit by 20-80 % (democam_mini z, seed 11); the clipped fit is within 1 % of the truth.

    ``background=None`` uses the fringe preparation's default (128-px bins); ``clip=inf`` gives one
    unclipped pass.

    Returns
    -------
    float
        ``s``.
    """
    f = fringe.image if isinstance(fringe, MaskedImage) else np.asarray(fringe, np.float32)
    fmask = fringe.mask if isinstance(fringe, MaskedImage) else 0
    good = np.isfinite(image.image) & np.isfinite(f) & (((image.mask | fmask) & ignore_bits) == 0)
    if good.sum() < 3:
        raise IsrError("too few good pixels to fit the fringe scale")
    # the background's input: non-finite pixels 0, pixels not fitted BAD (only image and mask are read)
    work = MaskedImage(np.where(np.isfinite(image.image), image.image, np.float32(0.0)),
                       np.where(good, image.mask, image.mask | np.int32(MASK_PLANES.bit("BAD"))), image.variance)
    model = measure_background(work, background or _fringe_background())
    # the good pixels' x = frame, y = image - background (float32, as the planes) and w = 1 / variance
    # (float64; 0 where not finite and positive), in one pass
    x, y, w = fringe_fit_inputs(image.image.ravel(), f.ravel(), model.evaluate().ravel(),
                                image.variance.ravel(), good.ravel())
    if not np.any(w > 0):
        w = np.ones(x.size)
    keep = w > 0
    # each pass in one kernel (the previous pass's clip, sums, residuals and their median, without
    # copying the kept pixels): the same arithmetic as the NumPy formulation, up to the order of the
    # sums (tests/test_isr.py keeps that formulation as the reference)
    sqw = np.sqrt(w)
    absr = np.empty(x.size)             # float64 residuals: their median is numpy's, bit for bit
    buf = np.empty(x.size)
    s = med = limit = math.nan
    for _ in range(max(n_iter, 1)):
        go_on, sxx, s_pass, med = fringe_fit_pass(x, y, w, sqw, keep, absr, buf, limit, med)
        if not go_on:
            break
        if not sxx > 0:
            raise IsrError("fringe frame is constant over the good pixels; cannot fit its scale")
        s = float(s_pass)
        sigma = 1.4826 * float(med)
        if not (math.isfinite(clip) and sigma > 0):
            break
        limit = clip * sigma
    return s


def _fringe_background() -> BackgroundConfig:
    # the fringe preparation's background (calib_core.builds.fringe.FringeConfig.subtract_background default)
    return BackgroundConfig()


_OFF_F = np.zeros((1, 1), np.float32)
_OFF_M = np.zeros((1, 1), np.int32)
_OFF_F.flags.writeable = _OFF_M.flags.writeable = False


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only C-contiguous view (a copy only when ``a`` is not contiguous): calib planes reach the
    kernel as one array type whether or not they come from the read-only calib cache, so numba
    compiles one specialisation of it."""
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v


def calibrate(mi: MaskedImage, gain: np.ndarray, read_noise: np.ndarray, *, bias: MaskedImage | None = None,
              variance: bool = False, dark: MaskedImage | None = None, dark_scale: float = 0.0,
              flat: MaskedImage | None = None) -> MaskedImage:
    """Subtract ``bias``, add the signal and read-noise variance (``variance``), subtract
    ``dark_scale * dark`` and divide by ``flat``, in that order and in place, in one sweep
    (:func:`calib_core.stats._kernels.calibrate_pixels`): the same float32 arithmetic as
    ``mi -= bias``, ``variance += maximum(image, 0)/gain + (read_noise/gain)**2``,
    ``mi.scaled_minus(dark_scale, dark)`` and
    ``mi.divide_by(flat)`` one after another, without their temporaries
    (docs/algorithms.md#isr-in-one-sweep). A step whose calib is None is skipped; ``gain`` and
    ``read_noise`` (per pixel, float32) are read only with ``variance``."""
    def planes(cal):
        if cal is None:
            return _OFF_F, _OFF_M, _OFF_F
        return _read_only(cal.image), _read_only(cal.mask), _read_only(cal.variance)

    calibrate_pixels(mi.image, mi.mask, mi.variance, gain, read_noise, bias is not None, *planes(bias),
                     bool(variance), dark is not None, np.float32(dark_scale), *planes(dark),
                     flat is not None, *planes(flat))
    return mi


def _calib_image(calib, shape, what, path):
    if not isinstance(calib, MaskedImage):
        calib = MaskedImage.from_image(np.asarray(calib, np.float32))
    if calib.shape != tuple(shape):
        raise IsrError(f"{path}: {what} has shape {calib.shape} but the detector is {tuple(shape)}")
    return calib


def run_isr(raw_detector: RawDetector, config: IsrConfig | None = None, bias=None, dark=None,
            flat=None, fringe=None, darktime: float | None = None, defects=None, *,
            dark_darktime: float = 1.0, fringe_scale: float | None = None,
            gains: dict[str, float] | None = None, read_noises: dict[str, float] | None = None,
            path: str = "") -> MaskedImage:
    """Run ISR on one raw detector.

    Parameters
    ----------
    raw_detector : RawDetector
        From :func:`calib_core.io.raw.read_raw`.
    config : IsrConfig, optional
        Step switches (defaults: overscan MEDIAN, assemble, saturation, defects, bias, variance,
        dark, flat on; fringe off).
    bias, dark, flat, fringe : MaskedImage or array (ny, nx), optional
        Calibrations in assembled detector geometry. Required when their step is on.
    darktime : float, optional
        Dark time of this exposure (s); required for ``do_dark``.
    defects : array (ny, nx), optional
        Nonzero where a pixel is defective; flagged BAD.
    dark_darktime : float, default 1.0
        Dark time the dark frame is normalised to (products of this package: 1.0).
    fringe_scale : float, optional
        Amplitude of the fringe frame; fitted by least squares when None (:func:`fit_fringe_scale`).
    gains, read_noises : dict amplifier name -> float, optional
        Measured gains (e-/ADU) and read noises (e-) (a PTC product) that replace the camera file's
        in the variance plane, amplifier by amplifier (docs/algorithms.md#photon-transfer-curve).
    path : str
        Raw file name for error messages.

    Returns
    -------
    MaskedImage
        float32 image (ADU), int32 mask (SAT, BAD, and the calibrations' masks ORed in), float32
        variance (ADU**2, zero when ``do_variance`` is off).
    """
    config = config or IsrConfig()
    path = path or str(raw_detector.header.get("FILENAME", raw_detector.detector.name))
    amps = raw_detector.amps
    if config.do_assemble:
        shape = tuple(raw_detector.shape)
    else:
        if any(a.raw is not amps[0].raw for a in amps):
            raise IsrError(f"{path}: do_assemble=False needs all amplifiers in one HDU")
        shape = amps[0].raw.shape
    image = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.int32)
    gain = np.ones(shape, np.float32)
    rn = np.zeros(shape, np.float32)
    sat_bit = MASK_PLANES.bit("SAT")
    placed = np.zeros(shape, bool)
    for amp in amps:
        data = overscan_correction(amp, config, path) if config.do_overscan else np.asarray(amp.data, np.float32)
        sat = np.asarray(amp.data) >= amp.saturation if config.do_saturation else None
        if config.do_assemble:
            dest = amp.det_slices
            if amp.flip_x:
                data = data[:, ::-1]
                sat = None if sat is None else sat[:, ::-1]
            if amp.flip_y:
                data = data[::-1, :]
                sat = None if sat is None else sat[::-1, :]
        else:
            dest = amp.data_slices
            if not config.do_overscan:
                image[:] = amps[0].raw  # keep overscan pixels visible in the raw geometry
        if image[dest].shape != data.shape:
            raise IsrError(f"{path}: amplifier {amp.name} data {data.shape} does not fit its place "
                           f"{image[dest].shape} in the detector")
        image[dest] = data
        placed[dest] = True
        if sat is not None:
            m = mask[dest]
            np.bitwise_or(m, np.int32(sat_bit), out=m, where=sat)
        gain[dest] = (gains or {}).get(amp.name, amp.gain)
        rn[dest] = (read_noises or {}).get(amp.name, amp.read_noise)
    if config.do_assemble and not placed.all():
        np.bitwise_or(mask, np.int32(MASK_PLANES.bit("NO_DATA")), out=mask, where=~placed)
    mi = MaskedImage(image, mask, np.zeros(shape, np.float32))

    if config.do_defect and defects is not None:
        defects = np.asarray(defects)
        if defects.shape != shape:
            raise IsrError(f"{path}: defect mask has shape {defects.shape}, detector is {shape}")
        np.bitwise_or(mi.mask, np.int32(MASK_PLANES.bit("BAD")), out=mi.mask, where=defects != 0)

    # validate first: the steps then run as one sweep over the pixels (calibrate_pixels)
    if config.do_bias and bias is None:
        raise IsrError(f"{path}: do_bias is set but no bias was given")
    if config.do_dark:
        if dark is None:
            raise IsrError(f"{path}: do_dark is set but no dark was given")
        if darktime is None or not math.isfinite(darktime):
            raise IsrError(f"{path}: do_dark needs the exposure's dark time, got {darktime!r}")
        if not (math.isfinite(dark_darktime) and dark_darktime > 0):
            raise IsrError(f"{path}: the dark's dark time must be > 0, got {dark_darktime!r}")
    if config.do_flat and flat is None:
        raise IsrError(f"{path}: do_flat is set but no flat was given")
    bias_mi = _calib_image(bias, shape, "bias", path) if config.do_bias else None
    dark_mi = _calib_image(dark, shape, "dark", path) if config.do_dark else None
    flat_mi = _calib_image(flat, shape, "flat", path) if config.do_flat else None
    c_dark = darktime / dark_darktime if config.do_dark else 0.0

    def defringe():
        if fringe is None:
            raise IsrError(f"{path}: do_fringe is set but no fringe frame was given")
        fr = _calib_image(fringe, shape, "fringe", path)
        scale = fringe_scale if fringe_scale is not None else fit_fringe_scale(
            mi, fr, MASK_PLANES.bits(config.fringe_mask))
        mi.scaled_minus(scale, fr)

    # the variance step is ip_isr's updateVariance: image/gain + (rn/gain)**2 in ADU**2, per amp. The
    # Poisson term uses the bias-subtracted signal (clipped at 0); the master bias's variance, added by
    # the subtraction, is kept (ip_isr overwrites it).
    if config.do_fringe and not config.fringe_after_flat:
        calibrate(mi, gain, rn, bias=bias_mi, variance=config.do_variance, dark=dark_mi, dark_scale=c_dark)
        defringe()
        calibrate(mi, gain, rn, flat=flat_mi)
    else:
        calibrate(mi, gain, rn, bias=bias_mi, variance=config.do_variance, dark=dark_mi, dark_scale=c_dark,
                  flat=flat_mi)
        if config.do_fringe:
            defringe()
    if config.do_interpolate:
        interpolate_over(mi, MASK_PLANES.bits(config.mask_list_to_interpolate), config.interpolate_along)
    return mi


def _runs(bad: np.ndarray) -> np.ndarray:
    """Length of the run of consecutive True values along axis 1 that each pixel belongs to (0 where False)."""
    out = np.zeros(bad.shape, np.int32)
    for y in np.flatnonzero(bad.any(axis=1)):
        b = np.concatenate(([False], bad[y], [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(b))
        for a, e in zip(edges[::2], edges[1::2]):
            out[y, a:e] = e - a
    return out


def interpolate_over(mi: MaskedImage, bits: int, along: str = "row") -> int:
    """Replace the pixels whose mask has any of ``bits``, and every non-finite pixel, by linear
    interpolation between the nearest good pixels of the same row (``along="row"``; constant beyond
    the last good one), of the same column (``"column"``), or of whichever of the two crosses the
    shorter run of bad pixels through it (``"shorter"``: a bad column is bridged along rows, a bad
    row along columns); non-finite pixels are flagged BAD, replaced pixels INTRP. In place; returns
    the count.

    A bad column (the common CCD defect) is bridged by its row neighbours. The reference
    (ip_isr ``interpolateOverDefects``) fits a Gaussian-PSF-sized neighbourhood instead; a linear
    bridge across a 1-3 px column is within noise of it for sky-dominated images, and what matters
    downstream is that no garbage value (-1e7 or inf after dividing by a dead flat pixel) reaches
    the smoothing of object detection. The variance of a replaced pixel is that of its neighbours.
    """
    bad_bit = np.int32(MASK_PLANES.bit("BAD"))
    nonfinite = ~np.isfinite(mi.image)
    if nonfinite.any():
        mi.mask[nonfinite] |= bad_bit
    bad = nonfinite | ((mi.mask & np.int32(bits)) != 0)
    n = int(bad.sum())
    if n == 0:
        return 0
    if along not in ("row", "column", "shorter"):
        raise ValueError(f"interpolate along 'row', 'column' or 'shorter', not {along!r}")
    if along == "row":
        by_row = bad
    elif along == "column":
        by_row = np.zeros(bad.shape, bool)
    else:
        by_row = bad & (_runs(bad) <= _runs(bad.T).T)
    by_col = bad & ~by_row
    if by_row.any():
        # a pixel bridged along its column must not feed a row bridge, and vice versa: each pass
        # treats every bad pixel as bad, and bridges only its own
        _bridge_only(mi, bad, by_row)
    if by_col.any():
        t_image, t_var = mi.image.T.copy(), mi.variance.T.copy()
        tmp = MaskedImage(t_image, mi.mask.T.copy(), t_var)
        _bridge_only(tmp, bad.T, by_col.T)
        mi.image[by_col] = tmp.image.T[by_col]
        mi.variance[by_col] = tmp.variance.T[by_col]
    mi.mask[bad] |= np.int32(MASK_PLANES.bit("INTRP"))
    return n


def _bridge_only(mi: MaskedImage, bad: np.ndarray, target: np.ndarray) -> None:
    """Row bridges between pixels not in ``bad``, written to the ``target`` pixels only."""
    bridge_rows(mi.image, mi.variance, np.ascontiguousarray(bad), np.ascontiguousarray(target))
