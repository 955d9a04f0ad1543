"""Bias, dark and flat construction: per-input processing, scale solving and combination
(pipe_drivers ``BiasTask``, ``DarkTask``, ``FlatTask``; docs/algorithms.md#bias-dark-and-flat-builds).

The steps are plain functions so a flow can map them: ``process_*`` per (exposure, detector),
:func:`solve_flat_scales` once per flat build (the barrier), ``combine_*`` per detector. Inputs of the
combine may be intermediate product paths (streamed by :func:`calib_core.stats.stack.stack_files`) or
in-memory :class:`MaskedImage` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calib_core.configmodel import ClipConfig, ConfigModel
from calib_core.errors import DataError
from calib_core.io.raw import RawDetector
from calib_core.isr.cosmicrays import mask_cosmic_rays
from calib_core.isr.process import IsrConfig, run_isr
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.binned import image_statistic
from calib_core.stats.clipped import ClippedStats
from calib_core.stats.stack import CombineConfig, stack_arrays, stack_files

__all__ = ["StatsConfig", "BiasConfig", "DarkConfig", "FlatConfig", "FlatScales", "process_bias",
           "process_dark", "process_flat", "background_level", "solve_flat_scales", "combine_calib",
           "combine_bias", "combine_dark", "combine_flat"]

class StatsConfig(ClipConfig):
    """``CalibStatsConfig``: the background level of a CCD (docs/algorithms.md#background-level)."""

    model_config = ConfigDict(extra="forbid")

    statistic: Literal["MEANCLIP", "MEAN", "MEDIAN"] = Field("MEANCLIP", description="the level's statistic")
    mask: list[str] = Field(["DETECTED", "BAD", "NO_DATA"], description="planes not used")


class BiasConfig(BaseModel):
    """Bias build: ISR without bias/dark/flat/fringe, plain MEANCLIP stack (docs/algorithms.md#bias-build)."""

    model_config = ConfigDict(extra="forbid")

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_bias=False, do_dark=False, do_flat=False,
                                                             do_fringe=False, do_defect=False, use_ptc_gains=False))
    combine: CombineConfig = Field(default_factory=CombineConfig)


class DarkConfig(ConfigModel):
    """Dark build (docs/algorithms.md#dark-build): ISR with bias, CR masking, normalisation by dark time,
    CR added to the combine's ignored planes. The product is ADU per second of dark time."""

    model_config = ConfigDict(extra="forbid")
    reference_names: ClassVar[dict[str, str]] = {"do_repair": "doRepair", "cr_nsigma": "crNumSigma", "cr_min_dn": "crMinDn", "cr_grow": "crGrow"}

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_dark=False, do_flat=False, do_fringe=False,
                                                             do_defect=False, use_ptc_gains=False))
    combine: CombineConfig = Field(default_factory=lambda: CombineConfig(mask=["SAT", "DETECTED", "INTRP", "CR"]))
    do_repair: bool = Field(True, description="find and mask cosmic rays")
    cr_nsigma: float = Field(6.0, gt=0, description="CR threshold, sigma of the variance plane")
    cr_min_dn: float = Field(50.0, ge=0, description="CR minimum excess, ADU")
    cr_grow: int = Field(2, ge=0, description="CR mask growth radius, px")


