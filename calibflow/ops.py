"""``calibflow serve``, ``calibflow deploy`` and ``calibflow trigger``: the deployments on a running
Prefect server.

Both need a long-running ``prefect server start`` and ``PREFECT_API_URL`` pointing at it: an
embedded (ephemeral) Prefect API has no scheduler, no UI and does not see runs of other processes
(docs/prefect.md#a-long-running-server).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import typer

from . import common

__all__ = ["register", "parse_params", "check_parameters", "deploy_environment"]

TERMINAL_OK = "COMPLETED"


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        common.fail("PREFECT_API_URL is not set: start a server (`prefect server start`) and "
                     "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (an embedded Prefect API has no "
                     "scheduler, UI or shared runs)")
    return url


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------


# the site's settings, shared by serve and deploy
_CAMERA_OPT = typer.Option(None, "--camera", envvar="CALIBFLOW_CAMERA",
                           help="default camera of the deployments: a name or YAML file [default: the registry's "
                                "only camera, else each run's parameter]")
_CRON_OPT = typer.Option(None, "--nightly-cron", envvar="CALIBFLOW_NIGHTLY_CRON",
                         help="cron of the nightly deployment [default: 09:00 at the site, the morning after "
                              "the night]")
_TIMEZONE_OPT = typer.Option(None, "--timezone", envvar="CALIBFLOW_TIMEZONE",
                             help="IANA time zone the cron is read in [default: UTC, the cron derived from the "
                                  "camera's utc_offset_hours]")


def _site_settings(repo, registry_url, camera, nightly_cron, timezone, *, keep_registry_url: bool):
    """The ``DeploymentSettings`` of serve and deploy: the repository, the camera (:func:`_serve_camera`)
    and the nightly schedule, validated (one-line error). ``keep_registry_url``: the runs get the
    registry URL (serve passes it to its child runs; deploy's runs use the worker's)."""
    from pydantic import ValidationError

    from deployments.definitions import DeploymentSettings

    store, registry = common.open_repo(repo, registry_url)
    cam = _serve_camera(registry, camera)
    try:
        return DeploymentSettings(repo=store.root, registry_url=(registry_url or None) if keep_registry_url else None,
                                  camera=cam.name if cam else None,
                                  utc_offset_hours=cam.utc_offset_hours if cam else None,
                                  nightly_cron=nightly_cron or None, timezone=timezone or None)
    except ValidationError as exc:
        common.fail("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()))


def serve(repo: Optional[Path] = typer.Option(None, "--repo", envvar="CALIBFLOW_REPO",
                                              help="repository folder the runs use [default: ./calibrepo]; "
                                                   "made absolute here"),
          registry_url: Optional[str] = typer.Option(None, "--registry-url", envvar="CALIBFLOW_REGISTRY_URL",
                                                     help="SQLAlchemy URL of the registry [default: SQLite "
                                                          "inside the repository]"),
          camera: Optional[str] = _CAMERA_OPT, nightly_cron: Optional[str] = _CRON_OPT,
          timezone: Optional[str] = _TIMEZONE_OPT,
          limit: Optional[int] = typer.Option(None, "--limit", min=1, help="at most this many runs at once "
                                                                          "[default: no limit]")):
    """Serve every deployment (one per calib type, plus the nightly schedule) from this process."""
    common.prefect_env()
    url = _api_url()
    settings = _site_settings(repo, registry_url, camera, nightly_cron, timezone, keep_registry_url=True)
    from calib_core.repository import mask_url
    from deployments.definitions import make_deployments

    # the flow runs are child processes of this one: they see the same repository whatever their cwd
    os.environ["CALIBFLOW_REPO"] = str(settings.repo)
    if settings.registry_url:
        os.environ["CALIBFLOW_REGISTRY_URL"] = settings.registry_url
    deployments = make_deployments(settings)
    common.console.print(f"serving {len(deployments)} deployments on {url} for repository {settings.repo} "
                      f"(registry {mask_url(settings.registry_url) if settings.registry_url else 'SQLite inside it'}, "
                      f"camera {settings.camera or 'chosen per run'})")
    cron, zone = settings.nightly_schedule()
    for d in deployments:
        when = f"cron {cron!r} in {zone}" if d.schedules else "on demand"
        common.console.print(f"  {d.flow_name}/{d.name}: {when}", highlight=False)
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit, print_starting_message=False)


# ------------------------------------------------------------------------------------------------
# deploy (prefect.yaml, for a process work pool)
# ------------------------------------------------------------------------------------------------

#: the variables prefect.yaml's placeholders read ({{ $NAME }}), which `calibflow deploy` sets
DEPLOY_VARIABLES = ("CALIBFLOW_CAMERA", "CALIBFLOW_NIGHTLY_CRON", "CALIBFLOW_TIMEZONE")


def deploy_environment(settings) -> dict[str, str]:
    """The values of prefect.yaml's placeholders for ``settings`` (a ``DeploymentSettings``): the
    deployments' default camera ("" when each run's registry or selection decides) and the nightly
    schedule, with the defaults of ``calibflow serve``."""
    cron, zone = settings.nightly_schedule()
    return {"CALIBFLOW_CAMERA": settings.camera or "", "CALIBFLOW_NIGHTLY_CRON": cron, "CALIBFLOW_TIMEZONE": zone}


def deploy(camera: Optional[str] = _CAMERA_OPT, nightly_cron: Optional[str] = _CRON_OPT,
           timezone: Optional[str] = _TIMEZONE_OPT,
           prefect_file: Path = typer.Option(Path("prefect.yaml"), "--prefect-file",
                                             help="the deployments to register; the worker runs their flows "
                                                  "from this file's folder"),
           repo: Optional[Path] = typer.Option(None, "--repo", envvar="CALIBFLOW_REPO",
                                               help="repository whose registry knows the camera [default: "
                                                    "./calibrepo]; the runs use the worker's CALIBFLOW_REPO"),
           registry_url: Optional[str] = typer.Option(None, "--registry-url", envvar="CALIBFLOW_REGISTRY_URL",
                                                      help="SQLAlchemy URL of that registry [default: SQLite "
                                                           "inside the repository]")):
    """Register prefect.yaml's deployments (for the work pool it names) with this camera and schedule.

    The same settings, defaults and checks as `calibflow serve`, given to `prefect deploy --all` through
    the placeholders of prefect.yaml; run it again after changing them (nothing is rebuilt).
    """
    import subprocess
    import sys

    common.prefect_env()
    _api_url()
    prefect_file = prefect_file.resolve()
    if not prefect_file.is_file():
        common.fail(f"--prefect-file: no {prefect_file}")
    settings = _site_settings(repo, registry_url, camera, nightly_cron, timezone, keep_registry_url=False)
    values = deploy_environment(settings)
    common.console.print(f"deploying {prefect_file} (camera {values['CALIBFLOW_CAMERA'] or 'chosen per run'}, "
                         f"nightly cron {values['CALIBFLOW_NIGHTLY_CRON']!r} in {values['CALIBFLOW_TIMEZONE']})",
                         highlight=False)
    prefect = Path(sys.executable).parent / "prefect"
    res = subprocess.run([str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all",
                          "--prefect-file", str(prefect_file)], cwd=prefect_file.parent,
                         env={**os.environ, **values}, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        common.fail(f"prefect deploy --all exited with {res.returncode}", code=res.returncode)


def _serve_camera(registry, spec: Optional[str]):
    """The deployments' default camera (by its registry name, so runs work from any folder): the one
    given (a file need not be ingested yet: its runs find it once it is), else the registry's only
    camera, else none (each run names one or its selection decides)."""
    from calib_core.repository import RegistryError

    if spec:
        try:
            return registry.resolve_camera(spec)
        except RegistryError as exc:
            cam = common.load_camera_or_fail(spec)         # a YAML file or a built-in camera
            if registry.stored_camera(cam.name) is None:
                return cam                       # not ingested yet: its runs find it once it is
            common.fail(str(exc))
    names = registry.camera_names()
    return registry.stored_camera(names[0]) if len(names) == 1 else None


# ------------------------------------------------------------------------------------------------
# trigger
# ------------------------------------------------------------------------------------------------


def _string_only(schema: dict, definitions: dict) -> bool:
    """True when a property accepts strings (and null) only, so ``key=123`` means the text "123"."""
    if "$ref" in schema:
        schema = definitions.get(schema["$ref"].rsplit("/", 1)[-1], {})
    options = schema.get("anyOf", [schema])
    types = {o.get("type") for o in options}
    return "string" in types and types <= {"string", "null"}


def parse_params(items: list[str], schema: dict | None = None) -> dict[str, Any]:
    """``key=value`` pairs to a parameter dict: values are JSON where they parse (``3``, ``true``,
    ``["r","z"]``), else text; dotted keys (``config.combine.statistic=MEDIAN``) build nested dicts."""
    props = (schema or {}).get("properties", {})
    definitions = (schema or {}).get("definitions", {})
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {item!r}")
        parts = key.split(".")
        if len(parts) == 1 and key in props and _string_only(props[key], definitions):
            value: Any = raw
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--param {key}: {part!r} was given a value already")
            node = child
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_parameters(params: dict, deployment_parameters: dict, schema: dict | None,
                     entrypoint: str | None = None) -> dict:
    """The parameters a run would get, or ValueError with every problem: unknown names, the
    deployment's JSON schema (what the server enforces) and, where the flow can be imported here,
    the flow's own pydantic validation (what the run would do first)."""
    problems = []
    props = (schema or {}).get("properties", {})
    if props:
        unknown = sorted(set(params) - set(props))
        if unknown:
            problems.append(f"unknown parameter(s) {', '.join(unknown)}; this deployment takes: "
                            f"{', '.join(props)}")
    merged = _deep_merge(deployment_parameters or {}, params)
    if schema and not problems:
        import jsonschema
        from jsonschema.exceptions import best_match

        validator = jsonschema.Draft202012Validator(schema)
        for e in sorted(validator.iter_errors(merged), key=lambda e: [str(p) for p in e.absolute_path]):
            e = best_match([e])  # the failing branch of an anyOf (say a pattern), not "not valid under any"
            where = ".".join(str(p) for p in e.absolute_path) or "(parameters)"
            problems.append(f"{where}: {e.message}")
    if schema and not problems:
        problems += _calendar_problems(merged, schema)
    if entrypoint and not problems:
        from pydantic import ValidationError

        try:
            from prefect.flows import load_flow_from_entrypoint

            flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        except Exception:  # the flow's code is not installed here: the server's check is what we have
            flow = None
        if flow is not None:
            import logging

            from prefect.exceptions import ParameterTypeError

            flows_log = logging.getLogger("prefect.flows")    # it logs the refusal again, as a dict dump
            was_disabled, flows_log.disabled = flows_log.disabled, True
            try:
                flow.validate_parameters(merged)
            except (ParameterTypeError, ValidationError) as exc:
                problems += _pydantic_problems(str(exc))
            except Exception as exc:  # a validator that raised something other than ValueError
                problems.append(f"{type(exc).__name__}: {exc}")
            finally:
                flows_log.disabled = was_disabled
    if problems:
        raise ValueError("\n".join(problems))
    return merged


_DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}"


def _calendar_problems(params: dict, schema: dict) -> list[str]:
    """Dates the schema's pattern accepts and the calendar does not (``night=2026-13-45``): found
    from the schema alone, so a run is refused even where the flow's code is not installed."""
    import datetime as dt

    definitions = schema.get("definitions", {})
    out = []
    for name, prop in schema.get("properties", {}).items():
        value = params.get(name)
        if not isinstance(value, str):
            continue
        if "$ref" in prop:
            prop = definitions.get(prop["$ref"].rsplit("/", 1)[-1], {})
        if not any(str(o.get("pattern", "")).startswith(_DATE_PATTERN) for o in prop.get("anyOf", [prop])):
            continue
        try:
            dt.datetime.fromisoformat(value) if "T" in value else dt.date.fromisoformat(value)
        except ValueError as exc:
            out.append(f"{name}: {value!r} is not a real date ({exc})")
    return out


def _pydantic_problems(text: str) -> list[str]:
    """Prefect's "Flow run received invalid parameters:\n - night: Value error, ..." as one problem a line."""
    lines = [ln.strip().removeprefix("- ") for ln in text.splitlines()]
    lines = [ln.replace(": Value error, ", ": ") for ln in lines if ln and not ln.endswith("invalid parameters:")]
    return lines or [text]


