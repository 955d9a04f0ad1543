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

__all__ = ["DeploymentSettings", "make_deployments", "NIGHTLY_CRON", "NIGHTLY_NAME", "TAGS"]

#: The nightly run: 09:00 in the site's time zone, i.e. the morning after the night it processes.
NIGHTLY_CRON = "0 9 * * *"
NIGHTLY_NAME = "nightly"
TAGS = ["calibflow"]


class DeploymentSettings(BaseModel):
    """What the served deployments need to know about this installation.

    ``repo`` is made absolute here, so the runs do not depend on the working directory of the
    process that serves them.
    """

    repo: Path = Field(description="repository folder (absolute)")
    registry_url: str | None = Field(None, description="registry URL; None: SQLite inside the repository")
    camera: str = Field("democam", description="default camera of every deployment")
    nightly_cron: str = Field(NIGHTLY_CRON, description="cron of the nightly deployment")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in")

    @field_validator("repo")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(os.path.abspath(v))

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: give an IANA name such as America/Santiago or UTC") \
                from None
        return v

    @field_validator("nightly_cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from prefect.schedules import Cron

        try:
            Cron(v)
        except ValueError as exc:
            raise ValueError(f"invalid cron {v!r}: {exc}") from None
        return v

    def common_parameters(self) -> dict:
        params = {"camera": self.camera, "repo": str(self.repo)}
        if self.registry_url:
            params["registry_url"] = self.registry_url
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
    try:
        from flows.nightly import nightly
    except ImportError:  # the nightly flow has not landed in this checkout
        return out
    out.append(nightly.to_deployment(
        name=NIGHTLY_NAME, version=__version__, tags=TAGS + ["nightly"],
        description=(f"Every calib of last night, run at {settings.nightly_cron!r} ({settings.timezone}): "
                     "the morning after the night. " + (nightly.description or "")).strip(),
        schedules=[Cron(settings.nightly_cron, timezone=settings.timezone)],
        parameters=settings.common_parameters(), entrypoint_type=EntrypointType.MODULE_PATH))
    return out

