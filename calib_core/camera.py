"""Camera (instrument) definitions: YAML files validated by pydantic.

A camera is data, not code. Each YAML file describes the detectors of a camera (size, position and
orientation in the focal plane in mm, pixel size), the amplifiers of each detector (data, overscan and
prescan sections, gain, read noise, saturation, read direction), how the HDUs of a raw file map to
detectors and amplifiers, and which header keys give the observation type, exposure and dark time,
filter, date and exposure id, with fallbacks. See ``docs/cameras.md`` for the schema, field by field.

Section strings follow the FITS/IRAF convention: ``[x1:x2,y1:y2]``, 1-based, inclusive, x = column.
A reversed range (``[2048:1,1:4096]``) means the axis is flipped. :func:`parse_section` turns them into
0-based numpy slices.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from calib_core.errors import ConfigError

__all__ = [
    "Section",
    "parse_section",
    "KeyRule",
    "ValueSource",
    "ObsTypeRule",
    "Condition",
    "HeaderTable",
    "MetadataMap",
    "Amplifier",
    "Detector",
    "Camera",
    "CameraError",
    "load_camera",
    "camera_from_definition",
    "is_camera_file",
    "list_cameras",
    "effective_config",
    "OBS_TYPES",
]

OBS_TYPES = ("bias", "dark", "flat", "science", "arc", "fringe", "sky", "focus", "other", "unknown")

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


class CameraError(ConfigError):
    """A camera definition is invalid or cannot be found."""


class Section(BaseModel):
    """A rectangular region parsed from ``[x1:x2,y1:y2]`` (1-based, inclusive).

    Attributes are 0-based half-open bounds (``x0 <= x < x1``) plus flags telling whether the
    original string ran backwards along each axis.
    """

    model_config = ConfigDict(frozen=True)

    x0: int
    x1: int
    y0: int
    y1: int
    flip_x: bool = False
    flip_y: bool = False

    @property
    def nx(self) -> int:
        return self.x1 - self.x0

    @property
    def ny(self) -> int:
        return self.y1 - self.y0

    @property
    def slices(self) -> tuple[slice, slice]:
        """(row slice, column slice) into a numpy array of shape (ny, nx)."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def binned(self, bx: int, by: int) -> "Section":
        """The same region in a frame binned bx x by (DETSEC is in unbinned pixels)."""
        return Section(x0=self.x0 // bx, x1=math.ceil(self.x1 / bx), y0=self.y0 // by,
                       y1=math.ceil(self.y1 / by), flip_x=self.flip_x, flip_y=self.flip_y)

    def to_fits(self) -> str:
        xa, xb = (self.x1, self.x0 + 1) if self.flip_x else (self.x0 + 1, self.x1)
        ya, yb = (self.y1, self.y0 + 1) if self.flip_y else (self.y0 + 1, self.y1)
        return f"[{xa}:{xb},{ya}:{yb}]"


def parse_section(text: str) -> Section:
    """Parse a FITS section string such as ``[7:1030,1:2048]``.

    Raises
    ------
    ValueError
        If the string is not of the form ``[x1:x2,y1:y2]`` with positive integers.
    """
    m = _SECTION_RE.match(str(text))
    if not m:
        raise ValueError(f"not a FITS section '[x1:x2,y1:y2]': {text!r}")
    xa, xb, ya, yb = (int(v) for v in m.groups())
    if min(xa, xb, ya, yb) < 1:
        raise ValueError(f"FITS sections are 1-based: {text!r}")
    return Section(x0=min(xa, xb) - 1, x1=max(xa, xb), y0=min(ya, yb) - 1, y1=max(ya, yb),
                   flip_x=xa > xb, flip_y=ya > yb)


# --------------------------------------------------------------------------------------------------
# Header mapping
# --------------------------------------------------------------------------------------------------


