"""Every calib type's facts in one place: what it is built from, what ISR its inputs get, how one
input is processed, which barrier the build crosses, how a detector is combined.

The tasks call these specs; the flows branch only on :attr:`CalibType.barrier`; the nightly order
and its dependencies follow from :attr:`CalibType.isr_calibs`. Adding a calib type means one
:class:`CalibType` here plus its numerics (docs/architecture.md#barriers-by-calib-type).

No Prefect here: this is the numeric core's table of contents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel

from calib_core.builds.bias_dark_flat import (BiasConfig, DarkConfig, FlatConfig, background_level, combine_bias,
                                              combine_calib, combine_dark, combine_flat, process_bias, process_dark)
from calib_core.builds.defects import (DefectsConfig, defect_mask, defects_product, load_manual_defects,
                                       measure_defects, origin_cards, origin_counts)
from calib_core.builds.fringe import FringeBuildConfig, prepare_fringe, remove_continuum
from calib_core.builds.ptc import (PtcConfig, fit_ptc, gain_map, make_pairs, overscan_noise, pair_stats, plot_ptc,
                                   ptc_table_hdus, read_ptc)
from calib_core.errors import DataError
from calib_core.io.products import RowReader, provenance_cards, read_calib, read_product
from calib_core.io.raw import RawDetector
from calib_core.isr.persistent import clear_persistent_cr
from calib_core.isr.process import IsrConfig, run_isr
from calib_core.maskedimage import MaskedImage
from calib_core.quality.verify import against_own_kind, flagged_pixels, sky_bins
from calib_core.records import CalibProduct, Exposure
from calib_core.sky.frames import SkyConfig, bin_detector
from calib_core.sky.objectmask import detection_variance_median

__all__ = ["CalibType", "CALIB_TYPES", "Combined", "Processed", "calib_type", "dependency_order", "isr_with_calibs",
           "ISR_STEP", "OPTIONAL_IN_ISR", "product_cards", "CalibTypeName"]

Barrier = Literal["none", "flat_scales", "sky_passes"]


@dataclass
class Processed:
    """One processed (exposure, detector): the image the combine reads, scalars for the barrier
    (``level``, ``npoint``), and side products written next to the intermediate: ``{key: (suffix,
    HDUList)}``, written as ``<intermediate>-<suffix>.fits`` whose path the task result carries as ``key``.
    Every scalar and side-product key is a field of :class:`calib_core.records.ProcessedInput`, the
    task's result (a key it lacks is refused).

    ``variance``: whether the intermediate keeps its variance plane. False where no later step reads
    it (defects: the stacked flat's image is tested; PTC: pair statistics of the images; sky: the
    later passes' masking needs only its median, recorded as ``variance_median``), so 4 of an
    intermediate's ~9 bytes a pixel are never written (docs/architecture.md#intermediates-and-disk)."""

    image: MaskedImage
    scalars: dict[str, Any] = field(default_factory=dict)
    sidecars: dict[str, Any] = field(default_factory=dict)
    variance: bool = True


@dataclass
class Combined:
    """One detector's combined product: the image, extra header cards and product stats, a
    warning the build should log (None when all went as configured), HDUs appended to the product
    file (tables), and pictures written beside it (``{suffix: write(path)}``: ``<calib_id>-<suffix>.png``)."""

    image: MaskedImage
    cards: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None
    extra_hdus: list = field(default_factory=list)
    pictures: dict[str, Callable[[Any], None]] = field(default_factory=dict)


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
        A full-resolution masked image, or a binned model (:class:`~calib_core.stats.background.BackgroundModel`).
    isr_step : str or None
        The :class:`~calib_core.isr.process.IsrConfig` switch that applies this type's products.
    optional_in_isr : bool
        ISR applies it only where one exists (fringe frames exist for fringing filters only).
    min_inputs : int
        The nightly policy's default minimum number of inputs.
    description : str
        One line for deployments and help texts.
    process : callable
        ``process(raw, calibs, exposure, config, camera, detector) -> Processed``; ``exposure`` is
        the input's :class:`~calib_core.records.Exposure`; ``calibs`` maps
        a calib type to its registry record (:class:`~calib_core.records.CalibProduct`).
    combine : callable or None
        ``combine(paths, config, exp_scales, ccd_scale) -> Combined``; None where the barrier makes
        the product (sky).
    skip_reason : callable or None
        ``skip_reason(rows) -> str``: given a night's inputs (:class:`~calib_core.records.Exposure`),
        why a nightly build would fail for want of usable inputs ("" when it would not): the PTC needs two flats
        of one exposure time.
    combine_context : bool
        The combine also gets ``items`` (each input's :class:`~calib_core.records.ProcessedInput`:
        its scalars), ``camera``,
        ``detector`` and ``calib_date`` as keywords (defects, PTC: they pair inputs or read the
        calibs their inputs used).
    verify : callable or None
        ``verify(product, inputs: calib_core.quality.verify.VerifyInputs) -> Verification``: the checks a
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
    combine_context: bool = False
    skip_reason: Callable[[Sequence[Exposure]], str] | None = None
    verify: Callable[..., Any] | None = None
    screen_inputs: bool = False


# ---------------------------------------------------------------------------------------------------
# ISR with registered calibs
# ---------------------------------------------------------------------------------------------------


def isr_with_calibs(raw: RawDetector, isr: IsrConfig, calibs: Mapping[str, CalibProduct], darktime: float | None,
                    path: str = "") -> MaskedImage:
    """Run ISR with the calib products in ``calibs`` (records from the registry, by type); a step whose calib
    is absent and optional (fringe, defects, ptc) is switched off. A certified defects mask flags
    BAD; a certified PTC's gains and read noises replace the camera file's in the variance
    (docs/algorithms.md#defects, docs/algorithms.md#photon-transfer-curve)."""
    images = {t: read_calib(c.path) for t, c in calibs.items() if t != "ptc"}
    for t in OPTIONAL_IN_ISR:
        step = ISR_STEP[t]
        if getattr(isr, step) and t not in calibs:
            isr = isr.model_copy(update={step: False})
    defects = defect_mask(images["defects"]) if isr.do_defect and "defects" in images else None
    gains = read_noises = None
    if isr.use_ptc_gains and "ptc" in calibs:
        rows = read_ptc(calibs["ptc"].path)
        gains = {a: r["gain"] for a, r in rows.items() if math.isfinite(r["gain"]) and r["gain"] > 0}
        read_noises = {a: r["read_noise"] for a, r in rows.items() if math.isfinite(r["read_noise"])}
    return run_isr(raw, isr, bias=images.get("bias"), dark=images.get("dark"), flat=images.get("flat"),
                   fringe=images.get("fringe"), darktime=darktime, defects=defects, gains=gains,
                   read_noises=read_noises, path=path)


# ---------------------------------------------------------------------------------------------------
# per-type processing and combining (uniform signatures over the numerics in calibs, fringe, sky)
# ---------------------------------------------------------------------------------------------------


def _process_bias(raw, calibs, exposure, cfg: BiasConfig, camera=None, detector=None) -> Processed:
    return Processed(process_bias(raw, cfg))


def _process_dark(raw, calibs, exposure, cfg: DarkConfig, camera=None, detector=None) -> Processed:
    bias = read_calib(calibs["bias"].path) if "bias" in calibs else None
    return Processed(process_dark(raw, bias, exposure.darktime, cfg))


def _process_flat(raw, calibs, exposure, cfg: FlatConfig, camera=None, detector=None) -> Processed:
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure.darktime, path=exposure.path)
    level = background_level(mi, cfg.stats)
    return Processed(mi, {"level": float(level.mean), "npoint": int(level.npoint)})


