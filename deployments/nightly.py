"""The nightly deployment's entry flow: ``flows.nightly.nightly`` with the form the UI shows.

Same Prefect name (``nightly-calibs``) and parameters as the nightly flow, with two differences for
served and worker-run deployments: ``policy`` defaults to the policy itself (the form shows every
field with its default instead of an empty "None"), and ``repo`` / ``registry_url`` default to the
environment of the process that runs the flow, as for the build entry flows (``deployments.build``).
"""

from typing import Literal

from prefect import flow

from deployments.build import NightStr, resolve_repo
from flows.nightly import NightlyPolicy, nightly

__all__ = ["nightly_calibs"]


@flow(name="nightly-calibs", log_prints=True,
      description="Build every calib the night's exposures allow (bias, dark, defects, ptc, flat, fringe, "
                  "sky), in dependency order, each build using the products certified before it.")
def nightly_calibs(night: NightStr | None = None, camera: str | None = None, policy: NightlyPolicy = NightlyPolicy(),
                   runner: Literal["threads", "processes", "dask"] = "threads", dask_address: str | None = None,
                   repo: str | None = None, registry_url: str | None = None) -> dict:
    """Build every calib a night allows, in dependency order, and report what was built.

    Args:
        night: observing night YYYY-MM-DD (the local date of the evening); empty means last night at the camera's site
        camera: camera name in the registry (or its YAML file on the serving machine); empty when the registry holds one camera
        policy: which calib types to build, the fewest inputs worth a build, fringing filters, validity
        runner: where each build's tasks run: threads (default), processes, or dask
        dask_address: with runner dask, tcp://host:8786 of an existing scheduler; empty starts a local cluster
        repo: repository folder; empty means CALIBFLOW_REPO of the process running the flow, else ./calibrepo
        registry_url: SQLAlchemy URL of the registry; empty means CALIBFLOW_REGISTRY_URL, else SQLite inside the repository
    """
    repo, registry_url = resolve_repo(repo, registry_url)
    return nightly.fn(night=night, camera=camera or None, repo=repo, registry_url=registry_url, policy=policy,
                      runner=runner, dask_address=dask_address)
