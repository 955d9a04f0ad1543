"""The ``calibflow`` command line: the outermost layer (docs/architecture.md#layers).

The repository folder comes from ``--repo`` or ``CALIBFLOW_REPO`` (default ``./calibrepo``); the
registry is a SQLite file inside it unless ``--registry-url`` / ``CALIBFLOW_REGISTRY_URL`` names
another SQLAlchemy URL (``postgresql://user@host/db``).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, lifeline, ops
from .common import (HelpGroup, RepoOpt, UrlOpt, VerboseOpt, check_calib_type, check_detectors, check_obs_type, console,
                     err)
from .common import esc as _esc
from .common import fail as _fail
from .common import load_camera_or_fail as _load_camera
from .common import open_repo as _open_repo
from .common import prefect_env as _prefect_env
from .common import start_embedded_api
from .common import print_json, quiet_prefect, refuse_inside_checkout

if TYPE_CHECKING:
    from calib_core.records import CalibProduct

app = typer.Typer(help="Calibration frames (bias, dark, flat, fringe, sky) for mosaic CCD cameras.",
                  no_args_is_help=True, add_completion=False, cls=HelpGroup)
cameras_app = typer.Typer(help="List the cameras calibflow knows, or show one.", invoke_without_command=True)
app.add_typer(cameras_app, name="cameras")




def _resolve_camera(registry, spec: Optional[str], night=None, exposure_ids=None):
    """``--camera NAME|FILE`` as the registry holds it (see ``Registry.resolve_camera``)."""
    from calib_core.camera import CameraError
    from calib_core.repository import RegistryError

    try:
        return registry.resolve_camera(spec, night=night, exposure_ids=exposure_ids)
    except (CameraError, RegistryError) as exc:
        _fail(str(exc))


def _camera_for_ingest(registry, spec: str):
    """A YAML file as given; a name: the registry's definition if it holds one, else a built-in camera."""
    from calib_core.camera import is_camera_file, list_cameras

    if not is_camera_file(spec):
        stored = registry.stored_camera(spec)
        if stored is not None:
            return stored
        if spec not in list_cameras():
            names = registry.camera_names()
            _fail(f"unknown camera {spec!r}: not a YAML file, a built-in camera ({', '.join(list_cameras())}) "
                  f"nor a camera in the registry ({', '.join(names) or 'none'})")
    return _load_camera(spec)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"calibflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")):
    # eager: handled while the options are parsed, before typer asks for a command (without it
    # `calibflow --version` only said "Missing command", and the image's build step failed)
    from tasks.allocator import tune_allocator

    tune_allocator()        # every command: the simulator, ingest and the builds allocate large arrays