def _process_fringe(raw, calibs, exposure, cfg: FringeBuildConfig, camera=None, detector=None) -> Processed:
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure.darktime, path=exposure.path)
    mi, level = prepare_fringe(mi, cfg.fringe)
    return Processed(mi, {"level": float(level)})


def _process_sky(raw, calibs, exposure, cfg: SkyConfig, camera=None, detector=None) -> Processed:
    # first pass of the sky build: the binned model of the masked image (the intermediate itself
    # stays unmasked, so a later pass can mask it again without the pattern)
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure.darktime, path=exposure.path)
    # what the passes' object masking reads of the variance plane: one median, the same in every pass
    # (None where a config makes it change between passes, or none is positive: then the plane is kept)
    vm = detection_variance_median(mi, cfg.mask)
    model = bin_detector(camera, detector, mi, cfg.pass_config(0), variance_median=vm)
    return Processed(mi, {"variance_median": vm}, sidecars={"bins": ("bins0", model.to_hdulist())},
                     variance=vm is None)


def _amp_boxes(raw) -> list[list]:
    """The amplifiers' boxes in the assembled detector: [name, y0, y1, x0, x1] (end-exclusive)."""
    out = []
    for a in raw.amps:
        ys, xs = a.det_slices
        out.append([a.name, int(ys.start or 0), int(ys.stop), int(xs.start or 0), int(xs.stop)])
    return out


