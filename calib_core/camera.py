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

import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Section",
    "parse_section",
    "KeyRule",
    "ValueSource",
    "ObsTypeRule",
    "MetadataMap",
    "Amplifier",
    "Detector",
    "Camera",
    "CameraError",
    "load_camera",
    "list_cameras",
    "OBS_TYPES",
]

OBS_TYPES = ("bias", "dark", "flat", "science", "arc", "fringe", "sky", "focus", "other", "unknown")

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


class CameraError(ValueError):
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


class ObsTypeRule(BaseModel):
    """One rule for the observation type: a regex on a header value or on the file path."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="header key whose value is matched")
    hdu: int | str = 0
    path: bool = Field(False, description="match the file path instead of a header value")
    pattern: str = Field(..., description="Python regex, searched (not full-matched)")
    value: str = Field(..., description="observation type when the pattern matches")
    exptime_min: float | None = Field(None, description="rule applies only if EXPTIME >= this")
    exptime_max: float | None = Field(None, description="rule applies only if EXPTIME <= this")

    @field_validator("value")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in OBS_TYPES:
            raise ValueError(f"unknown observation type {v!r}; expected one of {OBS_TYPES}")
        return v

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        re.compile(v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ObsTypeRule":
        if (self.key is None) == (not self.path):
            raise ValueError("an obs_type rule needs exactly one of 'key' or 'path: true'")
        return self


class ValueSource(KeyRule):
    """A text value with an optional mapping of raw header values to normalised ones."""

    map: dict[str, str] = Field(default_factory=dict, description="raw value -> normalised value")
    path_pattern: str | None = Field(
        None, description="regex on the file name; group 1 is the value (used when no key is present)")
    format: str | None = Field(
        None, description="final value as a format string with {value}, {night}, {night_compact}, "
                          "{stem}; e.g. '{night_compact}_{value}' for frame numbers that restart nightly")


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
    saturation: float = Field(65535.0, description="ADU above which pixels are flagged SAT")
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
                    det.nx, det.ny = _extent_from_amps(det)
            for amp in det.amplifiers:
                if amp.gain is None and amp.gain_key is None:
                    raise ValueError(f"detector {det.name} amplifier {amp.name}: give gain or gain_key")
                if amp.read_noise is None and amp.read_noise_key is None:
                    raise ValueError(f"detector {det.name} amplifier {amp.name}: "
                                     "give read_noise or read_noise_key")
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
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


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
    return _load_camera_file(str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0)


@lru_cache(maxsize=64)
def _load_camera_file(path: str, _mtime: float) -> Camera:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise CameraError(f"{path}: camera file not found") from None
    except yaml.YAMLError as exc:
        raise CameraError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CameraError(f"{path}: a camera file must hold a mapping at the top level")
    from pydantic import ValidationError

    try:
        return Camera.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid camera definition ({exc.error_count()} problem(s))"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  - {loc or '<top>'}: {err['msg']}")
        raise CameraError("\n".join(lines)) from None