@app.command()
def init(repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Create the repository folder and create or migrate the registry schema."""
    store, registry = _open_repo(repo, registry_url, create=True)
    store.ensure()
    try:
        registry.upgrade()
    except Exception as exc:  # connection refused, permissions, ...
        from calib_core.repository import mask_url

        _fail(f"cannot initialise registry {registry.url}: {mask_url(str(exc).splitlines()[0])}")
    console.print(f"repository [bold]{store.root}[/] ready; registry {registry.url} at schema "
                  f"{registry.current_revision()}")


@app.command()
def ingest(paths: Optional[list[Path]] = typer.Argument(None, help="raw files or folders (searched recursively); "
                                                              "with --update: default every exposure of the camera"),
           camera: str = typer.Option(..., "--camera", help="camera YAML file, or a name (the registry's "
                                                            "definition, else a built-in camera)"),
           transfer: str = typer.Option("copy", "--transfer", help="copy | symlink | hardlink | move | direct"),
           update: bool = typer.Option(False, "--update", help="re-read the headers of ingested exposures with "
                                       "this (corrected) camera definition and store it; raws and products "
                                       "are not touched"),
           repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Register raw files (checksummed, never modified; the same file twice is a no-op)."""
    from calib_core.repository import TRANSFER_MODES, RegistryError, find_raw_files, ingest_files

    if transfer not in TRANSFER_MODES:
        _fail(f"--transfer must be one of {', '.join(TRANSFER_MODES)}, not {transfer!r}")
    from calib_core.camera import is_camera_file, list_cameras
    from calib_core.repository import DEFAULT_REPO, Datastore

    given = _load_camera(camera) if is_camera_file(camera) or camera in list_cameras() else None
    if given is None and not registry_url and not Datastore(repo or DEFAULT_REPO).root.exists():
        _load_camera(camera)      # neither a file, a built-in camera nor (no repository) a registered one
    store, registry = _open_repo(repo, registry_url)
    if update:
        _ingest_update(registry, given or _load_camera(camera), paths)
        return
    if not paths:
        _fail("give the raw files or folders to ingest (or --update to re-read ingested ones)")
    cam = _camera_for_ingest(registry, camera)
    files = find_raw_files(paths)
    if not files:
        _fail(f"no FITS files found in {', '.join(map(str, paths))}")
    try:
        registry.check_camera(cam)
    except RegistryError as exc:
        _fail(str(exc).replace("--camera FILE", f"--camera {camera}"))
    with _progress() as progress:
        task = progress.add_task("ingest", total=len(files))
        report = ingest_files(files, cam, registry, store, transfer=transfer,
                              progress=lambda p, outcome: progress.advance(task))
    console.print(f"ingested {len(report.ingested)}, already present {len(report.skipped)}, "
                  f"failed {len(report.failed)}")
    for path, why in report.failed:
        err.print(f"[red]failed[/] {escape(f'{path}: {why}')}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


def _ingest_update(registry, cam, paths) -> None:
    from rich.markup import escape

    from calib_core.repository import update_exposures

    report = update_exposures(cam, registry, paths or None)
    for path, why in report.failed:
        err.print(f"[red]failed[/] {escape(path or cam.name)}: {escape(why)}", highlight=False)
    if report.failed:
        _fail(f"nothing updated: {len(report.failed)} problem(s) with camera {cam.name}'s new definition")
    for expid, diff in report.changed.items():
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        console.print(f"{expid}: {changes}", highlight=False)
    console.print(f"camera {cam.name}: definition {'updated' if report.camera_changed else 'unchanged'}; "
                  f"{len(report.changed)} exposure(s) changed, {len(report.unchanged)} unchanged", highlight=False)


@app.command()
def exposures(as_json: bool = typer.Option(False, "--json", help="print JSON (null where a value is missing)"),
              obs_type: Optional[str] = typer.Option(None, "--type", help="bias, dark, flat, science, ... "
                                                     "[default: every type]"),
              filter: Optional[str] = typer.Option(None, "--filter", help="[default: every filter]"),
              night: Optional[str] = typer.Option(None, "--night", help="YYYY-MM-DD [default: every night]"),
              camera: Optional[str] = typer.Option(None, "--camera", help="a camera in the registry, by name or "
                                                   "YAML file [default: every camera]"),
              repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """List registered exposures."""
    import datetime as dt

    if night:
        try:
            dt.date.fromisoformat(night)
        except ValueError:
            _fail(f"--night must be YYYY-MM-DD, not {night!r}")
    check_obs_type(obs_type)
    _, registry = _open_repo(repo, registry_url)
    if camera:
        camera = _resolve_camera(registry, camera).name
    rows = registry.query_exposures(camera=camera, obs_type=obs_type, filter=filter, night=night)
    if as_json:
        print_json([r.model_dump(mode="json", exclude={"path"}) for r in rows])
        return
    table = Table(title=f"{len(rows)} exposures")
    for col in ("exposure_id", "camera", "obs_type", "filter", "exptime", "date_obs", "night", "n_det", "object"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.exposure_id, r.camera, r.obs_type, r.filter, f"{r.exptime:g}",
                      r.date_obs[:19], r.night, str(r.n_detectors), r.object)
    console.print(table)


def _check_date(text: Optional[str], option: str) -> None:
    import datetime as dt

    if text is None:
        return
    try:
        dt.date.fromisoformat(text)
    except ValueError as exc:
        _fail(f"{option} must be a date YYYY-MM-DD, not {text!r} ({exc})")


def _parse_when(text: str, what: str):
    import datetime as dt

    try:
        value = dt.datetime.fromisoformat(text) if "T" in text or " " in text else \
            dt.datetime.combine(dt.date.fromisoformat(text), dt.time(0))
    except ValueError:
        _fail(f"{what} must be YYYY-MM-DD or an ISO date-time, not {text!r}")
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


@app.command()
def calibs(as_json: bool = typer.Option(False, "--json", help="print JSON (null where a value is missing)"),
           calib_type: Optional[str] = typer.Option(None, "--type", help="bias, dark, defects, ptc, flat, fringe, sky "
                                                    "[default: every type]"),
           camera: Optional[str] = typer.Option(None, "--camera", help="a camera in the registry, by name or "
                                                "YAML file [default: every camera]"),
           detector: Optional[int] = typer.Option(None, "--detector", help="[default: every detector]"),
           status: Optional[str] = typer.Option(None, "--status", help="candidate, certified or decertified "
                                                "[default: every status]"),
           repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """List products (calibs) in the registry: status, verification, and the certified products
    whose validity overlaps (lookup then takes the nearest calib date, see `lookup --explain`)."""
    from calib_core.quality.verify import summarise_checks
    from calib_core.repository import STATUSES, list_calibs, overlapping

    check_calib_type(calib_type)
    if status is not None and status not in STATUSES:
        _fail(f"--status must be one of {', '.join(STATUSES)}, not {status!r}")
    _, registry = _open_repo(repo, registry_url)
    cam = _resolve_camera(registry, camera) if camera else None
    camera = cam.name if cam else None
    check_detectors([cam] if cam else [registry.stored_camera(n) for n in registry.camera_names()], detector)
    every = list_calibs(registry, calib_type=calib_type, camera=camera, detector=detector)
    overlaps = overlapping(every)
    shown = [r for r in every if status is None or r.status == status]
    if as_json:
        print_json([{**r.model_dump(mode="json"), "overlaps": overlaps.get(r.calib_id, []),
                     "verified": summarise_checks(r.verification)} for r in shown])
        return
    table = Table(title=f"{len(shown)} calibs")
    for col in ("calib_id", "type", "filter", "det", "calib_date", "valid_begin", "valid_end", "n_inputs", "status",
                "verification", "overlaps"):
        table.add_column(col)
    for r in shown:
        table.add_row(r.calib_id, r.type, r.filter, str(r.detector), r.calib_date,
                      (r.valid_begin or "")[:16], (r.valid_end or "open")[:16], str(r.n_inputs),
                      r.status + (f" ({r.status_note})" if r.status_note else ""),
                      _esc(summarise_checks(r.verification)), ", ".join(overlaps.get(r.calib_id, [])) or "-")
    console.print(table)


@app.command()
def certify(calib_id: str = typer.Argument(..., help="a calib_id from `calibflow calibs`"),
            begin: Optional[str] = typer.Option(None, "--begin", help="YYYY-MM-DD[THH:MM:SS], UTC [default: the "
                                                "recorded validity]"),
            end: Optional[str] = typer.Option(None, "--end", help="exclusive [default: open-ended with --begin, "
                                              "else the recorded end]"),
            force: bool = typer.Option(False, "--force", help="certify a product that failed verification or was "
                                       "decertified (the failed checks stay recorded)"),
            note: str = typer.Option("", "--note", help="why (recorded with the status)"),
            repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Certify a product (lookup may then return it) and set its validity range."""
    from calib_core.repository import RegistryError
    from calib_core.repository import certify as do_certify

    store, registry = _open_repo(repo, registry_url)
    try:
        row = do_certify(registry, calib_id, _parse_when(begin, "--begin") if begin else None,
                         _parse_when(end, "--end") if end else None, force=force, note=note)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"{row.calib_id} certified, valid {row.valid_begin} .. {row.valid_end or 'open'}"
                  + (f" ({_esc(row.status_note)})" if row.status_note else ""), highlight=False,
                  soft_wrap=True)
    _rewrite_reports(store, registry, row)


def _rewrite_reports(store, registry, row: CalibProduct) -> None:
    """The night reports listing a product a person just certified or withdrew, rewritten to show it."""
    from calib_core.quality.report import rewrite_reports_of

    for page in rewrite_reports_of(registry, store.root, registry.stored_camera(row.camera), row.calib_id):
        console.print(f"night report updated: {page}", highlight=False, soft_wrap=True)


@app.command()
def decertify(calib_id: str = typer.Argument(..., help="a calib_id from `calibflow calibs`"),
              reason: str = typer.Option(..., "--reason", help="why it is withdrawn (recorded and shown)"),
              repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Withdraw a certified product: lookup no longer returns it (the file and record stay)."""
    from calib_core.repository import RegistryError
    from calib_core.repository import decertify as do_decertify

    if not reason.strip():
        _fail("--reason must say why the product is withdrawn")
    store, registry = _open_repo(repo, registry_url)
    try:
        row = do_decertify(registry, calib_id, reason.strip())
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"{row.calib_id} decertified: {_esc(row.status_note)}", highlight=False, soft_wrap=True)
    _rewrite_reports(store, registry, row)


@app.command()
def prune(delete: bool = typer.Option(False, "--delete", help="remove the files the policy frees [default: only "
                                      "report them]"),
          older_than: Optional[float] = typer.Option(
              None, "--older-than", min=0, help="also free the intermediates of failed or killed builds untouched "
                                                "for this many days [default: keep them, their rerun resumes from them]"),
          as_json: bool = typer.Option(False, "--json", help="print JSON"),
          repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Report the intermediates under <repo>/work and what the policy frees; --delete frees it.

    Freed: intermediates whose exposures are inputs of registered products of their type, derived
    sky frames and temporaries of dead writers; with --older-than, those of failed or killed builds
    too. Never: any of a type with a running build (docs/architecture.md#intermediates-and-disk)."""
    from calib_core.repository import PRUNE_CLASSES, mark_crashed_runs, remove_files, running_types, survey

    store, registry = _open_repo(repo, registry_url)
    mark_crashed_runs(registry)
    files = survey(store.root, registry)
    chosen = [f for f in files if f.removable(older_than)]
    freed = (0, 0)
    if delete and chosen:
        busy = running_types(registry)        # a build may have started since the survey
        chosen = [f for f in chosen if f.calib_type not in busy]
        freed = remove_files(f.path for f in chosen)
    groups: dict[tuple, dict] = {}
    for f in files:
        g = groups.setdefault((f.camera, f.calib_type, f.state), {
            "camera": f.camera, "calib_type": f.calib_type, "state": f.state, "why": PRUNE_CLASSES[f.state],
            "files": 0, "bytes": 0, "frees_files": 0, "frees_bytes": 0})
        g["files"] += 1
        g["bytes"] += f.size
    for f in chosen:
        g = groups[(f.camera, f.calib_type, f.state)]
        g["frees_files"] += 1
        g["frees_bytes"] += f.size
    rows = list(groups.values())
    total = sum(f.size for f in files)
    freeable = sum(f.size for f in chosen)
    # frees: what the policy allows; freed: what --delete removed (0 without it)
    summary = {"repo": str(store.root), "deleted": bool(delete), "files": len(files), "bytes": total,
               "frees_files": len(chosen), "frees_bytes": freeable, "freed_files": freed[0], "freed_bytes": freed[1],
               "groups": rows}
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"intermediates in {store.root / 'work'}: {len(files)} files, {total / 1e9:.2f} GB")
    for col in ("camera", "type", "state", "files", "GB", "freed" if delete else "frees", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["camera"], r["calib_type"], r["state"], str(r["files"]), f"{r['bytes'] / 1e9:.3f}",
                      f"{r['frees_bytes'] / 1e9:.3f} GB", r["why"])
    console.print(table)
    if delete:
        console.print(f"freed {freed[1] / 1e9:.3f} GB ({freed[0]} files)", highlight=False)
    else:
        console.print(f"would free {freeable / 1e9:.3f} GB ({len(chosen)} files); nothing deleted: pass --delete",
                      highlight=False)


@app.command()
def lookup(exposure: str = typer.Option(..., "--exposure", help="exposure id"),
           calib_type: str = typer.Option(..., "--type", help="bias, dark, defects, ptc, flat, fringe, sky"),
           detector: Optional[int] = typer.Option(None, "--detector", help="[default: every detector]"),
           camera: Optional[str] = typer.Option(None, "--camera", help="needed only if several cameras have "
                                                "this exposure id [default: the exposure's camera]"),
           explain: bool = typer.Option(False, "--explain", help="list every product of the type and why it was "
                                        "or was not chosen"),
           as_json: bool = typer.Option(False, "--json", help="print JSON (null where a value is missing)"),
           repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Which certified calib applies to an exposure (per detector), by the rules of
    docs/architecture.md#lookup-rules; --explain says why for every candidate."""
    from calib_core.repository import RegistryError, explain_lookup
    from calib_core.science import readout_keys

    check_calib_type(calib_type)
    _, registry = _open_repo(repo, registry_url)
    cams = sorted({r.camera for r in registry.query_exposures(exposure_ids=[exposure])})
    if camera is not None:
        camera = _resolve_camera(registry, camera).name
    else:
        if not cams:
            _fail(f"no exposure {exposure!r} in the registry")
        if len(cams) > 1:
            _fail(f"exposure {exposure!r} exists for cameras {', '.join(cams)}: pass --camera")
        camera = cams[0]
    cam = registry.stored_camera(camera)
    check_detectors([cam], detector)
    try:
        every = explain_lookup(registry, camera=camera, exposure_id=exposure, calib_type=calib_type,
                               detector=detector, readout_keys=readout_keys(cam))
    except RegistryError as exc:
        _fail(str(exc))
    rows = [r["_row"] for r in every if r["chosen"]]      # the products chosen (CalibProduct)
    if explain:
        listing = [{k: v for k, v in r.items() if not k.startswith("_")} for r in every]
        if as_json:
            print_json(listing)
        else:
            console.print(f"{calib_type} for exposure {exposure}: rules: detector, filter, readout settings, "
                          "certified, validity contains the exposure; then the nearest calib date, then the "
                          "last certified", highlight=False)
            for r in listing:
                mark = "chosen " if r["chosen"] else ("eligible" if r["eligible"] else "no     ")
                console.print(_esc(f"detector {r['detector']}: {mark} {r['calib_id']} [{r['status']}]: "
                                   + "; ".join(r["reasons"])), highlight=False)
    elif as_json:
        print_json([r.model_dump(mode="json") for r in rows])
    else:
        for r in rows:
            console.print(f"detector {r.detector}: {r.calib_id}  {r.path}")
    if not rows:
        err.print(f"no certified {calib_type} applies to exposure {exposure}")
        raise typer.Exit(1)


REGISTRY_ENV = "CALIBFLOW_REGISTRY_URL"


class _NoTraceback:
    """A logging filter: Prefect's run loggers print a failed run's exception without its traceback
    (the one-line ``error:`` follows; the traceback stays in the run's logs on the Prefect API)."""

    def filter(self, record) -> bool:
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")) and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_tracebacks() -> None:
    import logging

    for name in ("prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ != "APILogHandler" and not any(isinstance(f, _NoTraceback)
                                                                     for f in handler.filters):
                handler.addFilter(_NoTraceback())


@contextmanager
def _registry_by_reference(url: Optional[str]):
    """The registry URL as flows get it: by reference (``env:CALIBFLOW_REGISTRY_URL``), so a
    password never lands in flow-run parameters, Prefect's database or its UI."""
    import os

    if not url or url.startswith("env:"):
        yield url
        return
    old = os.environ.get(REGISTRY_ENV)
    os.environ[REGISTRY_ENV] = url
    try:
        yield f"env:{REGISTRY_ENV}"
    finally:
        if old is None:
            os.environ.pop(REGISTRY_ENV, None)
        else:
            os.environ[REGISTRY_ENV] = old


def _apply_sets(config: dict, sets: list[str]) -> dict:
    import yaml

    for item in sets or []:
        if "=" not in item:
            _fail(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = config
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                _fail(f"--set {item}: {'.'.join(parts[:i + 1])} is already set to {node!r}, not a group of "
                      "settings")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            _fail(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]})")
    return config


@app.command()
def build(calib_type: str = typer.Argument(..., help="bias, dark, defects, ptc, flat, fringe or sky"),
          camera: Optional[str] = typer.Option(None, "--camera", help="a camera in the registry by name, or its YAML file [default: the only camera the registry (or the selection) has]"),
          night: Optional[str] = typer.Option(None, "--night", help="YYYY-MM-DD [default: every night]"),
          exposure: Optional[list[str]] = typer.Option(None, "--exposure", help="explicit exposure ids (repeat) "
                                                       "[default: every exposure of the night]"),
          filter: Optional[str] = typer.Option(None, "--filter", help="[default: the inputs' only filter]"),
          detector: Optional[list[int]] = typer.Option(None, "--detector", help="detectors (repeat) "
                                                       "[default: every detector]"),
          config_file: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON config of the calib type "
                                                     "[default: the type's defaults, then the camera's]"),
          sets: Optional[list[str]] = typer.Option(None, "--set", help="override: key=value, dotted keys"),
          drop_incomplete: bool = typer.Option(False, "--drop-incomplete",
                                               help="drop exposures that lack detectors (recorded)"),
          on_bad_input: str = typer.Option("fail", "--on-bad-input",
                                           help="fail | exclude: what an unreadable raw does to the build"),
          calib_date: Optional[str] = typer.Option(None, "--calib-date", help="the products' date YYYY-MM-DD "
                                                   "[default: the inputs' mean date]"),
          validity_days_before: float = typer.Option(15.0, "--validity-days-before", min=0,
                                                     help="the product is valid from its calib date minus this"),
          validity_days_after: float = typer.Option(15.0, "--validity-days-after", min=0,
                                                    help="... until its calib date plus this"),
          runner: str = typer.Option("threads", "--runner", help="threads | processes | dask"),
          dask_address: Optional[str] = typer.Option(None, "--dask-address", help="tcp://host:8786 of a running "
                                                     "scheduler [default: a local cluster]"),
          dask_workers: Optional[int] = typer.Option(
              None, "--dask-workers", min=1,
              help="with --runner dask and no address: worker processes of the local cluster [default: one per core]"),
          detectors_per_task: Optional[int] = typer.Option(
              None, "--detectors-per-task", min=1,
              help="detectors of one exposure per process task [default: automatic, ~4 tasks per worker]"),
          verify: bool = typer.Option(True, "--verify/--no-verify",
                                      help="verify each product before certifying it; --no-verify certifies as built"),
          verbose: bool = VerboseOpt,
          repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Build a calib through the Prefect flow (an embedded Prefect API unless PREFECT_API_URL is set):
    a progress bar per stage, then the products."""
    _prefect_env()
    # every user error is found here, cheapest first, before Prefect is imported or a server started
    from calib_core.buildplan import CALIB_TYPES, BuildRequest, plan_build

    if calib_type not in CALIB_TYPES:
        _fail(f"unknown calib type {calib_type!r}; choose one of {', '.join(CALIB_TYPES)}")
    if runner not in ("threads", "processes", "dask"):
        _fail(f"--runner must be threads, processes or dask, not {runner!r}")
    if on_bad_input not in ("fail", "exclude"):
        _fail(f"--on-bad-input must be fail or exclude, not {on_bad_input!r}")
    _check_date(night, "--night")
    _check_date(calib_date, "--calib-date")
    raw_config = _read_config(config_file, sets)
    store, registry = _open_repo(repo, registry_url)
    cam = _resolve_camera(registry, camera, night=night, exposure_ids=exposure or None)
    camera = cam.name
    check_detectors([cam], detector)
    try:
        plan_build(registry, calib_type, camera, night=night, exposure_ids=exposure or None, filter=filter,
                   detectors=detector or None, drop_incomplete=drop_incomplete, calib_date=calib_date)
    except ValueError as exc:
        _fail(str(exc))
    config = _load_config(calib_type, raw_config=raw_config)
    lifeline.start()      # the embedded server and pool workers end with this process, even on SIGKILL
    api_ready = start_embedded_api()      # starts while the flows are imported
    from flows.build import build_calib

    _quiet_tracebacks()
    quiet_prefect(verbose)
    api_ready()
    try:
        with _registry_by_reference(registry_url) as url_ref, _stage_bars(per_build=False):
            request = BuildRequest(calib_type=calib_type, camera=camera, night=night, exposures=exposure or None,
                                   filter=filter, detectors=detector or None, repo=str(store.root),
                                   registry_url=url_ref, config=config, drop_incomplete=drop_incomplete,
                                   calib_date=calib_date, validity_days_before=validity_days_before,
                                   validity_days_after=validity_days_after, on_bad_input=on_bad_input,
                                   runner=runner, dask_address=dask_address, dask_workers=dask_workers,
                                   detectors_per_task=detectors_per_task,
                                   verify=None if verify else {"enabled": False})
            result = build_calib(**request.model_dump())
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    _print_build(result)


def _read_config(config_file: Optional[Path], sets: Optional[list[str]]) -> dict:
    """The --config file with the --set overrides applied (not yet validated)."""
    import yaml

    config = {}
    if config_file:
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            _fail(f"--config {config_file}: {str(exc).splitlines()[0]}")
        if not isinstance(config, dict):
            _fail(f"--config {config_file}: expected a mapping of settings, not {type(config).__name__}")
    return _apply_sets(config, sets or [])


def _config_models() -> dict:
    """The config model of each calib type, from calib_core (no Prefect import: validation stays fast)."""
    from calib_core.builds.calibtypes import CALIB_TYPES

    return {name: spec.config_model for name, spec in CALIB_TYPES.items()}


def _load_config(calib_type: str, config_file: Optional[Path] = None, sets: Optional[list[str]] = None,
                 raw_config: Optional[dict] = None) -> dict:
    from pydantic import ValidationError

    CONFIG_MODELS = _config_models()
    if calib_type not in CONFIG_MODELS:
        _fail(f"unknown calib type {calib_type!r}; choose one of {', '.join(CONFIG_MODELS)}")
    config = raw_config if raw_config is not None else _read_config(config_file, sets)
    from calib_core.camera import effective_config
    from calib_core.configmodel import upgrade_keys

    # keys renamed by the naming rule (docs/architecture.md#config-naming) still work for a release:
    # say so once here, and hand the flow (and its run parameters) the new names only
    config, renamed = upgrade_keys(CONFIG_MODELS[calib_type], config)
    for old_key, new_key in renamed:
        err.print(f"[yellow]warning:[/] config key {escape(old_key)} is renamed {escape(new_key)}; the old name "
                  f"is accepted until the next release", highlight=False, soft_wrap=True)
    try:
        effective_config(CONFIG_MODELS[calib_type], None, config)
    except ValidationError as exc:
        _fail(f"invalid {calib_type} config: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()))
    return config


def _print_build(result: dict) -> None:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    table = Table(title=f"{result['calib_type']} {result['filter']} {result['calib_date']}: "
                        f"{result['created']} new, {len(result['products']) - result['created']} already built")
    for col in ("detector", "calib_id", "level", "noise", "inputs", "status"):
        table.add_column(col)
    for p in result["products"]:
        table.add_row(str(p.detector), p.calib_id, num(p.stats.get("level"), ".4g"),
                      num(p.stats.get("noise"), ".3g"), str(p.n_inputs), p.status)
    console.print(table)
    for p in result["products"]:
        failed = (p.verification or {}).get("failed")
        if p.status != "certified" and failed:
            console.print(f"held back {p.calib_id}: {'; '.join(failed)}", highlight=False)
    if result.get("dropped"):
        for e, why in result["dropped"].items():
            console.print(f"excluded {e}: {why}", highlight=False)
    console.print(f"mosaic: {result['mosaic_png']}")


@app.command()
def nightly(night: Optional[str] = typer.Option(None, "--night", help="YYYY-MM-DD [default: last night at the site]"),
            camera: Optional[str] = typer.Option(None, "--camera", help="a camera in the registry by name, or its YAML file [default: the only camera the registry (or the selection) has]"),
            types: Optional[str] = typer.Option(None, "--types", help="comma-separated subset of "
                                                "bias,dark,flat,fringe,sky [default: every type]"),
            allow_empty: bool = typer.Option(False, "--allow-empty", help="a night without exposures is not an "
                                             "error (cameras that do not observe every night)"),
            runner: str = typer.Option("threads", "--runner", help="threads | processes | dask"),
            dask_address: Optional[str] = typer.Option(None, "--dask-address", help="tcp://host:8786 of a running "
                                                       "scheduler [default: a local cluster]"),
            dask_workers: Optional[int] = typer.Option(
                None, "--dask-workers", min=1,
                help="with --runner dask and no address: worker processes of each build's local cluster "
                     "[default: one per core]"),
            verbose: bool = VerboseOpt,
            repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Build, in dependency order, every calib a night's ingested exposures allow, and report it
    (a progress bar per build)."""
    from pydantic import ValidationError

    _prefect_env()
    for name in (types or "").split(","):
        check_calib_type(name.strip() or None, "--types")
    if runner not in ("threads", "processes", "dask"):
        _fail(f"--runner must be threads, processes or dask, not {runner!r}")
    _check_date(night, "--night")
    store, registry = _open_repo(repo, registry_url)
    camera = _resolve_camera(registry, camera, night=night).name
    if night and not registry.query_exposures(camera=camera, night=night) and not allow_empty:
        _fail(f"night {night}: no exposures of camera {camera} in the registry (see `calibflow exposures`); "
              "nothing to build")
    lifeline.start()      # the embedded server and pool workers end with this process, even on SIGKILL
    api_ready = start_embedded_api()      # starts while the flows are imported and the night planned
    from flows.nightly import NightlyPolicy, default_night
    from flows.nightly import nightly as nightly_flow
    from flows.nightly import plan_night

    try:
        policy = NightlyPolicy(allow_empty=allow_empty,
                               **({"types": [t.strip() for t in types.split(",") if t.strip()]} if types else {}))
    except ValidationError as exc:
        _fail("invalid --types: " + "; ".join(e["msg"] for e in exc.errors()))
    if not plan_night(registry, camera, night or default_night(registry.stored_camera(camera)), policy) \
            and not allow_empty:
        _fail(f"night {night or default_night(registry.stored_camera(camera))}: no exposures of camera {camera} "
              "in the registry (see `calibflow exposures`); nothing to build")
    _quiet_tracebacks()
    quiet_prefect(verbose)
    api_ready()
    try:
        with _registry_by_reference(registry_url) as url_ref, _stage_bars(per_build=True):
            summary = nightly_flow(night=night, camera=camera, repo=str(store.root), registry_url=url_ref,
                                   policy=policy, runner=runner, dask_address=dask_address,
                                   dask_workers=dask_workers)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    _print_night(summary)


def _print_night(summary: dict) -> None:
    table = Table(title=f"night {summary['night']} of {summary['camera']}: {summary['created']} new products"
                        + (f" ({summary['state']})" if summary.get("state") else ""))
    for col in ("type", "filter", "inputs", "action", "new", "certified", "note"):
        table.add_column(col)
    for st in summary["steps"]:
        note = st.get("reason") or (f"valid {st['valid'][0][:10]} .. {(st['valid'][1] or 'open')[:10]}"
                                    if st.get("valid") else "")
        if st.get("dropped"):
            note += f"; excluded {len(st['dropped'])}"
        if st.get("held"):
            note += f"; held back {len(st['held'])}"
        table.add_row(st["type"], st["filter"] or "-", str(st["n_inputs"]), st["action"],
                      str(st.get("created", 0)), "-" if "certified" not in st else str(st["certified"]), note)
    console.print(table)
    for st in summary["steps"]:       # every exclusion and every held-back product, with its reason
        label = st["type"] + (f" {st['filter']}" if st.get("filter") else "")
        for e, why in (st.get("dropped") or {}).items():
            console.print(f"{label}: excluded {e}: {_esc(why)}", highlight=False)
        for h in st.get("held") or []:
            console.print(f"{label}: held back {h['calib_id']} ({h['status']}): "
                          + _esc("; ".join(h["failed"]) or "not verified"), highlight=False)
    if summary.get("report"):
        console.print(f"night report: {summary['report']}", highlight=False)


@app.command()
def report(night: Optional[str] = typer.Option(None, "--night", help="YYYY-MM-DD [default: the index of nights]"),
           camera: Optional[str] = typer.Option(None, "--camera", help="a camera in the registry [default: the "
                                                "only camera the registry has]"),
           serve: bool = typer.Option(False, "--serve", help="serve the repository's reports on 127.0.0.1 until "
                                      "Ctrl-C instead of printing the path"),
           port: int = typer.Option(0, "--port", min=0, max=65535, help="with --serve [default: a free port]"),
           repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """The night report the nightly flow wrote (its path, or served locally)."""
    from calib_core.quality.report import report_dir

    _check_date(night, "--night")
    store, registry = _open_repo(repo, registry_url)
    cam = _resolve_camera(registry, camera)
    folder = report_dir(store.root, cam.name)
    page = folder / night / "index.html" if night else folder / "index.html"
    if not page.exists():
        have = sorted(p.parent.name for p in folder.glob("*/index.html"))
        _fail(f"no report {page}" + (f"; nights with a report: {', '.join(have)}" if have else
                                     f"; run `calibflow nightly{' --night ' + night if night else ''}` first"))
    if not serve:
        console.print(str(page), highlight=False, soft_wrap=True)
        return
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(store.root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{page.relative_to(store.root).as_posix()}"
        console.print(f"serving {url} (Ctrl-C stops)", highlight=False, soft_wrap=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


@app.command()
def trend(calib_type: str = typer.Option(..., "--type", help="bias, dark, flat, fringe, sky"),
          metric: str = typer.Option(..., "--metric", help="read_noise, bias_level, dark_current, flat_level, noise, "
                                     "overscan_noise, structure_ratio (sky), ... (see "
                                     "docs/algorithms.md#verification-metrics)"),
          detector: Optional[int] = typer.Option(None, "--detector", help="[default: every detector]"),
          filter: Optional[str] = typer.Option(None, "--filter", help="[default: every filter]"),
          camera: Optional[str] = typer.Option(None, "--camera", help="[default: the only camera the registry has]"),
          out: Optional[Path] = typer.Option(None, "--out", help="PNG to write [default: "
                                             "<repo>/reports/<camera>/trend-<type>-<metric>[-det<D>].png]"),
          as_json: bool = typer.Option(False, "--json", help="print the points and limits as JSON as well"),
          repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """A metric of every verified product against date, with the verification limits marked (PNG and JSON)."""
    from calib_core.quality.report import TREND_METRICS, report_dir
    from calib_core.quality.report import trend as get_trend
    from calib_core.quality.report import write_trend

    check_calib_type(calib_type)
    store, registry = _open_repo(repo, registry_url)
    cam = _resolve_camera(registry, camera)
    check_detectors([cam], detector)
    data = get_trend(registry, cam.name, calib_type, metric, detector=detector, filter=filter)
    if not data["points"]:
        from calib_core.repository import calib_metrics

        have = sorted({r["metric"] for r in calib_metrics(registry, camera=cam.name, calib_type=calib_type)})
        _fail(f"no {metric!r} metric for {calib_type} products of {cam.name}"
              + (f"; metrics recorded: {', '.join(have)}" if have else "; no verified products yet")
              + ("" if metric in TREND_METRICS or metric in have else f" (known metrics: {', '.join(TREND_METRICS)})"))
    if out is None:
        out = report_dir(store.root, cam.name) / (f"trend-{calib_type}-{metric}"
                                                  + (f"-det{detector}" if detector is not None else "") + ".png")
    else:
        refuse_inside_checkout(out, "--out")
    write_trend(data, out, out.with_suffix(".json"))
    if as_json:
        print_json(data)
    else:
        console.print(f"{len(data['points'])} points; {out} and {out.with_suffix('.json')}", highlight=False,
                      soft_wrap=True)


@app.command("apply-sky")
def apply_sky(exposure: str = typer.Argument(..., help="a science exposure id (see `calibflow exposures`)"),
              out: Optional[Path] = typer.Option(None, "--out", help="folder for the corrected images, relative "
                                                 "to the current folder [default: <repo>/skysub/<exposure>]"),
              config_file: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON sky config "
                                                         "[default: the sky defaults, then the camera's]"),
              sets: Optional[list[str]] = typer.Option(None, "--set", help="override: key=value, dotted keys"),
              as_json: bool = typer.Option(False, "--json", help="print JSON (null where a value is missing)"),
              camera: Optional[str] = typer.Option(None, "--camera", help="the exposure's camera (name or YAML "
                                                   "file) where several cameras have this exposure id "
                                                   "[default: the exposure's camera]"),
              repo: Optional[Path] = RepoOpt, registry_url: Optional[str] = UrlOpt):
    """Sky-correct one exposure: ISR with the certified calibs, objects masked, then the exposure's
    large-scale surface and the certified sky frame's scale fitted together and both subtracted;
    writes the corrected images and reports the fitted scale."""
    from calib_core.camera import effective_config
    from calib_core.repository import RegistryError
    from calib_core.science import apply_sky as run_apply_sky
    from calib_core.sky.frames import SkyBuildConfig

    if out is not None:
        refuse_inside_checkout(out, "--out")
    store, registry = _open_repo(repo, registry_url)
    overrides = _load_config("sky", config_file, sets)
    cam = _resolve_camera(registry, camera, exposure_ids=[exposure])
    rows = registry.query_exposures(camera=cam.name, exposure_ids=[exposure])
    if not rows:
        _fail(f"no exposure {exposure!r} of camera {cam.name} in the registry (see `calibflow exposures`)")
    row = rows[0]
    if row.obs_type != "science":
        _fail(f"exposure {exposure} is a {row.obs_type} frame, not a science exposure")
    camera = cam
    config = effective_config(SkyBuildConfig, camera, overrides)
    target = out or store.root / "skysub" / exposure
    t0 = time.perf_counter()
    try:
        res = run_apply_sky(registry, camera, row, target, config)
    except (ValueError, RegistryError) as exc:
        _fail(str(exc))
    payload = {"exposure_id": res.exposure_id, "sky_level": res.sky_level, "scale": res.scale, "error": res.error,
               "n_used": res.n_used, "n_total": res.n_total, "sky_calibs": res.sky_calibs,
               "outputs": {d: str(p) for d, p in res.outputs.items()}}
    if as_json:
        print_json(payload)
        return
    console.print(f"{exposure}: sky-frame scale {res.scale:.5g} +- {res.error:.2g} "
                  f"({res.n_used}/{res.n_total} samples; focal-plane sky level {res.sky_level:.5g}, "
                  f"ratio {res.scale / res.sky_level:.4f}) in {time.perf_counter() - t0:.1f} s")
    console.print(f"wrote {len(res.outputs)} sky-subtracted detector images to {target}")


@cameras_app.callback()
def cameras_list(ctx: typer.Context):
    """List the built-in cameras."""
    if ctx.invoked_subcommand is not None:
        return
    from calib_core.camera import list_cameras, load_camera

    table = Table(title="cameras")
    for col in ("name", "detectors", "amplifiers", "layout", "description"):
        table.add_column(col)
    for name in list_cameras():
        cam = load_camera(name)
        table.add_row(name, str(len(cam.detectors)), str(sum(len(d.amplifiers) for d in cam.detectors)),
                      cam.layout, cam.description)
    console.print(table)


@cameras_app.command("show")
def cameras_show(name: str = typer.Argument(..., help="camera name or YAML file"),
                 raws: Optional[list[Path]] = typer.Option(None, "--raw", help="also read these raw files "
                                                           "with it (repeat): sections against the real HDUs, "
                                                           "and the metadata it gives")):
    """Print one camera definition (validated) as YAML; with --raw, check it against raw files."""
    from calib_core.io.raw import RawReadError, read_raw

    cam = _load_camera(name)
    if not raws:
        sys.stdout.write(cam.to_yaml())
        return
    table = Table(title=f"{cam.name} on {len(raws)} raw file(s)")
    for col in ("file", "exposure_id", "type", "exptime", "filter", "date_obs", "night", "detectors (ny x nx)"):
        table.add_column(col)
    problems = []
    for path in raws:
        try:
            raw = read_raw(path, cam)
        except RawReadError as exc:
            problems.append(str(exc))
            continue
        m = raw.metadata
        table.add_row(_esc(Path(path).name), m.exposure_id, m.obs_type, f"{m.exptime:g}", _esc(m.filter),
                      m.date_obs.isoformat()[:19], m.night.isoformat(),
                      ", ".join(f"{d.detector.name} {d.shape[0]}x{d.shape[1]}" for d in raw.detectors.values()))
    console.print(table)
    if problems:
        _fail("\n".join(problems))


@app.command()
def simulate(camera: str = typer.Option("democam", "--camera", help="a built-in camera or a YAML file"),
             out: Path = typer.Option(..., "--out", help="output folder, relative to the current folder"),
             seed: int = typer.Option(0, "--seed"),
             night: str = typer.Option("2026-11-20", "--night", help="YYYY-MM-DD"),
             n_bias: int = typer.Option(5, "--n-bias"), n_dark: int = typer.Option(5, "--n-dark"),
             n_flat: int = typer.Option(5, "--n-flat", help="per filter"),
             n_science: int = typer.Option(12, "--n-science", help="per filter"),
             filters: str = typer.Option("r,z", "--filters", help="comma-separated"),
             compress: Optional[str] = typer.Option(None, "--compress", help="gzip | rice [default: none]"),
             gradient_amplitude: Optional[float] = typer.Option(
                 None, "--gradient-amplitude",
                 help="bound on the large-scale gradient |G-1| (e.g. 0.10) [default: the legacy ranges]"),
             bad_exposures: str = typer.Option(
                 "", "--bad-exposures", help="comma-separated defects (cloud,trail,glow): one science "
                                             "exposure per entry and filter gets it"),
             first_sequence: int = typer.Option(
                 0, "--first-sequence", help="number exposures from this + 1 (held-out nights: same "
                                             "seed, another --night, e.g. 1000)"),
             gain_error: Optional[float] = typer.Option(
                 None, "--gain-error", help="true gains differ from the camera file's by this fraction "
                                            "(x U(0.75, 1.25), either sign; e.g. 0.04) [default: none, the camera "
                                            "file's gains are the true ones]"),
             pixel_defects: bool = typer.Option(False, "--pixel-defects/--no-pixel-defects",
                                                help="also inject cold pixels and hot columns"),
             ptc_exptimes: str = typer.Option("", "--ptc-exptimes", help="comma-separated exposure times of "
                                                                         "extra flat pairs for a PTC [default: none]")):
    """Simulate a night of raw exposures with known truth (raw/ and truth/ under --out)."""
    from calib_core.simulate.night import simulate_night

    refuse_inside_checkout(out, "--out")
    cam = _load_camera(camera)
    bad = tuple(b.strip() for b in bad_exposures.split(",") if b.strip())
    with _progress() as progress:
        task = progress.add_task("simulate", total=None)

        def tick(done, total):
            progress.update(task, completed=done, total=total)

        try:
            result = simulate_night(cam, out, seed=seed, night=night, n_bias=n_bias, n_dark=n_dark,
                                    n_flat=n_flat, n_science=n_science,
                                    filters=tuple(f for f in filters.split(",") if f),
                                    compress=compress, progress=tick, gradient_amplitude=gradient_amplitude,
                                    bad_exposures=bad, first_sequence=first_sequence, gain_error=gain_error,
                                    pixel_defects=pixel_defects,
                                    ptc_exptimes=[float(t) for t in ptc_exptimes.split(",") if t.strip()])
        except ValueError as exc:
            _fail(str(exc))
    console.print(f"wrote {len(result.exposures)} raw files to {Path(out) / 'raw'} and truth to "
                  f"{Path(out) / 'truth'}")


@app.command()
def demo(repo: Path = typer.Option(Path("demo/calibrepo"), "--repo", help="repository to create, relative to "
                                    "the current folder (the simulated raws go beside it)"),
         camera: str = typer.Option("democam", "--camera", help="a built-in camera or a YAML file"),
         seed: int = typer.Option(1, "--seed"),
         night: str = typer.Option("2026-11-20", "--night", help="YYYY-MM-DD"),
         fresh: bool = typer.Option(True, "--fresh/--keep", help="start from an empty repository (an existing "
                                    "one is deleted only with --force or after a yes) or keep it"),
         force: bool = typer.Option(False, "--force", help="with --fresh: delete an existing repository "
                                    "without asking"),
         build: bool = typer.Option(True, "--build/--no-build", help="run the nightly flow after ingest"),
         n_science: int = typer.Option(8, "--n-science", help="science exposures per filter (r, z)"),
         verbose: bool = VerboseOpt):
    """The main job: simulate a night of the demo camera, ingest it, run the nightly flow (bias, dark,
    defects, gains, flats, fringe, sky frames; each verified before it is certified) and print what it
    built."""
    import shutil

    from calib_core.repository import Datastore, Registry, ingest_files
    from calib_core.simulate.night import simulate_night

    t0 = time.perf_counter()
    _check_date(night, "--night")
    refuse_inside_checkout(repo, "--repo")
    cam = _load_camera(camera)
    store = Datastore(repo)
    sim_dir = store.root.parent / f"sim-{camera}-{night}-seed{seed}-n{n_science}"
    if fresh and _may_delete(store.root, force):
        shutil.rmtree(store.root, ignore_errors=True)
    preparing = None
    if build:
        # Prefect's and the flows' imports (~6 s of one core) and the embedded server's start run on a
        # thread beside the simulation and ingest, not before them (the watcher installs signal
        # handlers: this thread)
        _prefect_env()
        lifeline.start()
        preparing = _beside(_prepare_flow, verbose)
    if not sim_dir.exists():
        # simulated into a folder of its own, renamed when complete: a demo stopped half-way does not
        # leave half a night that the next demo would take as simulated
        partial = sim_dir.with_name(sim_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with _progress() as progress:
            task = progress.add_task(f"simulate {camera} night {night}", total=None)
            simulate_night(cam, partial, seed=seed, night=night, n_science=n_science,
                           progress=lambda d, t: progress.update(task, completed=d, total=t))
        partial.rename(sim_dir)
    store.ensure()
    registry = Registry.open(store.default_registry_url)
    registry.upgrade()
    files = sorted((sim_dir / "raw").glob("*.fits*"))
    t_ingest = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("ingest", total=len(files))
        report = ingest_files(files, cam, registry, store, transfer="symlink",
                              progress=lambda p, o: progress.advance(task))
    if report.failed:
        for path, why in report.failed:
            err.print(f"[red]failed[/] {escape(f'{path}: {why}')}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    rows = registry.query_exposures(camera=cam.name, night=night)
    table = Table(title=f"{cam.name}: night {night} in {store.root}")
    for col in ("type", "filter", "exposures", "exptime (s)", "detectors"):
        table.add_column(col)
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r.obs_type, r.filter), []).append(r)
    for (t, f), rs in sorted(groups.items()):
        table.add_row(t, f, str(len(rs)), ",".join(sorted({f"{r.exptime:g}" for r in rs})),
                      str(rs[0].n_detectors))
    console.print(table)
    console.print(f"ingested {len(report.ingested)} exposures ({len(report.skipped)} already present) "
                  f"in {time.perf_counter() - t_ingest:.1f} s ({time.perf_counter() - t0:.1f} s since the start); "
                  f"registry {registry.url}")
    if not build:
        return
    # the nightly flow on the embedded Prefect API: bias -> dark -> flat -> fringe -> sky
    api_ready = preparing()
    from flows.nightly import nightly as nightly_flow

    _quiet_tracebacks()
    t1 = time.perf_counter()
    api_ready()
    try:
        with _stage_bars(per_build=True):
            summary = nightly_flow(night=night, camera=cam.name, repo=str(store.root))
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    _print_night(summary)
    console.print(f"nightly flow: {summary['created']} products in {time.perf_counter() - t1:.0f} s; "
                  f"list them with `calibflow calibs --repo {store.root}`; mosaics (PNG) in {store.root / 'calib'}")


def _prepare_flow(verbose: bool):
    """Import the flows (Prefect's logging is set up on import: quieted after) and start the embedded
    Prefect server; returns the function that waits until the server is up."""
    import flows.nightly  # noqa: F401

    quiet_prefect(verbose)
    return start_embedded_api()


def _beside(fn, *args):
    """Run ``fn(*args)`` on a daemon thread (a command that fails meanwhile does not wait for it);
    returns the function that waits for its result, raising what it raised."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="calibflow-prepare", daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result


def _interactive() -> bool:
    """Whether there is a person to ask (a terminal on stdin)."""
    return sys.stdin.isatty()


def _may_delete(root: Path, force: bool) -> bool:
    """Whether ``demo --fresh`` may delete the repository at ``root``: nothing there (True), --force,
    or a yes to the question; without a terminal to ask on, a one-line refusal naming the folder."""
    try:
        if not any(root.iterdir()):
            return True
    except FileNotFoundError:
        return False            # nothing to delete
    except NotADirectoryError:
        _fail(f"--repo {root} is a file, not a repository folder")
    if force:
        return True
    what = "a calibflow repository" if (root / "registry.sqlite3").exists() else "a folder with files"
    if not _interactive():
        _fail(f"{root} already holds {what}; starting afresh would delete it: pass --force to delete it, "
              "--keep to add to it, or another --repo")
    if not typer.confirm(f"{root} already holds {what}. Delete it and start afresh?", default=False, err=True):
        _fail(f"{root} left as it was (pass --keep to add to it, or another --repo)")
    return True


@contextmanager
def _stage_bars(per_build: bool):
    """Progress bars of the builds the flows run in this process: one per stage (``per_build``
    False: ``bias process``, ``bias combine``), or one per build showing its current stage."""
    from flows.build import progress_listener

    with _progress() as progress:
        bars: dict = {}

        def update(build: str, stage: str, done: int, total: int) -> None:
            key = build if per_build else (build, stage)
            label = f"{build} {stage}"
            if key not in bars:
                bars[key] = progress.add_task(label, total=total)
            progress.update(bars[key], description=label, completed=done, total=total)

        with progress_listener(update):
            yield


def _progress() -> Progress:
    # redrawn twice a second, not rich's default ten: each redraw holds the GIL the builds' threads
    # need (rich's refresh thread held it 4.7 s during the demo at ten a second)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=False, refresh_per_second=2)


def main():  # pragma: no cover
    app()


ops.register(app)      # serve, trigger: the deployments on a Prefect server


if __name__ == "__main__":  # pragma: no cover
    main()