def _process_defects(raw, calibs, exposure, cfg: DefectsConfig, camera=None, detector=None) -> Processed:
    # a flat ISR'd with the certified bias and dark, divided by its own level: the stack of these is
    # the flat the defects are found in; the bias and dark it used are the ones tested
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure.darktime, path=exposure.path)
    level = background_level(mi)
    if not (math.isfinite(level.mean) and level.mean > 0):
        raise DataError(f"{exposure.path}: flat level {level.mean} is not positive; cannot normalise it")
    mi /= float(level.mean)
    scalars = {"level": float(level.mean), "amps": _amp_boxes(raw)}
    for t in ("bias", "dark"):
        if t in calibs:
            scalars[f"{t}_path"] = str(calibs[t].path)
    return Processed(mi, scalars, variance=False)


def _process_ptc(raw, calibs, exposure, cfg: PtcConfig, camera=None, detector=None) -> Processed:
    mi = isr_with_calibs(raw, cfg.isr, calibs, exposure.darktime, path=exposure.path)
    noise = {a.name: overscan_noise(a.overscan, a.overscan_axis) if a.overscan is not None else float("nan")
             for a in raw.amps}
    return Processed(mi, {"exptime": exposure.exptime, "filter": exposure.filter,
                          "amps": _amp_boxes(raw), "overscan_noise": noise}, variance=False)


def _combine_defects(paths: Sequence, cfg: DefectsConfig, exp_scales=None, ccd_scale=None, *, items=(),
                     camera=None, detector=0, calib_date=None) -> Combined:
    flat = combine_calib(paths, cfg.combine)[0] if cfg.use_flat else None
    first = items[0]
    bias = read_product(first.bias_path)[0] if cfg.use_bias and first.bias_path else None
    dark = read_product(first.dark_path)[0] if cfg.use_dark and first.dark_path else None
    manual = load_manual_defects(cfg.manual_file) if cfg.manual_file else []
    amps = [tuple(a) for a in first.amps]
    origin = measure_defects(amps, bias=bias, dark=dark, flat=flat, config=cfg, detector=detector,
                             calib_date=calib_date, manual=manual)
    counts = origin_counts(origin)
    cards = dict(origin_cards())
    cards.update({f"HIERARCH NDEFECT {k.upper()}": (v, "pixels flagged by this test") for k, v in counts.items()})
    cards["DEFBIAS"] = (bias is not None, "master bias tested")
    cards["DEFDARK"] = (dark is not None, "master dark tested")
    if cfg.manual_file:
        cards["HIERARCH DEFECTS MANUAL FILE"] = str(cfg.manual_file)[-60:]
        cards["HIERARCH DEFECTS MANUAL BOXES"] = len(manual)
    return Combined(defects_product(origin), cards, {"defects": counts})


