"""One typed entry flow per calib type, so that each deployment's form shows that type's config.

``flows.build.build_calib`` takes ``calib_type`` and a free ``config`` dict, which the Prefect UI can
only show as a JSON box, and which the server cannot check before a run starts. The flows here
have the same parameters minus ``calib_type`` (fixed), with ``config`` typed as the calib type's
pydantic model: the deployment's parameter schema then carries every field, its default, bounds and
choices, the UI renders it as a form, and the server refuses a bad value when a run is created.
Each flow keeps the Prefect name ``build-calib`` (deployments appear as ``build-calib/bias`` ...)
and runs ``build_calib``'s body in its own flow run, so a deployment run is one flow run.

``repo`` and ``registry_url`` default to None, meaning what the ``calibflow`` CLI uses:
``CALIBFLOW_REPO`` / ``CALIBFLOW_REGISTRY_URL`` in the environment of the process that runs the flow
(the serve process or the worker), else ``./calibrepo`` relative to that process's working
directory. ``calibflow serve`` pins both as absolute parameter defaults of its deployments.
"""

# No ``from __future__ import annotations``: the flow signatures below must carry real types
# (the config model of each calib type) for Prefect's parameter schema.

import datetime as dt
import os
from typing import Annotated, Literal

from prefect import Flow, flow
from pydantic import AfterValidator, BaseModel, Field

from calib_core.builds.calibtypes import CALIB_TYPES, dependency_order
from calib_core.quality.verify import VerifyConfig
from flows.build import build_calib

__all__ = ["BUILD_FLOWS", "build_bias", "build_dark", "build_defects", "build_ptc", "build_flat", "build_fringe",
           "build_sky", "resolve_repo",
           "NightStr", "ARGS_DOC"]

def _a_real_date(value: str) -> str:
    """The pattern lets 2026-13-45 through; the calendar does not (a run is refused before it starts)."""
    try:
        if "T" in value:
            dt.datetime.fromisoformat(value)
        else:
            dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a date YYYY-MM-DD") from None
    return value


NightStr = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$"), AfterValidator(_a_real_date)]
DateStr = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?)?$"),
                    AfterValidator(_a_real_date)]

ARGS_DOC = """
Args:
    night: observing night YYYY-MM-DD (the local date of the evening); selects the exposures
    camera: camera name in the registry (or its YAML file on the serving machine); empty when the registry or the selection decides
    filter: filter of the exposures; needed where the night has several
    exposures: explicit exposure ids instead of (or within) the night
    detectors: detector ids to build; empty means all detectors of the camera
    config: {calib_type} configuration; every field has the reference default
    drop_incomplete: drop exposures that lack some detectors (recorded) instead of failing
    calib_date: date of the product (YYYY-MM-DD); default the date of the inputs
    validity_days_before: validity of the product before its calib date, days
    validity_days_after: validity of the product after its calib date, days
    on_bad_input: an exposure whose raw cannot be read fails the build, or is excluded and recorded
    runner: where the tasks run: threads (default), processes, or dask
    dask_address: with runner dask, tcp://host:8786 of an existing scheduler; empty starts a local cluster
    dask_workers: with runner dask and no address, worker processes of the local cluster; empty means one per core
    detectors_per_task: detectors of one exposure per process task; empty means about four tasks per worker
    verify: the verification gate's thresholds and input screening; every field has the reference default
    repo: repository folder; empty means CALIBFLOW_REPO of the process running the flow, else ./calibrepo
    registry_url: SQLAlchemy URL of the registry; empty means CALIBFLOW_REGISTRY_URL, else SQLite inside the repository
"""


def resolve_repo(repo: str | None, registry_url: str | None) -> tuple[str, str | None]:
    """The repository folder and registry URL as the CLI resolves them (explicit, environment, default)."""
    from calib_core.repository import DEFAULT_REPO

    repo = repo or os.environ.get("CALIBFLOW_REPO") or DEFAULT_REPO
    # the environment's URL stays a reference: a subflow's parameters must not carry a password
    return os.path.abspath(repo), registry_url or ("env:CALIBFLOW_REGISTRY_URL"
                                                   if os.environ.get("CALIBFLOW_REGISTRY_URL") else None)


def _changed(values: dict, defaults: dict) -> dict:
    """The settings of a form that differ from the type's defaults: only those override the camera's
    ISR defaults (a form always carries every field)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(defaults.get(k), dict):
            sub = _changed(v, defaults[k])
            if sub:
                out[k] = sub
        elif k not in defaults or defaults[k] != v:
            out[k] = v
    return out


def _build_flow(calib_type: str) -> Flow:
    spec = CALIB_TYPES[calib_type]
    model: type[BaseModel] = spec.config_model

    def build(night: NightStr | None = None, camera: str | None = None, filter: str | None = None,
              exposures: list[str] | None = None, detectors: list[int] | None = None,
              config: model = model(), drop_incomplete: bool = False, calib_date: DateStr | None = None,
              validity_days_before: Annotated[float, Field(ge=0)] = 15.0,
              validity_days_after: Annotated[float, Field(ge=0)] = 15.0,
              on_bad_input: Literal["fail", "exclude"] = "fail",
              runner: Literal["threads", "processes", "dask"] = "threads", dask_address: str | None = None,
              dask_workers: Annotated[int, Field(ge=1)] | None = None,
              detectors_per_task: Annotated[int, Field(ge=1)] | None = None,
              repo: str | None = None, registry_url: str | None = None,
              verify: VerifyConfig = VerifyConfig()) -> dict:
        repo, registry_url = resolve_repo(repo, registry_url)
        # "": no default camera (prefect.yaml's placeholder filled with nothing)
        return build_calib.fn(calib_type, camera=camera or None, night=night, exposures=exposures or None,
                              filter=filter, detectors=detectors or None, repo=repo, registry_url=registry_url,
                              config=_changed(config.model_dump(mode="json"), model().model_dump(mode="json")),
                              drop_incomplete=drop_incomplete,
                              calib_date=calib_date, validity_days_before=validity_days_before,
                              validity_days_after=validity_days_after, on_bad_input=on_bad_input,
                              runner=runner, dask_address=dask_address, dask_workers=dask_workers,
                              detectors_per_task=detectors_per_task, verify=verify)

    build.__name__ = build.__qualname__ = f"build_{calib_type}"
    build.__doc__ = spec.description + "\n" + ARGS_DOC.format(calib_type=calib_type)
    return flow(build, name="build-calib", description=spec.description, log_prints=True)


build_bias = _build_flow("bias")
build_dark = _build_flow("dark")
build_defects = _build_flow("defects")
build_ptc = _build_flow("ptc")
build_flat = _build_flow("flat")
build_fringe = _build_flow("fringe")
build_sky = _build_flow("sky")

#: calib type -> its entry flow, in build order (a type without a named flow above gets one here)
BUILD_FLOWS: dict[str, Flow] = {t: globals().get(f"build_{t}") or _build_flow(t) for t in dependency_order()}
