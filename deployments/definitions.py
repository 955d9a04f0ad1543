"""The deployments ``calibflow serve`` serves: one per calib type (``build-calib/bias`` ...), on demand,
and the nightly flow (``nightly-calibs/nightly``) on a cron schedule in an explicit time zone.

``prefect.yaml`` at the repository root describes the same deployments for ``prefect deploy --all``
and a process work pool; ``tests/test_deployments.py`` keeps the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator

__all__ = ["DeploymentSettings", "make_deployments", "site_morning_cron", "NIGHTLY_NAME", "TAGS"]

#: The nightly run: 09:00 at the site, i.e. the morning after the night it processes.
NIGHTLY_LOCAL_TIME = (9, 0)
NIGHTLY_NAME = "nightly"
TAGS = ["calibflow"]


def site_morning_cron(utc_offset_hours: float, local_time: tuple[int, int] = NIGHTLY_LOCAL_TIME) -> str:
    """A daily cron, read in UTC, for ``local_time`` at a site ``utc_offset_hours`` from UTC (the
    camera's ``utc_offset_hours``, which also names the nights)."""
    minutes = round(local_time[0] * 60 + local_time[1] - utc_offset_hours * 60) % (24 * 60)
    return f"{minutes % 60} {minutes // 60} * * *"


class DeploymentSettings(BaseModel):
    """What the served deployments need to know about this installation.

    ``repo`` is made absolute here, so the runs do not depend on the working directory of the
    process that serves them. The nightly schedule defaults to 09:00 at the camera's site, written
    as a UTC cron from the camera's ``utc_offset_hours`` (the offset that also names the nights);
    with an IANA ``timezone`` (daylight saving time followed) it defaults to ``0 9 * * *`` there.
    """

    repo: Path = Field(description="repository folder (absolute)")
    registry_url: str | None = Field(None, description="registry URL; None: SQLite inside the repository")
    camera: str | None = Field(None, description="default camera of every deployment (its name in the "
                               "registry); None: each run's registry or selection decides")
    utc_offset_hours: float | None = Field(None, description="the camera's site offset (sets the nightly cron); "
                                           "None: from the camera's definition")
    nightly_cron: str | None = Field(None, description="cron of the nightly deployment")
    timezone: str | None = Field(None, description="IANA time zone the cron is read in")

    @field_validator("repo")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(os.path.abspath(v))

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: give an IANA name such as America/Santiago or UTC") \
                from None
        return v

    @field_validator("nightly_cron")
    @classmethod
    def _valid_cron(cls, v: str | None) -> str | None:
        from prefect.schedules import Cron

        if v is None:
            return v
        try:
            Cron(v)
        except ValueError as exc:
            raise ValueError(f"invalid cron {v!r}: {exc}") from None
        return v

    def nightly_schedule(self) -> tuple[str, str]:
        """(cron, IANA time zone) of the nightly deployment."""
        if self.timezone is not None:
            return self.nightly_cron or "{1} {0} * * *".format(*NIGHTLY_LOCAL_TIME), self.timezone
        if self.nightly_cron is not None:
            return self.nightly_cron, "UTC"
        offset = self.utc_offset_hours
        if offset is None:
            from calib_core.camera import load_camera

            offset = load_camera(self.camera).utc_offset_hours if self.camera else 0.0
        return site_morning_cron(offset), "UTC"

    def common_parameters(self) -> dict:
        params = {"repo": str(self.repo)}
        if self.camera:
            params["camera"] = self.camera
        if self.registry_url:      # by reference: `calibflow serve` exports it to the runs it starts
            params["registry_url"] = "env:CALIBFLOW_REGISTRY_URL"
        return params


def make_deployments(settings: DeploymentSettings) -> list:
    """The ``RunnerDeployment`` objects, ready for ``prefect.serve``."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from calibflow import __version__
    from deployments.build import BUILD_FLOWS

    out = []
    for calib_type, build_flow in BUILD_FLOWS.items():
        out.append(build_flow.to_deployment(
            name=calib_type, description=build_flow.description, version=__version__,
            tags=TAGS + [calib_type], parameters=settings.common_parameters(),
            entrypoint_type=EntrypointType.MODULE_PATH))
    from deployments.nightly import nightly_calibs

    cron, zone = settings.nightly_schedule()
    out.append(nightly_calibs.to_deployment(
        name=NIGHTLY_NAME, version=__version__, tags=TAGS + ["nightly"],
        description=f"{nightly_calibs.description} Scheduled: cron {cron!r} in {zone}, the morning after the night.",
        schedules=[Cron(cron, timezone=zone)], parameters=settings.common_parameters(),
        entrypoint_type=EntrypointType.MODULE_PATH))
    return out