class KeyRule(BaseModel):
    """Where to find one value: the first of ``keys`` present in the header of ``hdu``."""

    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list, description="header keys tried in order")
    hdu: int | str = Field(0, description="HDU index or EXTNAME holding the keys (0 = primary)")
    scale: float = Field(1.0, description="multiply numeric values by this (0.001 for ms -> s)")
    default: str | float | None = Field(None, description="value when no key is present")
    required: bool = Field(False, description="missing value is an error (when no default)")


def _regex(v: str | None) -> str | None:
    """A regular expression that compiles, or a ValueError saying why (re.error is not one)."""
    if v is not None:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {v!r}: {exc}") from None
    return v


class Condition(BaseModel):
    """A further condition of an obs_type rule: a regex searched in another header value."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(..., description="header key whose value is matched")
    hdu: int | str = 0
    pattern: str = Field(..., description="Python regex, searched (not full-matched)")
    negate: bool = Field(False, description="the condition holds when the pattern does NOT match "
                                            "(or the key is absent)")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        return _regex(v)


class ObsTypeRule(BaseModel):
    """One rule for the observation type: a regex on a header value or on the file path, with
    optional further conditions on other keys (``all_of``: every one must hold)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="header key whose value is matched")
    hdu: int | str = 0
    path: bool = Field(False, description="match the file path instead of a header value")
    pattern: str = Field(..., description="Python regex, searched (not full-matched)")
    value: str = Field(..., description="observation type when the pattern matches")
    exptime_min: float | None = Field(None, description="rule applies only if EXPTIME >= this")
    exptime_max: float | None = Field(None, description="rule applies only if EXPTIME <= this")
    all_of: list[Condition] = Field(default_factory=list,
                                    description="further conditions on other header keys, all required")

    @field_validator("value")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in OBS_TYPES:
            raise ValueError(f"unknown observation type {v!r}; expected one of {OBS_TYPES}")
        return v

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        return _regex(v)

    @model_validator(mode="after")
    def _one_source(self) -> "ObsTypeRule":
        if (self.key is None) == (not self.path):
            raise ValueError("an obs_type rule needs exactly one of 'key' or 'path: true'")
        return self


class ValueSource(KeyRule):
    """A text value with an optional mapping of raw header values to normalised ones.

    By default the first of ``keys`` present gives the value. ``skip`` passes over values matching a
    regex (HST ACS: ``keys: [FILTER1, FILTER2], skip: '^CLEAR'`` takes whichever wheel holds a
    filter); ``join`` joins every value present (not skipped) with a separator instead.
    """

    map: dict[str, str] = Field(default_factory=dict, description="raw value -> normalised value")
    skip: str | None = Field(None, description="regex: header values that match are passed over")
    join: str | None = Field(None, description="join every present value with this separator "
                                               "(instead of taking the first)")
    path_pattern: str | None = Field(
        None, description="regex on the file name; group 1 is the value (used when no key is present)")
    format: str | None = Field(
        None, description="final value as a format string with {value}, {night}, {night_compact}, "
                          "{stem}; e.g. '{night_compact}_{value}' for frame numbers that restart nightly")

    @field_validator("path_pattern", "skip")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return _regex(v)


class MetadataMap(BaseModel):
    """How typed exposure metadata is read from raw headers."""

    model_config = ConfigDict(extra="forbid")

    obs_type: list[ObsTypeRule] = Field(..., description="rules tried in order; first match wins")
    obs_type_default: str = Field("unknown", description="type when no rule matches")
    exptime: KeyRule = Field(default_factory=lambda: KeyRule(keys=["EXPTIME"], required=True))
    darktime: KeyRule = Field(default_factory=lambda: KeyRule(keys=["DARKTIME"]),
                              description="falls back to the exposure time when absent")
    filter: ValueSource = Field(default_factory=lambda: ValueSource(keys=["FILTER"], default="NONE"))
    date_obs: KeyRule = Field(default_factory=lambda: KeyRule(keys=["DATE-OBS"], required=True))
    time_obs: KeyRule = Field(default_factory=lambda: KeyRule(keys=[]),
                              description="time of day, used when date_obs holds a date only")
    exposure_id: ValueSource = Field(
        default_factory=lambda: ValueSource(keys=[], path_pattern=r"^([^.]+)"),
        description="unique id of an exposure within the camera; default: file name stem")
    object: KeyRule = Field(default_factory=lambda: KeyRule(keys=["OBJECT"], default=""))

    @field_validator("obs_type_default")
    @classmethod
    def _known_default(cls, v: str) -> str:
        if v not in OBS_TYPES:
            raise ValueError(f"unknown observation type {v!r}; expected one of {OBS_TYPES}")
        return v


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


