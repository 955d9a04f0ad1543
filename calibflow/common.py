"""What the two command modules share (``cli``: the commands; ``ops``: serve and trigger on a
Prefect server): the consoles, the one-line error exit, opening a repository, loading a camera and
the Prefect environment. Neither command module imports the other for these."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["console", "err", "RepoOpt", "UrlOpt", "VerboseOpt", "fail", "esc", "open_repo", "load_camera_or_fail",
           "prefect_env", "quiet_prefect", "dumps_json", "print_json", "HelpGroup", "check_calib_type",
           "check_obs_type", "check_detectors", "checkout_root", "refuse_inside_checkout"]

# Pipes and CI logs get wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

RepoOpt = typer.Option(None, "--repo", envvar="CALIBFLOW_REPO",
                       help="repository folder [default: ./calibrepo]")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="also print Prefect's log (every flow and task run); "
                          "warnings and errors are printed without it")
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
    from calib_core.repository import DEFAULT_REPO, Datastore, Registry, RegistryError

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


def start_embedded_api():
    """Start the embedded Prefect server now, in a thread, and return a function that waits until it
    is up (call it before the first flow). Its start-up (~7 s: imports, the database, the health
    check) then overlaps what the command does before its flow, such as the demo's simulation and
    ingest. Nothing is started where ``PREFECT_API_URL`` names a server. A start that fails here is
    retried by the flow's own client, which reports the error."""
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    # imported here, not in the thread: the caller may import other modules meanwhile
    from prefect.server.api.server import SubprocessASGIServer

    def start():
        try:
            SubprocessASGIServer().start()      # the instance the flow's client uses (one per process)
        except Exception:
            pass

    thread = threading.Thread(target=start, name="calibflow-prefect-server", daemon=True)
    thread.start()
    return thread.join


# ------------------------------------------------------------------------------------------------
# help: defaults shown, flags without a type
# ------------------------------------------------------------------------------------------------


class HelpGroup(typer.core.TyperGroup):
    """The command group of ``calibflow``: its help is text. Typer reads every help string as rich
    markup, which swallows the ``[default: ...]`` the options document; here brackets are escaped so
    they show, and on/off flags get no ``<bool>`` type column (they take no value)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "rich_markup_mode", None) == "rich":
            _plain_help(self)


def _plain_help(command) -> None:
    for cmd in getattr(command, "commands", {}).values():
        _plain_help(cmd)
    if getattr(command, "_calibflow_plain", False):
        return
    command._calibflow_plain = True
    for attr in ("help", "short_help"):
        if getattr(command, attr, None):
            setattr(command, attr, escape(getattr(command, attr)))
    for param in getattr(command, "params", []):
        if getattr(param, "help", None):
            param.help = escape(param.help)
        _no_type(param)
    if hasattr(command, "get_help_option"):
        get_help_option = command.get_help_option

        def help_option(ctx, _get=get_help_option):
            return _no_type(_get(ctx))

        command.get_help_option = help_option


def _no_type(param):
    """An on/off flag takes no value: no ``<bool>`` beside it."""
    if getattr(param, "is_flag", False) and getattr(param, "param_type_name", "") == "option":
        param.metavar = ""
    return param


# ------------------------------------------------------------------------------------------------
# strict JSON
# ------------------------------------------------------------------------------------------------


def _finite(value):
    """``value`` with every NaN / infinity replaced by None (JSON has no such numbers)."""
    import math
    import numbers

    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps_json(obj) -> str:
    """Strict JSON (RFC 8259): a missing or undefined number is ``null``, never ``NaN``; dates and
    paths as text."""
    import json

    return json.dumps(_finite(obj), indent=1, allow_nan=False, default=str)


def print_json(obj) -> None:
    sys.stdout.write(dumps_json(obj) + "\n")


# ------------------------------------------------------------------------------------------------
# names the user typed: calib and observation types, detectors
# ------------------------------------------------------------------------------------------------


def check_calib_type(name: Optional[str], option: str = "--type") -> None:
    from calib_core.builds.calibtypes import CALIB_TYPES

    if name is not None and name not in CALIB_TYPES:
        fail(f"{option}: unknown calib type {name!r}; choose one of {', '.join(CALIB_TYPES)}")


def check_obs_type(name: Optional[str], option: str = "--type") -> None:
    from calib_core.camera import OBS_TYPES

    if name is not None and name not in OBS_TYPES:
        fail(f"{option}: unknown observation type {name!r}; choose one of {', '.join(OBS_TYPES)}")


def check_detectors(cameras, detectors, option: str = "--detector") -> None:
    """Every detector number given exists in one of ``cameras`` (Camera objects)."""
    given = [d for d in ([detectors] if isinstance(detectors, int) else detectors or []) if d is not None]
    cameras = [c for c in cameras if c is not None]
    if not given or not cameras:
        return
    known = sorted({d.id for c in cameras for d in c.detectors})
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(c.name for c in cameras)
        fail(f"{option}: no detector {', '.join(map(str, unknown))} in camera {names} "
             f"(detectors {_ranges(known)})")


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


# ------------------------------------------------------------------------------------------------
# outputs: never inside the source checkout by accident
# ------------------------------------------------------------------------------------------------


def checkout_root() -> Optional[Path]:
    """The git checkout calibflow runs from (an editable install), or None (an installed package)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def _ignored_folders(root: Path) -> list[Path]:
    """The plain folders the checkout's .gitignore names (``calibrepo/``, ``/demo/``): made for outputs."""
    out = []
    try:
        lines = (root / ".gitignore").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if line.endswith("/") and not line.startswith(("#", "!")) and not any(c in line for c in "*?[\\"):
            out.append(line.strip("/"))
    return [root / p for p in out]


def refuse_inside_checkout(path: Path, option: str) -> None:
    """Fail when ``path`` (as typed: relative to the working directory) lies in calibflow's own
    checkout outside the folders it ignores for outputs (``calibrepo/``, ``demo/``, ...)."""
    root = checkout_root()
    if root is None:
        return
    target = Path(os.path.abspath(path))
    if target != root and root not in target.parents:
        return
    for folder in _ignored_folders(root):
        if target == folder or folder in target.parents:
            return
    fail(f"{option} {path} is {target}, inside calibflow's source checkout {root}: give a folder outside it "
         f"(or under {root / 'demo'})")


# ------------------------------------------------------------------------------------------------
# Prefect's log on the console
# ------------------------------------------------------------------------------------------------


class _BelowWarning:
    """A console-handler filter: Prefect's INFO records (flow and task runs, the embedded server)
    are dropped; warnings and errors pass. The API log handler is left alone, so the UI keeps every
    line of a run."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("prefect")


def quiet_prefect(verbose: bool) -> None:
    """Prefect's INFO log off the console unless ``verbose`` (``-v``); its warnings and errors stay."""
    for name in ("prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "APILogHandler":
                continue
            for f in [f for f in handler.filters if isinstance(f, _BelowWarning)]:
                handler.removeFilter(f)
            if not verbose:
                handler.addFilter(_BelowWarning())
