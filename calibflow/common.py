"""What the two command modules share (``cli``: the commands; ``ops``: serve and trigger on a
Prefect server): the consoles, the one-line error exit, opening a repository, loading a camera and
the Prefect environment. Neither command module imports the other for these."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["console", "err", "RepoOpt", "UrlOpt", "fail", "esc", "open_repo", "load_camera_or_fail", "prefect_env"]

# Pipes and CI logs get wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

RepoOpt = typer.Option(None, "--repo", envvar="CALIBFLOW_REPO",
                       help="repository folder [default: ./calibrepo]")
UrlOpt = typer.Option(None, "--registry-url", envvar="CALIBFLOW_REGISTRY_URL",
                      help="SQLAlchemy URL of the registry [default: SQLite inside the repository]")


def fail(message: str, code: int = 1) -> None:
    # one line whatever its length (no wrapping), and brackets in it are text, not markup (library
    # messages hold FITS sections such as [1:10,1:20])
    err.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def esc(text) -> str:
    """Text shown literally by rich (brackets are not markup)."""
    return escape(str(text))


def open_repo(repo: Optional[Path], url: Optional[str], *, create: bool = False):
    from calib_core.datastore import DEFAULT_REPO, Datastore
    from calib_core.registry import Registry, RegistryError

    store = Datastore(repo or DEFAULT_REPO)
    if not create and not store.root.exists() and not url:
        fail(f"no repository at {store.root}: run `calibflow init` (or pass --repo)")
    try:
        registry = Registry.open(url or store.default_registry_url)
    except RegistryError as exc:
        fail(f"--registry-url: {exc}")
    if not create:
        try:
            registry.check_ready()
        except RegistryError as exc:
            fail(str(exc))
    return store, registry


def load_camera_or_fail(name: str):
    from calib_core.camera import CameraError, load_camera

    try:
        return load_camera(name)
    except CameraError as exc:
        fail(str(exc))


def prefect_env() -> None:
    """Telemetry off and quiet logs unless the user chose otherwise (docs/prefect.md#telemetry-and-other-settings)."""
    import os

    for key, value in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                       "PREFECT_TASKS_DEFAULT_NO_CACHE": "true", "DASK_LOGGING__DISTRIBUTED": "warning"}.items():
        os.environ.setdefault(key, value)
