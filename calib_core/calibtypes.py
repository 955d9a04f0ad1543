"""Every calib type's facts in one place: what it is built from, what ISR its inputs get, how one
input is processed, which barrier the build crosses, how a detector is combined.

The tasks call these specs; the flows branch only on :attr:`CalibType.barrier`; the nightly order
and its dependencies follow from :attr:`CalibType.isr_calibs`. Adding a calib type means one
:class:`CalibType` here plus its numerics (docs/architecture.md#barriers-by-calib-type).

No Prefect here: this is the numeric core's table of contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel

from .calibs import (BiasConfig, DarkConfig, FlatConfig, background_level, combine_bias, combine_calib,
                     combine_dark, combine_flat, process_bias, process_dark)
from .fringe import FringeBuildConfig, prepare_fringe, remove_continuum
from .isr import IsrConfig, run_isr
from .maskedimage import MaskedImage
from .persistent import clear_persistent_cr
from .products import provenance_cards, read_product
from .rawio import RawDetector
from .sky import SkyConfig, bin_detector
from .verify import against_own_kind, flagged_pixels, sky_bins

__all__ = ["CalibType", "CALIB_TYPES", "Combined", "Processed", "calib_type", "dependency_order", "isr_with_calibs",
           "ISR_STEP", "OPTIONAL_IN_ISR", "product_cards", "CalibTypeName"]

Barrier = Literal["none", "flat_scales", "sky_passes"]


@dataclass
class Processed:
    """One processed (exposure, detector): the image the combine reads, scalars for the barrier
    (``level``, ``npoint``), and side products written next to the intermediate: ``{key: (suffix,
    HDUList)}``, written as ``<intermediate>-<suffix>.fits`` whose path the task result carries as ``key``."""

    image: MaskedImage
    scalars: dict[str, Any] = field(default_factory=dict)
    sidecars: dict[str, Any] = field(default_factory=dict)


@dataclass
class Combined:
    """One detector's combined product: the image, extra header cards and product stats, and a
    warning the build should log (None when all went as configured)."""

    image: MaskedImage
    cards: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None


@dataclass(frozen=True)
class CalibType:
    """One calib type.

    Attributes
    ----------
    name : str
        Registry and CLI name.
    input_obstype : str
        The raw observation type it is built from.
    isr_calibs : tuple of str
        Calib types its inputs' ISR applies; they must be built first (the nightly order).
    config_model : pydantic model class
        The build's config (``--set`` keys, flow ``config`` parameter).
    product_exptime : float
        EXPTIME (= DARKTIME) written on the product: 0 for a bias, 1 otherwise (a dark is a rate).
    filtered : bool
        One product per filter (False: one for all filters).
    fringing_only : bool
        Built only for the filters a nightly policy lists as fringing.
    barrier : "none" | "flat_scales" | "sky_passes"
        What the build does between processing and combining: nothing; the flat's CCD x exposure
        scale solve; the sky build's focal-plane passes (which also produce the product).
    unit, intermediate_unit : str
        BUNIT of the product and of its inputs' intermediates in the work area (a dark's are
        already divided by their dark time, a fringe's by their sky level; ``1`` = dimensionless).
    product_kind : "image" | "binned"
        A full-resolution masked image, or a binned model (:class:`~calib_core.background.BackgroundModel`).
    isr_step : str or None
        The :class:`~calib_core.isr.IsrConfig` switch that applies this type's products.
    optional_in_isr : bool
        ISR applies it only where one exists (fringe frames exist for fringing filters only).
    min_inputs : int
        The nightly policy's default minimum number of inputs.
    description : str
        One line for deployments and help texts.
    process : callable
        ``process(raw, calibs, exposure, config, camera, detector) -> Processed``; ``calibs`` maps
        a calib type to its registry row (``path``, ``calib_id``).
    combine : callable or None
        ``combine(paths, config, exp_scales, ccd_scale) -> Combined``; None where the barrier makes
        the product (sky).
    verify : callable or None
        ``verify(product, inputs: calib_core.verify.VerifyInputs) -> Verification``: the checks a
        new product must pass to be certified (docs/algorithms.md#verification-before-certification);
        None: certified as built.
    screen_inputs : bool
        Inputs are screened against the last good master before stacking
        (docs/algorithms.md#input-screening).
    """

    name: str
    input_obstype: str
    isr_calibs: tuple[str, ...]
    config_model: type[BaseModel]
    product_exptime: float
    filtered: bool
    barrier: Barrier
    process: Callable[..., Processed]
    combine: Callable[..., Combined] | None
    description: str
    unit: str = "adu"
    intermediate_unit: str = "adu"
    product_kind: Literal["image", "binned"] = "image"
    fringing_only: bool = False
    isr_step: str | None = None
    optional_in_isr: bool = False
    min_inputs: int = 3
    verify: Callable[..., Any] | None = None
    screen_inputs: bool = False


# ---------------------------------------------------------------------------------------------------
# ISR with registered calibs
# ---------------------------------------------------------------------------------------------------


def isr_with_calibs(raw: RawDetector, isr: IsrConfig, calibs: Mapping[str, dict], darktime: float | None,
                    path: str = "") -> MaskedImage:
    """Run ISR with the calib products in ``calibs`` (rows from the registry); a step whose calib
    is absent and optional (fringe) is switched off."""
    images = {t: read_product(c["path"])[0] for t, c in calibs.items()}
    for t in OPTIONAL_IN_ISR:
        step = ISR_STEP[t]
        if getattr(isr, step) and t not in images:
            isr = isr.model_copy(update={step: False})
    return run_isr(raw, isr, bias=images.get("bias"), dark=images.get("dark"), flat=images.get("flat"),
                   fringe=images.get("fringe"), darktime=darktime, path=path)


# ---------------------------------------------------------------------------------------------------
# per-type processing and combining (uniform signatures over the numerics in calibs, fringe, sky)
# ---------------------------------------------------------------------------------------------------


def _process_bias(raw, calibs, exposure, cfg: BiasConfig, camera=None, detector=None) -> Processed:
    return Processed(process_bias(raw, cfg))


def _process_dark(raw, calibs, exposure, cfg: DarkConfig, camera=None, detector=None) -> Processed:
    bias = read_product(calibs["bias"]["path"])[0] if "bias" in calibs else None
    return Processed(process_dark(raw, bias, exposure["darktime"], cfg))


def _process_flat(raw, calibs, exposure, cfg: FlatConfig, camera=None, detector=None) -> Processed:
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure["darktime"], path=exposure["path"])
    level = background_level(mi, cfg.stats)
    return Processed(mi, {"level": float(level.mean), "npoint": int(level.npoint)})


def _process_fringe(raw, calibs, exposure, cfg: FringeBuildConfig, camera=None, detector=None) -> Processed:
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure["darktime"], path=exposure["path"])
    mi, level = prepare_fringe(mi, cfg.fringe)
    return Processed(mi, {"level": float(level)})


def _process_sky(raw, calibs, exposure, cfg: SkyConfig, camera=None, detector=None) -> Processed:
    # first pass of the sky build: the binned model of the masked image (the intermediate itself
    # stays unmasked, so a later pass can mask it again without the pattern)
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure["darktime"], path=exposure["path"])
    model = bin_detector(camera, detector, mi, cfg.pass_config(0))
    return Processed(mi, sidecars={"bins": ("bins0", model.to_hdulist())})


def _combine_bias(paths: Sequence, cfg: BiasConfig, exp_scales=None, ccd_scale=None) -> Combined:
    return Combined(combine_bias(paths, cfg))


def _combine_dark(paths: Sequence, cfg: DarkConfig, exp_scales=None, ccd_scale=None) -> Combined:
    clear_persistent_cr(paths)      # hot pixels repeat, cosmic rays do not
    return Combined(combine_dark(paths, cfg))


def _combine_flat(paths: Sequence, cfg: FlatConfig, exp_scales=None, ccd_scale=None) -> Combined:
    return Combined(combine_flat(paths, exp_scales, ccd_scale, cfg))


def _combine_fringe(paths: Sequence, cfg: FringeBuildConfig, exp_scales=None, ccd_scale=None) -> Combined:
    mi = combine_calib(paths, cfg.combine)[0]      # inputs already normalised: no scaling
    # calibflow, not the reference: the sky continuum's pattern taken out of the stack
    # (docs/algorithms.md#continuum-removal)
    mi, continuum = remove_continuum(mi, paths, cfg.continuum)
    warning = None
    if not continuum["applied"] and continuum.get("reason") != "disabled":
        warning = f"fringe frame keeps the sky continuum's pattern: {continuum['reason']}"
    return Combined(mi, {"FRCONT": (bool(continuum["applied"]), "sky continuum's pattern removed")},
                    {"continuum": continuum}, warning)


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------

CALIB_TYPES: dict[str, CalibType] = {t.name: t for t in (
    CalibType("bias", "bias", (), BiasConfig, 0.0, filtered=False, barrier="none",
              process=_process_bias, combine=_combine_bias, isr_step="doBias",
              verify=against_own_kind("bias"), screen_inputs=True,
              description="Build bias frames: ISR without calibs, clipped-mean stack per detector."),
    CalibType("dark", "dark", ("bias",), DarkConfig, 1.0, filtered=False, barrier="none",
              process=_process_dark, combine=_combine_dark, isr_step="doDark", unit="adu/s",
              intermediate_unit="adu/s", verify=against_own_kind("dark"), screen_inputs=True,
              description="Build dark frames (ADU per second of dark time): ISR with the certified bias, "
                          "cosmic rays masked."),
    CalibType("flat", "flat", ("bias", "dark"), FlatConfig, 1.0, filtered=True, barrier="flat_scales",
              process=_process_flat, combine=_combine_flat, isr_step="doFlat", unit="1",
              verify=against_own_kind("flat"), screen_inputs=True,
              description="Build flat fields for one filter: CCD x exposure scale solve, then a scaled stack "
                          "per detector."),
    CalibType("fringe", "science", ("bias", "dark", "flat"), FringeBuildConfig, 1.0, filtered=True,
              barrier="none", process=_process_fringe, combine=_combine_fringe, isr_step="doFringe",
              optional_in_isr=True, fringing_only=True, unit="1", intermediate_unit="1", verify=flagged_pixels,
              description="Build fringe frames for one filter: background-removed, normalised science "
                          "exposures, objects masked."),
    CalibType("sky", "science", ("bias", "dark", "flat", "fringe"), SkyConfig, 1.0, filtered=True,
              barrier="sky_passes", process=_process_sky, combine=None, product_kind="binned",
              min_inputs=5, unit="1", verify=sky_bins,
              description="Build sky frames for one filter: object-masked science exposures divided by each "
                          "one's quadratic focal-plane surface."),
)}

#: the type names as a ``Literal`` (flow parameters, policies: a typo is refused with the names)
CalibTypeName = Literal[tuple(CALIB_TYPES)]  # type: ignore[valid-type]
#: which IsrConfig switch applies which calib type
ISR_STEP = {t.name: t.isr_step for t in CALIB_TYPES.values() if t.isr_step}
#: calibs ISR applies only where one exists
OPTIONAL_IN_ISR = tuple(t.name for t in CALIB_TYPES.values() if t.optional_in_isr)


def product_cards(obstype: str, calib_id, inputs, dates=(), exptimes=None, **extra) -> dict:
    """Provenance header cards of a calib product (:func:`calib_core.products.provenance_cards`)
    with its type's EXPTIME/DARKTIME (docs/algorithms.md#product-exposure-time); ``extra`` cards are
    appended."""
    spec = calib_type(obstype.lower())
    cards = provenance_cards(spec.name, calib_id, inputs, dates=dates, exptimes=exptimes,
                             exptime=spec.product_exptime)
    cards.update(extra)
    return cards


def calib_type(name: str) -> CalibType:
    """The spec of ``name``; an unknown name is refused with the known ones."""
    try:
        return CALIB_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown calib type {name!r}; choose one of {', '.join(CALIB_TYPES)}") from None


def dependency_order(names=None) -> list[str]:
    """Calib types in an order where each comes after every type its inputs' ISR applies."""
    todo = list(CALIB_TYPES if names is None else names)
    done: list[str] = []
    while todo:
        ready = [n for n in todo if all(d in done or d not in todo for d in CALIB_TYPES[n].isr_calibs)]
        if not ready:
            raise ValueError(f"calib types depend on each other in a cycle: {todo}")
        done.append(ready[0])
        todo.remove(ready[0])
    return done