def _combine_ptc(paths: Sequence, cfg: PtcConfig, exp_scales=None, ccd_scale=None, *, items=(),
                 camera=None, detector=0, calib_date=None) -> Combined:
    pairs = make_pairs([{"exptime": i.exptime, "filter": i.filter} for i in items])
    if not pairs:
        raise DataError(f"PTC of detector {detector}: no two flats share an exposure time and filter "
                        f"(exposure times {sorted({i.exptime for i in items})})")
    amps = [tuple(a) for a in items[0].amps]
    points: dict[str, list] = {a[0]: [] for a in amps}
    for i, j in pairs:
        im1, im2 = read_product(paths[i])[0], read_product(paths[j])[0]
        for st in pair_stats(im1, im2, amps, items[i].exptime, cfg, (items[i].exposure_id, items[j].exposure_id)):
            points[st.amp].append(st)
    fits = {}
    for name, pts in points.items():
        noises = [float(it.overscan_noise.get(name, float("nan"))) for it in items]
        noises = [n for n in noises if math.isfinite(n)]
        os_noise = float(sorted(noises)[len(noises) // 2]) if noises else float("nan")
        fits[name] = fit_ptc(pts, os_noise, cfg)
    with RowReader(paths[0]) as reader:      # the shape only, from the header
        shape = reader.shape
    cards = {}
    for k, (name, f) in enumerate(fits.items()):
        cards[f"HIERARCH PTC GAIN {name}"] = (round(f.gain, 6), f"e-/ADU +- {f.gain_err:.2g}")
        cards[f"HIERARCH PTC NOISE {name}"] = (round(f.read_noise, 4), "e-, overscan")
    stats = {"gains": {n: f.gain for n, f in fits.items()}, "gain_errors": {n: f.gain_err for n, f in fits.items()},
             "read_noise": {n: f.read_noise for n, f in fits.items()},
             "read_noise_fit": {n: f.noise_fit for n, f in fits.items()},
             "turnoff": {n: f.turnoff for n, f in fits.items()}, "n_pairs": len(pairs),
             "fit_type": sorted({f.fit_type for f in fits.values()})}
    title = f"PTC detector {detector} ({calib_date})"
    return Combined(gain_map(shape, amps, fits), cards, stats, extra_hdus=ptc_table_hdus(fits),
                    pictures={"ptc": lambda path: plot_ptc(fits, path, title)})


def _ptc_skip_reason(rows: Sequence[Exposure]) -> str:
    if make_pairs([{"exptime": r.exptime, "filter": r.filter} for r in rows]):
        return ""
    return (f"no two of the {len(rows)} flats share an exposure time and filter "
            f"(exposure times {sorted({r.exptime for r in rows})})")


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
              process=_process_bias, combine=_combine_bias, isr_step="do_bias",
              verify=against_own_kind("bias"), screen_inputs=True,
              description="Build bias frames: ISR without calibs, clipped-mean stack per detector."),
    CalibType("dark", "dark", ("bias",), DarkConfig, 1.0, filtered=False, barrier="none",
              process=_process_dark, combine=_combine_dark, isr_step="do_dark", unit="adu/s",
              intermediate_unit="adu/s", verify=against_own_kind("dark"), screen_inputs=True,
              description="Build dark frames (ADU per second of dark time): ISR with the certified bias, "
                          "cosmic rays masked."),
    CalibType("defects", "flat", ("bias", "dark"), DefectsConfig, 1.0, filtered=False, barrier="none",
              process=_process_defects, combine=_combine_defects, isr_step="do_defect", optional_in_isr=True,
              unit="1", intermediate_unit="1", combine_context=True,
              description="Build defect masks: hot, cold, noisy and dead pixels per amplifier from the certified "
                          "bias and dark and the night's flats; the origin of each defect kept."),
    CalibType("ptc", "flat", ("bias", "defects"), PtcConfig, 1.0, filtered=False, barrier="none",
              process=_process_ptc, combine=_combine_ptc, isr_step="use_ptc_gains", optional_in_isr=True,
              unit="electron/adu", combine_context=True, min_inputs=2, skip_reason=_ptc_skip_reason,
              description="Measure gains and read noise per amplifier from pairs of flats of the same exposure "
                          "time (photon transfer curve)."),
    CalibType("flat", "flat", ("bias", "dark", "defects", "ptc"), FlatConfig, 1.0, filtered=True, barrier="flat_scales",
              process=_process_flat, combine=_combine_flat, isr_step="do_flat", unit="1",
              verify=against_own_kind("flat"), screen_inputs=True,
              description="Build flat fields for one filter: CCD x exposure scale solve, then a scaled stack "
                          "per detector."),
    CalibType("fringe", "science", ("bias", "dark", "defects", "ptc", "flat"), FringeBuildConfig, 1.0, filtered=True,
              barrier="none", process=_process_fringe, combine=_combine_fringe, isr_step="do_fringe",
              optional_in_isr=True, fringing_only=True, unit="1", intermediate_unit="1", verify=flagged_pixels,
              description="Build fringe frames for one filter: background-removed, normalised science "
                          "exposures, objects masked."),
    CalibType("sky", "science", ("bias", "dark", "defects", "ptc", "flat", "fringe"), SkyConfig, 1.0, filtered=True,
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
    """Provenance header cards of a calib product (:func:`calib_core.io.products.provenance_cards`)
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