class FlatConfig(BaseModel):
    """Flat build (docs/algorithms.md#flat-build): ISR with bias and dark, background level per (CCD, exposure),
    log-space scale solve, inputs divided by exposure scales, each CCD's flat scaled to its CCD scale."""

    model_config = ConfigDict(extra="forbid")

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_flat=False, do_fringe=False))
    combine: CombineConfig = Field(default_factory=CombineConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    iterations: int = Field(10, ge=1, description="scale-solve iterations (no convergence test)")
    weighted: bool = Field(False, description="weight the scale solve by pixel counts (cp_pipe style)")
    min_response: float = Field(0.05, ge=0, description="flag BAD (dead) where the flat is below this fraction of "
                                "its level or not finite, so ISR never divides by ~0 unflagged (not in the "
                                "reference, which relies on a separate defect list); 0 disables")


# ---------------------------------------------------------------------------------------------------
# per input
# ---------------------------------------------------------------------------------------------------


def process_bias(raw: RawDetector, config: BiasConfig | None = None, defects=None) -> MaskedImage:
    """ISR of one bias detector (overscan, assembly, masks, variance)."""
    config = config or BiasConfig()
    return run_isr(raw, config.isr, defects=defects)


def process_dark(raw: RawDetector, bias, darktime: float, config: DarkConfig | None = None,
                 defects=None, exclude: np.ndarray | None = None) -> MaskedImage:
    """ISR (bias subtracted), CR masking and division by dark time of one dark detector.

    Parameters
    ----------
    raw : RawDetector
    bias : MaskedImage
        Master bias of this detector.
    darktime : float
        Dark time of the exposure, s (> 0).
    config : DarkConfig, optional
    defects : array, optional
        Defect mask (BAD).
    exclude : bool array, optional
        Known hot pixels, never flagged as CR (a defect mask; a build clears CR flags that repeat across
        its inputs at the barrier instead, :func:`calib_core.isr.persistent.clear_persistent_cr`).

    Returns
    -------
    MaskedImage
        ADU per second of dark time (variance in (ADU/s)**2), CR plane set.
    """
    config = config or DarkConfig()
    if darktime is None or not math.isfinite(darktime) or darktime <= 0:
        raise DataError(f"dark exposure of detector {raw.detector.name}: dark time {darktime!r} "
                           "is not a positive finite number")
    mi = run_isr(raw, config.isr, bias=bias, defects=defects)
    if config.do_repair:
        mask_cosmic_rays(mi, nsigma=config.cr_nsigma, min_dn=config.cr_min_dn, grow=config.cr_grow,
                         exclude=exclude)
    mi /= darktime
    return mi


def background_level(mi: MaskedImage, config: StatsConfig | None = None) -> ClippedStats:
    """``CalibStatsTask``: MEANCLIP (3 sigma, 3 passes) ignoring DETECTED/BAD/NO_DATA."""
    config = config or StatsConfig()
    return image_statistic(config.statistic, mi.image, mi.mask, MASK_PLANES.bits(config.mask),
                           nsigma=config.nsigma, niter=config.niter)


def process_flat(raw: RawDetector, bias, dark=None, darktime: float | None = None,
                 config: FlatConfig | None = None, defects=None) -> tuple[MaskedImage, ClippedStats]:
    """ISR of one flat detector and its background level B_ij (docs/algorithms.md#flat-build).

    Returns
    -------
    (MaskedImage, ClippedStats)
        The post-ISR image (ADU) and its :func:`background_level` (``.mean`` is B_ij, ``.npoint``
        its pixel count for a weighted solve).
    """
    config = config or FlatConfig()
    mi = run_isr(raw, config.isr, bias=bias, dark=dark, darktime=darktime, defects=defects)
    return mi, background_level(mi, config.stats)


# ---------------------------------------------------------------------------------------------------
# flat scales
# ---------------------------------------------------------------------------------------------------


@dataclass
class FlatScales:
    """Solution of B_ij = C_i * E_j.

    Attributes
    ----------
    ccd_scales : float64 array (nCcd,)
        C_i, normalised so that their (weighted) mean is 1.
    exp_scales : float64 array (nExp,)
        E_j, in the units of B.
    """

    ccd_scales: np.ndarray
    exp_scales: np.ndarray


def _wmean(values: np.ndarray, valid: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Weighted mean over valid entries only: invalid entries drop out of the numerator *and* the
    denominator. (cp_pipe calls ``np.average(masked_array, weights=w)``, which keeps the weights
    of masked entries in the denominator and biases the log-means toward 0 whenever any B is
    non-finite, docs/algorithms.md#flat-scale-solve; this is the correct masked average.)"""
    w = np.where(valid, weights, 0.0)
    num = np.where(valid, values * w, 0.0).sum(axis=axis)
    den = w.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def solve_flat_scales(B, iterations: int = 10, weights=None) -> FlatScales:
    """Solve the flat background matrix for CCD and exposure scales in log space (docs/algorithms.md#flat-scale-solve).

    Parameters
    ----------
    B : array_like (nCcd, nExp)
        Background level of CCD i in exposure j (None/NaN/<=0 entries are missing).
    iterations : int, default 10
        Alternations (no convergence test, as the reference).
    weights : array_like (nCcd, nExp), optional
        Pixel counts (NPOINT) for a count-weighted solve (cp_pipe); None = unweighted (pipe_drivers).

    Returns
    -------
    FlatScales

    Raises
    ------
    ValueError
        Empty or non-2-D B, or weights of another shape.
    RuntimeError
        An exposure with no valid measurement ("Bad exposure scales").
    """
    B = np.array([[np.nan if v is None else v for v in row] for row in B], dtype=np.float64) \
        if not isinstance(B, np.ndarray) else np.asarray(B, np.float64)
    if B.ndim != 2 or B.shape[0] == 0 or B.shape[1] == 0:
        raise ValueError(f"B must be a non-empty (nCcd, nExp) matrix, got shape {B.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        L = np.log(B)
    valid = np.isfinite(L)
    if weights is None:
        W = np.ones_like(L)
    else:
        W = np.asarray(weights, np.float64)
        if W.shape != B.shape:
            raise ValueError(f"weights shape {W.shape} differs from B shape {B.shape}")
        valid &= np.isfinite(W) & (W > 0)
    Lz = np.where(valid, L, 0.0)
    n_ccd, n_exp = B.shape
    c = np.zeros(n_ccd)
    e = _wmean(Lz - c[:, None], valid, W, axis=0)
    row_w = np.where(valid, W, 0.0).sum(axis=1)
    for _ in range(int(iterations)):
        c = _wmean(Lz - np.nan_to_num(e)[None, :], valid, W, axis=1)
        bad = ~np.isfinite(c)
        if bad.all():
            raise DataError("Bad CCD scales: no CCD has a valid background measurement")
        if bad.any():
            # a CCD with no valid measurement (pipe_drivers 68da4f9): the mean of the finite ones
            c[bad] = c[~bad].mean()
        e = _wmean(Lz - c[:, None], valid, W, axis=0)
        if weights is None:
            c = c - np.log(np.mean(np.exp(c)))
        else:
            rw = np.where(row_w > 0, row_w, 0.0)
            norm = np.sum(rw * np.exp(c)) / rw.sum() if rw.sum() > 0 else np.mean(np.exp(c))
            c = c - np.log(norm)
    e = _wmean(Lz - c[:, None], valid, W, axis=0)
    if np.any(~np.isfinite(e)):
        raise DataError(f"Bad exposure scales: exposures {np.flatnonzero(~np.isfinite(e)).tolist()} "
                           "have no valid background measurement")
    return FlatScales(ccd_scales=np.exp(c), exp_scales=np.exp(e))


# ---------------------------------------------------------------------------------------------------
# combination
# ---------------------------------------------------------------------------------------------------


def combine_calib(inputs: Sequence, config: CombineConfig | None = None,
                  scales: Sequence[float] | None = None) -> tuple[MaskedImage, np.ndarray]:
    """Combine paths (streamed by row band) or in-memory masked images; returns (image, n_used)."""
    config = config or CombineConfig()
    if len(inputs) == 0:
        raise ValueError("no inputs to combine")
    if all(isinstance(x, MaskedImage) for x in inputs):
        return stack_arrays(list(inputs), config, scales)
    if any(isinstance(x, MaskedImage) for x in inputs):
        raise TypeError("inputs must be all paths or all MaskedImage")
    return stack_files(list(inputs), config, scales)


def combine_bias(inputs: Sequence, config: BiasConfig | None = None) -> MaskedImage:
    """Master bias: plain MEANCLIP stack of post-ISR biases."""
    config = config or BiasConfig()
    return combine_calib(inputs, config.combine)[0]


def combine_dark(inputs: Sequence, config: DarkConfig | None = None) -> MaskedImage:
    """Master dark from inputs already divided by their dark time (:func:`process_dark`)."""
    config = config or DarkConfig()
    combine = config.combine
    if "CR" not in combine.mask:
        combine = combine.model_copy(update={"mask": [*combine.mask, "CR"]})
    return combine_calib(inputs, combine)[0]


def combine_flat(inputs: Sequence, exp_scales: Sequence[float], ccd_scale: float,
                 config: FlatConfig | None = None) -> MaskedImage:
    """Flat of one CCD: inputs divided by their exposure scales E_j, stacked, then scaled so that
    its background level (:func:`background_level`) equals the CCD scale C_i."""
    config = config or FlatConfig()
    combined, _ = combine_calib(inputs, config.combine, scales=exp_scales)
    level = background_level(combined, config.stats).mean
    if config.min_response > 0 and math.isfinite(level) and level > 0:
        # dead pixels are flagged first, so the level the flat is scaled by excludes them
        dead = ~np.isfinite(combined.image) | (combined.image < config.min_response * level)
        if dead.any():
            combined.mask[dead] |= np.int32(MASK_PLANES.bit("BAD"))
            level = background_level(combined, config.stats).mean
    if not (math.isfinite(level) and level != 0):
        raise DataError(f"flat combine: background level of the stack is {level}")
    combined *= float(ccd_scale) / level
    return combined
