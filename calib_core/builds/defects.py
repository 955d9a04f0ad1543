"""Defect masks: hot, cold, noisy and dead pixels of a detector, with what found each one
(cp_pipe ``MeasureDefectsTask`` / ``MergeDefectsTask``; docs/algorithms.md#defects).

A defects product is one mask per detector. Its IMAGE plane holds, per pixel, the OR of the
:data:`ORIGINS` bits of every test that flagged it (0 = good); its MASK plane has BAD wherever the
image is non-zero, so ISR can OR it in like any calib mask.

The tests, per amplifier (the reference's ``thresholdType = STDEV``): a pixel is a defect when it
lies more than ``nsigma_bright`` clipped standard deviations above, or ``nsigma_dark`` below, the
amplifier's clipped mean -- in the master bias (noisy pixels: both signs), the master dark (hot
pixels) and the stack of normalised flats (cold, dead and hot pixels). Then a column with at least
``bad_column_threshold`` bad pixels is filled between them except across gaps of
``good_column_gap_threshold`` good pixels or more; optionally whole amplifier columns with
``bad_pixels_to_fill_column_threshold`` bad pixels; optionally an edge border; and boxes edited by hand
(:class:`ManualDefect`) valid at the calib date.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calib_core.configmodel import ClipConfig
from calib_core.errors import InputError
from calib_core.isr.process import IsrConfig
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.binned import image_statistic
from calib_core.stats.stack import CombineConfig

__all__ = ["ORIGINS", "DefectsConfig", "ManualDefect", "find_outliers", "complete_columns", "fill_columns",
           "edge_border", "manual_mask", "load_manual_defects", "measure_defects", "defects_product",
           "defect_mask", "origin_counts"]

#: what found a defect: the bit it sets in the product's IMAGE plane
ORIGINS = {"BIAS": 1, "DARK": 2, "FLAT_COLD": 4, "FLAT_HOT": 8, "COLUMN": 16, "EDGE": 32, "MANUAL": 64}

#: a box of one amplifier in the assembled detector: (name, y0, y1, x0, x1), end-exclusive
AmpBox = tuple[str, int, int, int, int]


class ManualDefect(BaseModel):
    """A box of defective pixels set by hand, valid over a range of dates."""

    model_config = ConfigDict(extra="forbid")

    detector: int | None = Field(None, description="detector id; None: every detector")
    x0: int = Field(ge=0, description="first column (0-based, assembled detector)")
    y0: int = Field(ge=0, description="first row (0-based)")
    width: int = Field(1, ge=1, description="columns")
    height: int = Field(1, ge=1, description="rows")
    valid_from: dt.date | None = Field(None, description="first calib date it applies to (None: always)")
    valid_to: dt.date | None = Field(None, description="last calib date it applies to (None: always)")
    reason: str = Field("", description="why (free text)")

    def applies(self, detector: int, calib_date: dt.date | None) -> bool:
        if self.detector is not None and self.detector != detector:
            return False
        if calib_date is None:
            return True
        return ((self.valid_from is None or self.valid_from <= calib_date)
                and (self.valid_to is None or calib_date <= self.valid_to))


class DefectsConfig(ClipConfig):
    """Defects build (cp_pipe ``MeasureDefectsTaskConfig`` defaults; docs/algorithms.md#defects).

    Inputs are the night's raw flats, ISR'd with the certified bias and dark and each divided by
    its clipped mean; the certified bias and dark those flats used are tested too."""

    model_config = ConfigDict(extra="forbid")
    reference_names: ClassVar[dict[str, str]] = {"nsigma_bright": "nSigmaBright", "nsigma_dark": "nSigmaDark", "nsigma": "clipSigma", "niter": "clipIter", "bad_column_threshold": "badOnAndOffPixelColumnThreshold", "good_column_gap_threshold": "goodPixelColumnGapThreshold", "bad_pixels_to_fill_column_threshold": "badPixelsToFillColumnThreshold", "edge_rows": "nPixBorderUpDown", "edge_columns": "nPixBorderLeftRight"}

    isr: IsrConfig = Field(default_factory=lambda: IsrConfig(do_defect=False, do_flat=False, do_fringe=False,
                                                             use_ptc_gains=False))
    combine: CombineConfig = Field(default_factory=CombineConfig, description="stack of the normalised flats")
    nsigma_bright: float = Field(4.8, gt=0, description="hot/bright pixels: clipped sigmas above the amp's "
                                "clipped mean (cp_pipe 4.8)")
    nsigma_dark: float = Field(-5.0, lt=0, description="cold/dark pixels: clipped sigmas below it (cp_pipe -5.0)")
    nsigma: float = Field(3.0, gt=0, description="clip of the amp's mean and standard deviation (afw MEANCLIP)")
    niter: int = Field(3, ge=1, description="clip passes")
    use_bias: bool = Field(True, description="flag pixels of the master bias beyond the thresholds (both signs: "
                           "noisy pixels); the reference skips the bias in STDEV mode")
    use_dark: bool = Field(True, description="flag hot pixels of the master dark")
    use_flat: bool = Field(True, description="flag cold (and hot) pixels of the stack of normalised flats")
    flat_hot: bool = Field(True, description="also flag bright flat pixels (cp_pipe: flats give both signs)")
    bad_column_threshold: int = Field(50, ge=1, description="a column with at least this many bad "
                                                 "pixels is filled between them (cp_pipe 50)")
    good_column_gap_threshold: int = Field(30, ge=1, description="... except across runs of this many good "
                                             "pixels (cp_pipe 30)")
    bad_pixels_to_fill_column_threshold: int = Field(-1, description="an amplifier column with at least this many bad "
                                                "pixels is flagged whole; < 0 disables (cp_pipe -1)")
    edge_rows: int = Field(0, ge=0, description="rows at the top and bottom of each amp flagged EDGE "
                                  "(cp_pipe measure 0)")
    edge_columns: int = Field(0, ge=0, description="columns at the sides of each amp flagged EDGE")
    manual: list[ManualDefect] = Field(default_factory=list, description="boxes set by hand, merged in")
    manual_file: str | None = Field(None, description="YAML or JSON file of ManualDefect boxes, read at build "
                                    "time and merged in (its content is recorded in the product header)")



# ---------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------


def find_outliers(image: np.ndarray, amps: Sequence[AmpBox], n_bright: float | None, n_dark: float | None,
                  usable: np.ndarray | None = None, clip: float = 3.0, niter: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Pixels beyond ``n_bright`` (above) and ``n_dark`` (below, negative) clipped standard deviations
    from each amplifier's clipped mean (cp_pipe ``_findHotAndColdPixels``, STDEV).

    Parameters
    ----------
    image : array (ny, nx)
    amps : list of (name, y0, y1, x0, x1)
        The amplifiers' boxes; each is tested against its own statistics.
    n_bright, n_dark : float or None
        Thresholds in sigma (``n_dark`` negative); None skips that side.
    usable : bool array, optional
        Pixels admitted to the statistics (default: finite). Non-finite pixels are never flagged.

    Returns
    -------
    (hot, cold) : bool arrays (ny, nx)
    """
    image = np.asarray(image, np.float64)
    hot = np.zeros(image.shape, bool)
    cold = np.zeros(image.shape, bool)
    finite = np.isfinite(image)
    usable = finite if usable is None else (usable & finite)
    for _, y0, y1, x0, x1 in amps:
        sub, ok = image[y0:y1, x0:x1], usable[y0:y1, x0:x1]
        if not ok.any():
            continue
        st = image_statistic("MEANCLIP", sub[ok], nsigma=clip, niter=niter)
        sigma = float(np.sqrt(max(st.variance, 0.0)))
        if not np.isfinite(st.mean) or sigma == 0:
            continue
        fin = finite[y0:y1, x0:x1]
        if n_bright is not None:
            hot[y0:y1, x0:x1] = fin & (sub > st.mean + n_bright * sigma)
        if n_dark is not None:
            cold[y0:y1, x0:x1] = fin & (sub < st.mean + n_dark * sigma)
    return hot, cold


def complete_columns(bad: np.ndarray, threshold: int = 50, gap: int = 30) -> np.ndarray:
    """Pixels a column of on-and-off bad pixels adds (cp_pipe ``maskBlocksIfIntermitentBadPixelsInColumn``):
    in a column with at least ``threshold`` bad pixels, every pixel between its first and last bad
    pixel, except the runs between two consecutive bad pixels ``gap`` or more rows apart.

    Returns the added pixels (bool, those not already in ``bad``)."""
    add = np.zeros(bad.shape, bool)
    counts = bad.sum(axis=0)
    for x in np.flatnonzero(counts >= threshold):
        ys = np.flatnonzero(bad[:, x])
        breaks = np.flatnonzero(np.diff(ys) >= gap)
        starts = np.concatenate(([ys[0]], ys[breaks + 1]))
        ends = np.concatenate((ys[breaks], [ys[-1]]))
        for a, b in zip(starts, ends):
            add[a:b + 1, x] = True
    return add & ~bad


def fill_columns(bad: np.ndarray, amps: Sequence[AmpBox], threshold: int) -> np.ndarray:
    """Whole amplifier columns with at least ``threshold`` bad pixels (cp_pipe ``maskBadColumns``);
    ``threshold`` < 1 adds nothing. Returns the added pixels."""
    add = np.zeros(bad.shape, bool)
    if threshold < 1:
        return add
    for _, y0, y1, x0, x1 in amps:
        cols = np.flatnonzero(bad[y0:y1, x0:x1].sum(axis=0) >= threshold)
        add[y0:y1, x0 + cols] = True
    return add & ~bad


def edge_border(shape: tuple[int, int], amps: Sequence[AmpBox], up_down: int, left_right: int) -> np.ndarray:
    """The border of each amplifier (``up_down`` rows at its top and bottom, ``left_right`` columns
    at its sides), as cp_pipe's ``nPixBorder*``."""
    edge = np.zeros(shape, bool)
    for _, y0, y1, x0, x1 in amps:
        if up_down:
            edge[y0:min(y0 + up_down, y1), x0:x1] = True
            edge[max(y1 - up_down, y0):y1, x0:x1] = True
        if left_right:
            edge[y0:y1, x0:min(x0 + left_right, x1)] = True
            edge[y0:y1, max(x1 - left_right, x0):x1] = True
    return edge


def load_manual_defects(path) -> list[ManualDefect]:
    """Boxes from a YAML or JSON file: a list of :class:`ManualDefect` fields, or ``{defects: [...]}``
    with optional file-wide ``valid_from`` / ``valid_to`` (and ``detector``) that boxes without
    their own take."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"manual defects file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise InputError(f"manual defects file {path}: not valid YAML/JSON: {exc}") from None
    defaults = {}
    if isinstance(data, dict):
        defaults = {k: data[k] for k in ("valid_from", "valid_to", "detector") if k in data}
        data = data.get("defects", [])
    data = [{**defaults, **d} if isinstance(d, dict) else d for d in data or []]
    try:
        return [ManualDefect.model_validate(d) for d in data]
    except Exception as exc:
        raise InputError(f"manual defects file {path}: {exc}") from None


def manual_mask(shape: tuple[int, int], boxes: Iterable[ManualDefect], detector: int,
                calib_date: dt.date | None) -> np.ndarray:
    """Pixels of the boxes that apply to ``detector`` at ``calib_date`` (clipped to the detector)."""
    out = np.zeros(shape, bool)
    for b in boxes:
        if b.applies(detector, calib_date):
            out[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] = True
    return out


def measure_defects(amps: Sequence[AmpBox], *, bias: MaskedImage | None = None, dark: MaskedImage | None = None,
                    flat: MaskedImage | None = None, config: DefectsConfig | None = None,
                    detector: int = 0, calib_date: dt.date | None = None,
                    manual: Sequence[ManualDefect] = ()) -> np.ndarray:
    """The origin image (int32, OR of :data:`ORIGINS` bits; 0 = good) of one detector.

    Parameters
    ----------
    amps : list of (name, y0, y1, x0, x1)
    bias, dark, flat : MaskedImage, optional
        Master bias (ADU), master dark (ADU/s) and the stack of normalised flats. Pixels flagged
        NO_DATA are not used for statistics. At least one must be given.
    config : DefectsConfig
    detector, calib_date
        Select the manual boxes (``config.manual`` and ``manual``) that apply.
    """
    config = config or DefectsConfig()
    images = [m for m in (bias, dark, flat) if m is not None]
    if not images:
        raise ValueError("measure_defects needs a bias, a dark or a flat")
    shape = images[0].shape
    origin = np.zeros(shape, np.int32)
    kw = {"clip": config.nsigma, "niter": config.niter}

    def usable(mi: MaskedImage) -> np.ndarray:
        return (mi.mask & np.int32(MASK_PLANES.bit("NO_DATA"))) == 0

    if bias is not None and config.use_bias:
        hot, cold = find_outliers(bias.image, amps, config.nsigma_bright, config.nsigma_dark, usable(bias), **kw)
        origin[hot | cold] |= ORIGINS["BIAS"]
    if dark is not None and config.use_dark:
        hot, _ = find_outliers(dark.image, amps, config.nsigma_bright, None, usable(dark), **kw)
        origin[hot] |= ORIGINS["DARK"]
    if flat is not None and config.use_flat:
        hot, cold = find_outliers(flat.image, amps, config.nsigma_bright if config.flat_hot else None,
                                  config.nsigma_dark, usable(flat), **kw)
        # a flat pixel that no light reaches (non-finite after normalising, or exactly 0) is dead
        dead = ~np.isfinite(flat.image)
        origin[cold | dead] |= ORIGINS["FLAT_COLD"]
        origin[hot] |= ORIGINS["FLAT_HOT"]
    bad = origin != 0
    added = complete_columns(bad, config.bad_column_threshold, config.good_column_gap_threshold)
    bad |= added
    added |= fill_columns(bad, amps, config.bad_pixels_to_fill_column_threshold)
    origin[added] |= ORIGINS["COLUMN"]
    if config.edge_rows or config.edge_columns:
        origin[edge_border(shape, amps, config.edge_rows, config.edge_columns)] |= ORIGINS["EDGE"]
    boxes = list(config.manual) + list(manual)
    if boxes:
        origin[manual_mask(shape, boxes, detector, calib_date)] |= ORIGINS["MANUAL"]
    return origin


def defects_product(origin: np.ndarray) -> MaskedImage:
    """The product's planes: IMAGE = origin bits, MASK = BAD where any, VARIANCE = 0."""
    origin = np.asarray(origin, np.int32)
    mask = np.where(origin != 0, np.int32(MASK_PLANES.bit("BAD")), np.int32(0))
    return MaskedImage(origin.astype(np.float32), mask, np.zeros(origin.shape, np.float32))


def defect_mask(product: MaskedImage) -> np.ndarray:
    """The defective pixels of a defects product (bool)."""
    return (product.mask & np.int32(MASK_PLANES.bit("BAD"))) != 0


def origin_counts(origin: np.ndarray) -> dict[str, int]:
    """How many pixels each test flagged (a pixel may count under several), and ``total``."""
    origin = np.asarray(origin).astype(np.int64)
    out = {name.lower(): int(((origin & bit) != 0).sum()) for name, bit in ORIGINS.items()}
    out["total"] = int((origin != 0).sum())
    return out


def origin_cards() -> Mapping[str, tuple]:
    """Header cards naming the IMAGE plane's bits."""
    return {f"DFBIT{i}": (name, f"IMAGE bit {bit}: found by this test") for i, (name, bit) in enumerate(ORIGINS.items())}