def _find_deployment(client, name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound
    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            pass
        candidates = []
    else:
        candidates = client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[name])))
        if len(candidates) == 1:
            return candidates[0]
    known = sorted(f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments())
    if len(candidates) > 1:
        common.fail(f"deployment name {name!r} is ambiguous: use one of "
                  f"{', '.join(k for k in known if k.endswith('/' + name))}")
    common.fail(f"no deployment {name!r} on this server; deployments: {', '.join(known) or 'none'} "
              "(is `calibflow serve` running?)")


def trigger(deployment: str = typer.Argument(..., help="FLOW/DEPLOYMENT (build-calib/bias) or a unique "
                                                        "deployment name (bias)"),
            params: Optional[list[str]] = typer.Option(None, "--param", "-p",
                                                       help="key=value (repeat); JSON values, dotted keys "
                                                            "for nested config: config.combine.statistic=MEDIAN"),
            watch: bool = typer.Option(False, "--watch", help="follow the run to its end (a progress bar per "
                                       "stage, then the products it built); exit 1 unless it completed"),
            interval: float = typer.Option(2.0, "--interval", min=0.1, help="seconds between polls with --watch"),
            timeout: Optional[float] = typer.Option(None, "--timeout", help="with --watch: give up after this "
                                                    "many seconds (exit 2) [default: wait for the end]")):
    """Start a run of a deployment on the Prefect server (its parameters checked first: a bad one
    creates no run); print its id and link."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.utilities.urls import url_for

    from calib_core.repository import mask_url

    for item in params or []:      # a run's parameters are stored by Prefect and shown in its UI
        key, _, value = item.partition("=")
        if key.strip() == "registry_url" and mask_url(value) != value:
            common.fail("--param registry_url: a URL with a password would be stored with the run and shown "
                      "in the UI; pass it by reference: env:NAME (a variable of the serving process) or "
                      "secret:BLOCK (a Prefect Secret block)")
    common.prefect_env()
    api = _api_url()
    try:
        with get_client(sync_client=True) as client:
            dep = _find_deployment(client, deployment)
            flow_name = client.read_flow(dep.flow_id).name
            full = f"{flow_name}/{dep.name}"
            schema = dep.parameter_openapi_schema or {}
            try:
                given = parse_params(params or [], schema)
                merged = check_parameters(given, dep.parameters, schema, dep.entrypoint)
            except ValueError as exc:      # one line, every problem: nothing was created
                common.fail(f"invalid parameters for {full}: {'; '.join(str(exc).splitlines())}; no run was "
                            "created")
            try:
                run = client.create_flow_run_from_deployment(dep.id, parameters=given)
            except httpx.HTTPStatusError as exc:
                try:
                    detail = exc.response.json().get("detail", exc.response.text)
                except ValueError:
                    detail = exc.response.text
                common.fail(f"the server refused the run of {full}: {detail}")
            link = url_for("flow-run", obj_id=run.id)
            common.console.print(f"flow run {run.name} of {full}: {run.id}", highlight=False)
            common.console.print(f"  {link}", highlight=False)
            common.console.print(f"  parameters: {json.dumps(merged, sort_keys=True)}", highlight=False, soft_wrap=True)
            if not watch:
                return
            _watch(client, run.id, interval, timeout,
                   label=f"{dep.name} {merged['filter']}" if merged.get("filter") else dep.name)
    except httpx.ConnectError as exc:
        common.fail(f"cannot reach the Prefect server at {api}: {exc}")


def _watch(client, run_id, interval: float, timeout: Optional[float], label: str = "") -> None:
    """Follow a flow run: its state changes, a progress bar per stage of each build (from its task
    runs), and at the end the products it built (its table artifacts) or why it failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.monotonic()
    last = None
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=common.err, transient=False, refresh_per_second=2)
    bars: dict = {}
    with progress:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state
            if state is not None and (state.type, state.name) != last:
                last = (state.type, state.name)
                stamp = state.timestamp.astimezone().strftime("%H:%M:%S") if state.timestamp else ""
                common.console.print(f"  {stamp} {state.name}", highlight=False)
            try:
                _update_bars(client, run_id, label, progress, bars)
            except Exception:   # progress is a convenience: a failed poll is not the run's failure
                pass
            if state is not None and state.is_final():
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                progress.stop()
                common.err.print(f"flow run {run.name} is still {state.name if state else 'pending'} after "
                                 f"{timeout:g} s; it goes on, not watching any longer")
                raise typer.Exit(2)
            time.sleep(interval)
    if state.type.value != TERMINAL_OK:
        common.fail(f"flow run {run.name} ended {state.name}: {state.message or ''}".rstrip(": "))
    common.console.print(f"flow run {run.name} completed")
    _print_products(client, run_id)


