"""Planning a calib build (no Prefect): inputs, consistency, output id, resume keys.

This is the ``CalibTask`` bookkeeping of the reference (docs/algorithms.md#build-bookkeeping) as plain functions, so
flows stay a table of contents and the logic is testable on its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from calib_core.builds.calibtypes import CALIB_TYPES as SPECS
from calib_core.builds.calibtypes import CalibTypeName
from calib_core.builds.calibtypes import calib_type as spec_of
from calib_core.errors import InputError
from calib_core.quality.verify import VerifyConfig
from calib_core.records import Exposure
from calib_core.repository import Registry

__all__ = ["CALIB_TYPES", "BuildRequest", "BuildPlan", "InconsistentInputs", "plan_build", "config_hash", "intermediate_key"]

#: the calib types' names (their facts: :mod:`calib_core.builds.calibtypes`)
CALIB_TYPES = tuple(SPECS)


class BuildRequest(BaseModel):
    """Everything one build is asked to do: the CLI builds it, the ``build-calib`` flow, ``run_build``
    and the deployments' entry flows take exactly these fields (tests/test_build_request.py checks
    every signature against this model), so a parameter exists everywhere or nowhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calib_type: CalibTypeName = Field(description="the calib type to build")
    camera: str | None = Field(None, description="a registered camera's name or its YAML file; None when the "
                                                 "registry (or the selection) has one camera")
    night: str | None = Field(None, description="observing night YYYY-MM-DD (the local date of the evening)")
    exposures: list[str] | None = Field(None, description="explicit exposure ids instead of (or within) the night")
    filter: str | None = Field(None, description="filter of the exposures; needed where the night has several")
    detectors: list[int] | None = Field(None, description="detector ids; None means every detector")
    repo: str = Field("calibrepo", description="repository folder")
    registry_url: str | None = Field(None, description="SQLAlchemy URL (or env:NAME) of the registry; None "
                                                       "means SQLite inside the repository")
    config: dict | None = Field(None, description="settings over the type's and the camera's defaults")
    drop_incomplete: bool = Field(False, description="drop exposures that lack detectors (recorded) instead of "
                                                     "failing")
    calib_date: str | None = Field(None, description="date of the product YYYY-MM-DD; default: the inputs' date")
    validity_days_before: float = Field(15.0, ge=0, description="validity before the calib date, days")
    validity_days_after: float = Field(15.0, ge=0, description="validity after the calib date, days")
    on_bad_input: Literal["fail", "exclude"] = Field(
        "fail", description="an unreadable raw fails the build, or is excluded and recorded")
    runner: Literal["threads", "processes", "dask"] = Field("threads", description="where the tasks run")
    dask_address: str | None = Field(None, description="runner dask: tcp://host:8786 of an existing scheduler; "
                                                       "None starts a local cluster")
    dask_workers: int | None = Field(None, ge=1, description="runner dask without an address: worker processes "
                                                             "of the local cluster (default: one per core)")
    detectors_per_task: int | None = Field(None, ge=1, description="detectors of one exposure per process task "
                                                                   "(default: about four tasks per worker)")
    verify: VerifyConfig | None = Field(None, description="the verification gate's thresholds and input "
                                                          "screening (default: the reference's); not part of a "
                                                          "product's identity")

    @field_validator("night", "calib_date")
    @classmethod
    def _a_real_date(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a date YYYY-MM-DD") from None
        return value


class InconsistentInputs(InputError):
    """Exposures of a build do not all have the same detectors (``checkCcdIdLists``)."""


def config_hash(config: BaseModel | dict) -> str:
    """sha256 of a config's canonical JSON (stored with every product)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def intermediate_key(raw_checksum: str, cfg_hash: str, calib_ids: list[str], camera_hash: str = "") -> str:
    """Key of a per-(exposure, detector) intermediate: a rerun with the same raw, config, ISR calibs
    and camera definition finds it and skips the work (resume); a corrected camera file does not."""
    payload = json.dumps([raw_checksum, cfg_hash, sorted(calib_ids)] + ([camera_hash] if camera_hash else []))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class BuildPlan:
    calib_type: str
    camera: str
    exposures: list[Exposure]                  # registry records, date order
    detectors: list[int]
    filter: str
    calib_date: dt.date
    dropped: dict[str, str] = field(default_factory=dict)   # exposure id -> why

    @property
    def exposure_ids(self) -> list[str]:
        return [e.exposure_id for e in self.exposures]


def plan_build(registry: Registry, calib_type: str, camera: str, *, night: str | None = None,
               date_range: tuple[str, str] | None = None, exposure_ids: list[str] | None = None,
               filter: str | None = None, detectors: list[int] | None = None,
               drop_incomplete: bool = False, calib_date: str | None = None) -> BuildPlan:
    """Select the inputs of a build and check them.

    Raises
    ------
    ValueError
        No inputs, mixed filters, or an unknown calib type.
    InconsistentInputs
        Some exposures lack detectors others have; the message lists which exposure lacks which
        detector. With ``drop_incomplete`` those exposures are dropped instead and the reason recorded.
    """
    spec = spec_of(calib_type)
    rows = registry.query_exposures(camera=camera, obs_type=spec.input_obstype, filter=filter, night=night,
                                    exposure_ids=exposure_ids)
    if date_range:
        lo, hi = (dt.date.fromisoformat(d) for d in date_range)
        rows = [r for r in rows if lo <= dt.date.fromisoformat(r.night) <= hi]
    if exposure_ids:
        missing = sorted(set(exposure_ids) - {r.exposure_id for r in rows})
        if missing:
            raise ValueError(f"{calib_type} build: exposures not found as {spec.input_obstype} frames of "
                             f"camera {camera}: {', '.join(missing)}")
    if not rows:
        where = ", ".join(f"{k}={v}" for k, v in (("night", night), ("filter", filter), ("range", date_range)) if v)
        raise ValueError(f"{calib_type} build: no {spec.input_obstype} exposures of camera {camera}"
                         + (f" for {where}" if where else ""))
    filters = sorted({r.filter for r in rows})
    if not spec.filtered:
        out_filter = "NONE"
    elif len(filters) > 1:
        raise ValueError(f"{calib_type} build: inputs mix filters {filters}; select one with --filter")
    else:
        out_filter = filters[0]

    have = registry.exposure_detectors(camera, [r.exposure_id for r in rows])
    wanted = set(detectors) if detectors else set().union(*have.values())
    lacking = {e: sorted(wanted - dets) for e, dets in have.items() if wanted - dets}
    dropped = {}
    if lacking:
        detail = "; ".join(f"exposure {e} lacks detector(s) {', '.join(map(str, d))}" for e, d in sorted(lacking.items()))
        if not drop_incomplete:
            raise InconsistentInputs(f"{calib_type} build: inconsistent inputs: {detail} "
                                     "(select detectors, or allow dropping incomplete exposures)")
        dropped = {e: f"incomplete: lacks detector(s) {', '.join(map(str, d))}" for e, d in lacking.items()}
        rows = [r for r in rows if r.exposure_id not in dropped]
        if not rows:
            raise InconsistentInputs(f"{calib_type} build: every exposure is incomplete: {detail}")

    if calib_date:
        date = dt.date.fromisoformat(calib_date)
    else:  # mean input date (docs/algorithms.md#calib-date)
        stamps = [dt.datetime.fromisoformat(r.date_obs).timestamp() for r in rows]
        date = dt.datetime.fromtimestamp(sum(stamps) / len(stamps), dt.timezone.utc).date()
    return BuildPlan(calib_type=calib_type, camera=camera, exposures=rows, detectors=sorted(wanted),
                     filter=out_filter, calib_date=date, dropped=dropped)