class HeaderTable(BaseModel):
    """A number chosen by a header setting: ``{key: CCDGAIN, values: {low: 1.55, high: 0.78}}``.

    The header value is matched as text (stripped; case-insensitive), and numerically when both sides
    are numbers (``CCDGAIN = 4`` matches ``'4'`` and ``'4.0'``)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(..., description="header key (primary header merged with the amplifier's HDU)")
    values: dict[str, float] = Field(..., min_length=1, description="header value -> number")

    def lookup(self, raw) -> float | None:
        text = str(raw).strip().lower()
        for k, v in self.values.items():
            if str(k).strip().lower() == text:
                return float(v)
        try:
            x = float(raw)
        except (TypeError, ValueError):
            return None
        for k, v in self.values.items():
            try:
                if float(k) == x:
                    return float(v)
            except ValueError:
                continue
        return None


class Amplifier(BaseModel):
    """One readout amplifier (tap) of a detector.

    Sections are FITS strings relative to the HDU that holds the amplifier. When
    ``sections_from_header`` is true, ``data_section``/``overscan_section``/``detector_section`` may
    be left out and are read from DATASEC/TRIMSEC, BIASSEC and DETSEC of that HDU (overscan: the
    columns or rows DATASEC leaves out, when there is no BIASSEC).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    hdu: int | str | None = Field(None, description="HDU for this amplifier (per-amplifier layouts)")
    data_section: str | None = Field(None, description="illuminated pixels, e.g. '[7:1030,1:2048]'")
    overscan_section: str | None = Field(None, description="serial (or parallel) overscan")
    prescan_section: str | None = Field(None, description="prescan, informational")
    detector_section: str | None = Field(
        None, description="where the data section lands in the assembled, trimmed detector "
                          "(0-based origin at the detector's lower-left), reversed ranges flip")
    gain: float | None = Field(None, gt=0, description="e-/ADU; None = read gain_key")
    gain_key: str | None = Field(None, description="header key with the gain (e-/ADU)")
    read_noise: float | None = Field(None, ge=0, description="electrons; None = read read_noise_key")
    read_noise_key: str | None = None
    gain_table: HeaderTable | None = Field(None, description="gain chosen by a header setting (e.g. CCDGAIN)")
    read_noise_table: HeaderTable | None = Field(None, description="read noise chosen by a header setting")
    saturation: float = Field(65535.0, description="ADU above which pixels are flagged SAT")
    saturation_key: str | None = Field(None, description="header key with the saturation level, ADU "
                                                          "(``saturation`` when the key is absent)")
    overscan_margin: int = Field(2, ge=0, description="overscan columns/rows skipped next to the data")

    def model_post_init(self, __context) -> None:
        for name in ("data_section", "overscan_section", "prescan_section", "detector_section"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_section(value)
                except ValueError as exc:
                    raise ValueError(f"amplifier {self.name!r} {name}: {exc}") from None


class Detector(BaseModel):
    """One CCD: its place in the focal plane and its amplifiers."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(..., ge=0, description="detector number, unique in the camera")
    name: str
    nx: int | None = Field(None, gt=0, description="assembled, trimmed width in pixels")
    ny: int | None = Field(None, gt=0, description="assembled, trimmed height in pixels")
    x_mm: float = Field(0.0, description="focal-plane x of the detector centre, mm")
    y_mm: float = Field(0.0, description="focal-plane y of the detector centre, mm")
    orientation: int = Field(0, description="quarter turns (counter-clockwise) into the focal plane")
    pixel_size_mm: float | None = Field(None, gt=0, description="overrides the camera's pixel size")
    hdu: int | str | None = Field(None, description="HDU holding the detector (per-detector layouts)")
    amplifiers: list[Amplifier] = Field(..., min_length=1)

    @field_validator("orientation")
    @classmethod
    def _quarter(cls, v: int) -> int:
        if v not in (0, 1, 2, 3):
            raise ValueError("orientation is a number of quarter turns: 0, 1, 2 or 3")
        return v


class Camera(BaseModel):
    """A camera definition, loaded from YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    telescope: str = ""
    layout: Literal["hdu_per_detector", "hdu_per_amplifier"] = "hdu_per_detector"
    sections_from_header: bool = Field(False, description="read DATASEC/BIASSEC/DETSEC from each HDU")
    binning_key: str | None = Field(None, description="header key such as CCDSUM ('2 2') for DETSEC")
    pixel_size_mm: float = Field(0.015, gt=0)
    utc_offset_hours: float = Field(0.0, description="site local time - UTC; sets the night")
    max_exptime: float = Field(86400.0, gt=0, description="longest credible exposure or dark time (s); "
                                                          "ingest refuses a raw claiming more")
    detectors: list[Detector] = Field(..., min_length=1)
    metadata: MetadataMap
    extra_keys: list[str] = Field(default_factory=list, description="header keys copied into the registry")
    ignore_hdus: list[int | str] = Field(default_factory=list,
                                         description="image HDUs (index or EXTNAME) that are not raw pixels, "
                                                     "e.g. ERR and DQ planes: left out of the HDU count")
    isr: dict[str, Any] = Field(
        default_factory=dict,
        description="ISR defaults of this camera (IsrConfig fields, e.g. overscan_fit_type: MEDIAN_PER_ROW), "
                    "merged over every calib type's ISR defaults; a build's own config still wins")

    _content_hash: str = PrivateAttr("")
    _canonical: str = PrivateAttr("")

    @field_validator("isr")
    @classmethod
    def _isr_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        from calib_core.isr.process import IsrConfig  # isr imports rawio imports camera: import at validation time

        fields = list(IsrConfig.model_fields)
        retired = IsrConfig.old_keys()      # the reference's camelCase names (docs/architecture.md#config-naming)
        out = {}
        for key, value in v.items():
            name = key if key in IsrConfig.model_fields else retired.get(str(key))
            if name is None:
                close = difflib.get_close_matches(str(key), fields + list(retired), n=1)
                hint = f"; did you mean {retired.get(close[0], close[0])!r}?" if close else ""
                raise ValueError(f"unknown ISR setting {key!r}{hint}")
            if name != key:
                warnings.warn(f"camera isr key {key!r} is renamed {name!r}; the old name is accepted until "
                              f"the next release", FutureWarning, stacklevel=2)
            out[name] = value
        IsrConfig.model_validate(out)    # each value checked where it is written
        return out

    @model_validator(mode="after")
    def _check(self) -> "Camera":
        ids = [d.id for d in self.detectors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"detector ids must be unique, got {ids}")
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique, got {names}")
        for det in self.detectors:
            amp_names = [a.name for a in det.amplifiers]
            if len(set(amp_names)) != len(amp_names):
                raise ValueError(f"detector {det.name}: amplifier names must be unique")
            if self.layout == "hdu_per_detector" and det.hdu is None:
                raise ValueError(f"detector {det.name}: 'hdu' is required with layout hdu_per_detector")
            if self.layout == "hdu_per_amplifier":
                for amp in det.amplifiers:
                    if amp.hdu is None:
                        raise ValueError(f"detector {det.name} amplifier {amp.name}: 'hdu' is required "
                                         "with layout hdu_per_amplifier")
            if not self.sections_from_header:
                for amp in det.amplifiers:
                    missing = [n for n in ("data_section", "overscan_section", "detector_section")
                               if getattr(amp, n) is None]
                    if missing:
                        raise ValueError(f"detector {det.name} amplifier {amp.name}: missing {missing} "
                                         "(or set sections_from_header: true)")
                if det.nx is None or det.ny is None:
                    ex, ey = _extent_from_amps(det)
                    det.nx, det.ny = det.nx or ex, det.ny or ey
            for amp in det.amplifiers:
                if amp.gain is None and amp.gain_key is None and amp.gain_table is None:
                    raise ValueError(f"detector {det.name} amplifier {amp.name}: give gain or gain_key "
                                     "(or gain_table)")
                if amp.read_noise is None and amp.read_noise_key is None and amp.read_noise_table is None:
                    raise ValueError(f"detector {det.name} amplifier {amp.name}: "
                                     "give read_noise or read_noise_key (or read_noise_table)")
        _check_hdus(self)
        for i, det in enumerate(self.detectors):
            _check_amplifier_geometry(self, i, det)
        _check_focal_plane(self)
        self._freeze()      # the definition as loaded, before any reader fills in header geometry
        return self

    # -- convenience --------------------------------------------------------------------------------

    def detector(self, key: int | str) -> Detector:
        """Look up a detector by id or name."""
        for det in self.detectors:
            if det.id == key or det.name == str(key) or str(det.id) == str(key):
                return det
        raise KeyError(f"camera {self.name} has no detector {key!r}")

    @property
    def detector_ids(self) -> list[int]:
        return [d.id for d in self.detectors]

    def pixel_size(self, det: Detector) -> float:
        return det.pixel_size_mm or self.pixel_size_mm

    def detector_corners_mm(self, det: Detector) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) of a detector in the focal plane, mm."""
        nx, ny = det.nx or 0, det.ny or 0
        if det.orientation % 2:
            nx, ny = ny, nx
        p = self.pixel_size(det)
        return (det.x_mm - nx * p / 2, det.x_mm + nx * p / 2, det.y_mm - ny * p / 2, det.y_mm + ny * p / 2)

    def pixel_to_focal_plane(self, det: Detector, x, y):
        """Map detector pixel coordinates (0 = centre of the first pixel) to focal-plane mm.

        The detector is rotated by ``orientation`` quarter turns counter-clockwise about its centre.
        """
        import numpy as np

        p = self.pixel_size(det)
        u = (np.asarray(x, dtype=float) - (det.nx - 1) / 2.0) * p
        v = (np.asarray(y, dtype=float) - (det.ny - 1) / 2.0) * p
        for _ in range(det.orientation):
            u, v = -v, u
        return det.x_mm + u, det.y_mm + v

    def focal_plane_to_pixel(self, det: Detector, fx, fy):
        """Inverse of :meth:`pixel_to_focal_plane`."""
        import numpy as np

        p = self.pixel_size(det)
        u = np.asarray(fx, dtype=float) - det.x_mm
        v = np.asarray(fy, dtype=float) - det.y_mm
        for _ in range(det.orientation):
            u, v = v, -u
        return u / p + (det.nx - 1) / 2.0, v / p + (det.ny - 1) / 2.0

    def to_yaml(self) -> str:
        """The definition as loaded (canonical YAML): what the registry stores and the hash is of.

        Reading raws with header-defined geometry fills in detector sizes on this object; those are
        not part of the definition, so the text (and :attr:`content_hash`) stay as loaded."""
        if not self._canonical:
            self._freeze()
        return self._canonical

    @property
    def content_hash(self) -> str:
        """sha256 of the definition (every value that differs from the schema's defaults, as canonical
        JSON): part of every product's identity and intermediate key, so a corrected camera file
        rebuilds what it changes; comments and key order in the file do not count."""
        if not self._content_hash:
            self._freeze()
        return self._content_hash

    def _freeze(self) -> None:
        self._canonical = yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)
        # the hash leaves defaults out: a calibflow release that adds a schema field (with a default)
        # does not change the hash of the cameras that do not use it
        essence = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
        self._content_hash = hashlib.sha256(essence.encode()).hexdigest()


def _overlap(a: "Section", b: "Section") -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _check_hdus(cam: "Camera") -> None:
    """Each detector (or amplifier, per layout) reads its own HDU."""
    seen: dict[str, str] = {}
    for i, det in enumerate(cam.detectors):
        if cam.layout == "hdu_per_detector":
            where = [(f"detectors[{i}] ({det.name}).hdu", det.hdu)]
        else:
            where = [(f"detectors[{i}] ({det.name}) amplifiers[{j}] ({a.name}).hdu", a.hdu)
                     for j, a in enumerate(det.amplifiers)]
        for field, hdu in where:
            if str(hdu) in {str(h) for h in cam.ignore_hdus}:
                raise ValueError(f"{field}: HDU {hdu!r} is also listed in ignore_hdus")
            if str(hdu) in seen:
                raise ValueError(f"{field}: HDU {hdu!r} is already read by {seen[str(hdu)]}; each "
                                 f"{'detector' if cam.layout == 'hdu_per_detector' else 'amplifier'} "
                                 f"needs its own HDU (layout {cam.layout})")
            seen[str(hdu)] = field.rsplit(".", 1)[0]


def _check_amplifier_geometry(cam: "Camera", i: int, det: "Detector") -> None:
    """Sections that are listed: detector sections inside the detector and not shared, data and
    detector sections of one size, no overscan over data read from the same HDU."""
    def sec(amp, name):
        text = getattr(amp, name)
        return parse_section(text) if text else None

    where = [f"detectors[{i}] ({det.name}) amplifiers[{j}] ({a.name})" for j, a in enumerate(det.amplifiers)]
    for j, amp in enumerate(det.amplifiers):
        data, dsec = sec(amp, "data_section"), sec(amp, "detector_section")
        if data is not None and dsec is not None and (data.nx, data.ny) != (dsec.nx, dsec.ny):
            raise ValueError(f"{where[j]}.detector_section {amp.detector_section} is {dsec.nx}x{dsec.ny} pixels but "
                             f"data_section {amp.data_section} is {data.nx}x{data.ny}")
        if dsec is not None and det.nx is not None and det.ny is not None and \
                (dsec.x1 > det.nx or dsec.y1 > det.ny) and not cam.sections_from_header:
            raise ValueError(f"{where[j]}.detector_section {amp.detector_section} lies outside the "
                             f"{det.nx}x{det.ny} detector (nx, ny)")
        for k in range(j):
            other = sec(det.amplifiers[k], "detector_section")
            if dsec is not None and other is not None and _overlap(dsec, other):
                raise ValueError(f"{where[j]}.detector_section {amp.detector_section} overlaps amplifier "
                                 f"{det.amplifiers[k].name}'s {det.amplifiers[k].detector_section}: each "
                                 "amplifier fills its own part of the detector")
    # overscans against the data of every amplifier read from the same HDU
    for j, amp in enumerate(det.amplifiers):
        over = sec(amp, "overscan_section")
        if over is None:
            continue
        for k, other in enumerate(det.amplifiers):
            if cam.layout == "hdu_per_amplifier" and str(other.hdu) != str(amp.hdu):
                continue
            data = sec(other, "data_section")
            if data is not None and _overlap(over, data):
                whose = "its" if k == j else f"amplifier {other.name}'s"
                raise ValueError(f"{where[j]}.overscan_section {amp.overscan_section} overlaps {whose} "
                                 f"data_section {other.data_section}")


def _check_focal_plane(cam: "Camera") -> None:
    """Detectors of known size do not overlap in the focal plane."""
    boxes = [(d, cam.detector_corners_mm(d)) for d in cam.detectors if d.nx is not None and d.ny is not None]
    for n, (a, ba) in enumerate(boxes):
        for b, bb in boxes[:n]:
            ox = min(ba[1], bb[1]) - max(ba[0], bb[0])
            oy = min(ba[3], bb[3]) - max(ba[2], bb[2])
            if ox > 1e-9 and oy > 1e-9:
                raise ValueError(f"detectors {b.name} and {a.name} overlap in the focal plane by "
                                 f"{ox:.3g} x {oy:.3g} mm: check their x_mm, y_mm, nx, ny, orientation and "
                                 "pixel size")


def effective_config(model: type[BaseModel], camera: "Camera | None", config: dict | None) -> BaseModel:
    """A calib type's config: the type's defaults, then the camera's ``isr`` defaults over its ISR
    section, then ``config`` (a build's own settings) over both, merged key by key.

    A partial ``isr`` in ``config`` only changes the keys it names (the type's switches, such as a bias
    build's ``do_bias: false``, stay).
    """
    from calib_core.configmodel import upgrade_keys

    base = model().model_dump(mode="json")
    if camera is not None and camera.isr and "isr" in base:
        base = _deep_merge(base, {"isr": dict(camera.isr)})
    # each layer's retired keys are renamed before the merge, so a layer's old name overrides the layer
    # below it exactly as the new name would
    if config:
        config, renamed = upgrade_keys(model, config)
        for old_key, new_key in renamed:
            warnings.warn(f"config key {old_key} is renamed {new_key}; the old name is accepted until the "
                          f"next release", FutureWarning, stacklevel=2)
    return model.model_validate(_deep_merge(base, config or {}))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _extent_from_amps(det: Detector) -> tuple[int, int]:
    secs = [parse_section(a.detector_section) for a in det.amplifiers]
    return max(s.x1 for s in secs), max(s.y1 for s in secs)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _builtin_dir() -> Path:
    return Path(str(resources.files("calib_core") / "cameras"))


def list_cameras() -> list[str]:
    """Names of the cameras shipped with calibflow."""
    return sorted(p.stem for p in _builtin_dir().glob("*.yaml"))


def is_camera_file(spec: str | Path) -> bool:
    """Whether a ``--camera`` value names a YAML file (rather than a camera by name)."""
    text = str(spec)
    return Path(text).suffix in (".yaml", ".yml") or Path(text).is_file()


def camera_from_definition(text: str, source: str = "registry") -> Camera:
    """A camera from its stored definition (the YAML text the registry keeps)."""
    return _camera_from_text(text, source)


@lru_cache(maxsize=64)
def _camera_from_text(text: str, source: str) -> Camera:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CameraError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CameraError(f"{source}: a camera definition must hold a mapping at the top level")
    return _validate(data, source)


def _validate(data: dict, source: str) -> Camera:
    from pydantic import ValidationError

    try:
        return Camera.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid camera definition ({exc.error_count()} problem(s))"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                known = _fields_at(err["loc"][:-1])
                close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
                msg = f"unknown key{f'; did you mean {close[0]!r}?' if close else ''} (known: {', '.join(known)})"
            lines.append(f"  - {loc or '<top>'}: {msg}")
        raise CameraError("\n".join(lines)) from None


def _fields_at(loc) -> list[str]:
    """Field names of the model found at a pydantic error location inside a camera definition."""
    import typing

    model = Camera
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        found = None
        for t in (ann, *typing.get_args(ann)):
            for u in (t, *typing.get_args(t)):
                if isinstance(u, type) and issubclass(u, BaseModel):
                    found = u
        if found is None:
            return []
        model = found
    return list(model.model_fields)


def load_camera(name_or_path: str | Path) -> Camera:
    """Load a camera by built-in name (``democam``) or from a YAML file path.

    Raises
    ------
    CameraError
        If the name is unknown, the file cannot be read, or the definition does not validate;
        the message names the file and every problem pydantic found.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = _builtin_dir() / f"{text}.yaml"
        if not path.exists():
            raise CameraError(f"unknown camera {text!r}; built-in cameras: {', '.join(list_cameras())} "
                              "(or give the path of a YAML file)")
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else (0, 0)
    return _load_camera_file(str(path.resolve()), stamp)


@lru_cache(maxsize=64)
def _load_camera_file(path: str, _stamp: tuple) -> Camera:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise CameraError(f"{path}: camera file not found") from None
    except yaml.YAMLError as exc:
        raise CameraError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CameraError(f"{path}: a camera file must hold a mapping at the top level")
    return _validate(data, path)