def _child_runs(client, run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))


def _stage(task_name: str) -> str:
    """A task run's stage as the in-process progress bars name it (flows/build.py)."""
    import re

    hit = re.match(r"sky-pass(\d+)", task_name)
    if hit:
        return f"pass {int(hit.group(1)) + 1}"
    return task_name.split("-", 1)[0]


def _update_bars(client, run_id, label: str, progress, bars: dict) -> None:
    """One bar per (build, stage): task runs completed of those created so far."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = {run_id: label}
    for child in _child_runs(client, run_id):          # the nightly flow's builds are subflows
        p = child.parameters or {}
        build = p.get("calib_type") or child.name
        runs[child.id] = build if p.get("filter") in (None, "", "NONE") else f"{build} {p['filter']}"
    counts: dict[tuple, list[int]] = {}
    offset = 0
    while True:
        page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(runs))),
                                     limit=200, offset=offset)
        for tr in page:
            if tr.flow_run_id not in runs:
                continue
            key = (runs[tr.flow_run_id], _stage(tr.name))
            done_total = counts.setdefault(key, [0, 0])
            done_total[1] += 1
            done_total[0] += bool(tr.state and tr.state.is_completed())
        if len(page) < 200:
            break
        offset += len(page)
    for (build, stage), (done, total) in counts.items():
        desc = f"{build} {stage}".strip()
        if (build, stage) not in bars:
            bars[(build, stage)] = progress.add_task(desc, total=total)
        progress.update(bars[(build, stage)], completed=done, total=total)


def _print_products(client, run_id) -> None:
    """The products a completed run built or found built, from the table artifacts its builds left
    (flows/build.py): a table per detector for one build, a line per build for a night."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType, FlowRunFilter, FlowRunFilterId
    from rich.table import Table

    from flows.build import PRODUCTS_ARTIFACT

    ids = [run_id] + [c.id for c in _child_runs(client, run_id)]
    arts = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
                                             flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            if (a.description or "").startswith(PRODUCTS_ARTIFACT)]
    if not arts:
        common.console.print("no products recorded by this run (see its logs in the UI)")
        return
    arts.sort(key=lambda a: str(a.created))
    if len(arts) > 1:
        for a in arts:
            common.console.print(a.description.removeprefix(PRODUCTS_ARTIFACT).strip(), highlight=False)
        return
    art = arts[0]
    rows = json.loads(art.data) if isinstance(art.data, str) else (art.data or [])
    table = Table(title=art.description.removeprefix(PRODUCTS_ARTIFACT).strip())
    for col in ("detector", "calib_id", "new", "level", "noise", "inputs used"):
        table.add_column(col)
    for r in rows:
        table.add_row(*("-" if r.get(c) is None else str(r.get(c)) for c in
                        ("detector", "calib_id", "new", "level", "noise", "inputs used")))
    common.console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(deploy)
    app.command()(trigger)
