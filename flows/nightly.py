"""The nightly flow: for one night, find what was ingested, decide what to build, and build it in
dependency order - bias, then dark, then the defects mask and the photon transfer curve (gains),
then flat (per filter), then fringe (fringing filters) and sky (per filter) - each build's ISR
using what was certified before it; builds that need nothing of each other run side by side
(docs/architecture.md#builds-side-by-side). Products are certified as they
are recorded (validity: calib date -N/+M days). Rerunning a night builds nothing new: each build
finds its identical earlier products (same inputs, same config) and returns them.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from calib_core.builds.calibtypes import CALIB_TYPES, CalibTypeName, dependency_order
from calib_core.camera import Camera
from calib_core.quality.verify import VerifyConfig
from calib_core.io.recycle import recycling
from calib_core.io.recycle import stats as recycle_stats
from calib_core.repository import Datastore, Registry, retry_transient

from .build import build_calib, products_settled, resolve_registry_url

__all__ = ["nightly", "NightlyPolicy", "plan_night", "default_night", "build_dependencies", "run_steps"]

ORDER = tuple(dependency_order())


class NightlyPolicy(BaseModel):
    """What the nightly flow builds from a night's exposures."""

    types: list[CalibTypeName] = Field(
        default_factory=lambda: list(ORDER), description="calib types to consider, built in dependency order")
    min_inputs: dict[str, int] = Field(
        default_factory=lambda: {t.name: t.min_inputs for t in CALIB_TYPES.values()},
        description="fewest exposures of the right kind (per filter for flat, fringe and sky) worth a build")
    fringe_filters: list[str] = Field(default_factory=lambda: ["z", "y", "Y"],
                                      description="filters with fringes: a fringe frame is built for these only")
    validity_days_before: float = Field(15.0, ge=0, description="products valid from calib date minus this")
    validity_days_after: float = Field(15.0, ge=0, description="... until calib date plus this")
    on_bad_input: Literal["fail", "exclude"] = Field(
        "exclude", description="an unreadable raw is excluded and recorded (unattended runs), or fails its build")
    allow_empty: bool = Field(False, description="a night without exposures completes (for cameras that do not "
                                                 "observe every night) instead of failing")
    verify: VerifyConfig = Field(default_factory=VerifyConfig,
                                 description="the verification gate's thresholds and input screening")
    parallel_builds: int = Field(2, ge=1, description="builds run at the same time when neither needs the "
                                 "other's products (flat r beside flat z, sky r beside fringe z); 1: one at a "
                                 "time, in plan order")


def default_night(cam: Camera, now: dt.datetime | None = None) -> str:
    """Last night at the camera's site: the local date 12 hours ago (nights are named by their
    evening), so a run on the morning after gets the night just ended."""
    if not isinstance(cam, Camera):
        from calib_core.camera import load_camera

        cam = load_camera(cam)
    now = now or dt.datetime.now(dt.timezone.utc)
    local = now.astimezone(dt.timezone.utc) + dt.timedelta(hours=cam.utc_offset_hours)
    return (local - dt.timedelta(hours=12)).date().isoformat()


def plan_night(registry: Registry, camera: str, night: str, policy: NightlyPolicy) -> list[dict]:
    """The builds for a night, in dependency order: ``{type, filter, n_inputs, action, reason}``
    with action ``build`` or ``skip``."""
    rows = registry.query_exposures(camera=camera, night=night)
    steps = []
    for calib_type in ORDER:
        if calib_type not in policy.types:
            continue
        spec = CALIB_TYPES[calib_type]
        kind = [r for r in rows if r.obs_type == spec.input_obstype]
        if not spec.filtered:
            groups = {None: kind} if kind else {}
        else:
            groups = {}
            for r in kind:
                groups.setdefault(r.filter, []).append(r)
            if spec.fringing_only:
                groups = {f: g for f, g in groups.items() if f in policy.fringe_filters}
        need = policy.min_inputs.get(calib_type, 1)
        for filt, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
            reason = "" if len(group) >= need else f"{len(group)} {spec.input_obstype} exposures < {need}"
            if not reason and spec.skip_reason is not None:
                reason = spec.skip_reason(group)
            steps.append({"type": calib_type, "filter": filt, "n_inputs": len(group),
                          "action": "skip" if reason else "build", "reason": reason})
    return steps


def build_dependencies(steps: list[dict]) -> dict[int, set[int]]:
    """For each build step of a plan (:func:`plan_night`), the earlier build steps whose products its
    ISR applies: the types in its :attr:`CalibType.isr_calibs`, of any filter when either is unfiltered,
    else of its own filter (sky r waits for flat r, not for flat z or fringe z)."""
    deps: dict[int, set[int]] = {}
    for i, s in enumerate(steps):
        if s["action"] != "build":
            continue
        need = set(CALIB_TYPES[s["type"]].isr_calibs)
        deps[i] = {j for j, step in enumerate(steps[:i]) if step["action"] == "build" and step["type"] in need
                   and (step["filter"] is None or s["filter"] is None or step["filter"] == s["filter"])}
    return deps


def run_steps(steps: list[dict], run_one: Callable[[dict, set[str]], object],
              parallel: int = 1) -> dict[int, BaseException | None]:
    """Run every build step of a plan (docs/architecture.md#builds-side-by-side), each once the builds
    it depends on (:func:`build_dependencies`) have ended or announced their products settled (through
    :data:`flows.build.products_settled`, before their report), at most ``parallel`` at a time, the
    ready ones in plan order.

    ``run_one(step, blocked)`` builds one step; ``blocked`` names the types it depends on whose build
    failed (it still runs: it may find older certified products). Each call runs in a copy of the
    caller's context (a Prefect subflow sees its parent flow run); with ``parallel`` 1 in the caller's
    thread. Returns, per step index, the exception its build raised or None.
    """
    deps = build_dependencies(steps)
    outcome: dict[int, BaseException | None] = {}
    settled: set[int] = set()

    def blocked(i):
        return {step["type"] for j, step in enumerate(steps) if j in deps[i] and outcome.get(j) is not None}

    if parallel <= 1:
        for i in sorted(deps):
            try:
                run_one(steps[i], blocked(i))
                outcome[i] = None
            except Exception as exc:
                outcome[i] = exc
        return outcome
    pending = sorted(deps)
    running = {}
    wake = threading.Event()        # a build ended, or announced its products settled

    def start(i):
        def announce():
            settled.add(i)
            wake.set()

        ctx = contextvars.copy_context()
        ctx.run(products_settled.set, announce)
        future = pool.submit(ctx.run, run_one, steps[i], blocked(i))
        future.add_done_callback(lambda _: wake.set())
        running[future] = i

    with ThreadPoolExecutor(parallel, thread_name_prefix="build") as pool:
        while pending or running:
            # a build's dependents start once its products are settled, while it still writes its report
            for i in [i for i in pending if deps[i] <= outcome.keys() | settled][: parallel - len(running)]:
                pending.remove(i)
                start(i)
            if not running:         # dependencies point to earlier steps only: something is ready
                raise RuntimeError(f"no build step can start: {pending}")
            wake.wait()
            wake.clear()
            for f in [f for f in running if f.done()]:
                outcome[running.pop(f)] = f.exception()
    return outcome


@flow(name="nightly-calibs", log_prints=True)
def nightly(night: str | None = None, camera: str | None = None, repo: str = "calibrepo",
            registry_url: str | None = None, policy: NightlyPolicy | None = None,
            runner: Literal["threads", "processes", "dask"] = "threads", dask_address: str | None = None,
            detectors_per_task: int | None = None, dask_workers: int | None = None) -> dict:
    """Build every calib a night's exposures allow, in dependency order, and report what was built.

    ``camera`` is a registered camera's name or its YAML file; None when the registry holds one
    camera, or (with ``night``) one camera has exposures that night. ``night`` defaults to last
    night at the camera's site. Each build is a subflow (``build-calib``);
    a failed build is reported and the flow fails at the end, after the builds that do not depend
    on it have run. ``dask_workers``: with runner dask and no address, the worker processes of each
    build's local cluster (default: one per core).
    """
    log = get_run_logger()
    policy = policy or NightlyPolicy()
    store = Datastore(repo)
    url = resolve_registry_url(registry_url) or store.default_registry_url
    registry = Registry.open(url)
    registry.check_ready(retry=True)
    cam = retry_transient(registry.resolve_camera, camera, night=night, what="resolve the camera")
    camera = cam.name
    night = night or default_night(cam)
    steps = retry_transient(plan_night, registry, camera, night, policy, what="plan the night")
    if not steps:      # an empty or mistyped night is not a success, unless the policy says so
        message = f"night {night}: no exposures of camera {camera} in the registry; nothing to build"
        if not policy.allow_empty:
            raise ValueError(message + " (NightlyPolicy.allow_empty accepts empty nights)")
        log.warning("%s (accepted: allow_empty)", message)
        return {"night": night, "camera": camera, "steps": [], "created": 0, "state": "empty night (accepted)",
                "report": None}
    for step in steps:
        if step["action"] != "build":
            log.info("skip %s %s: %s", step["type"], step["filter"] or "", step["reason"])

    def build_one(step: dict, blocked: set[str]) -> None:
        try:
            result = build_calib(step["type"], camera=camera, night=night, filter=step["filter"], repo=str(store.root),
                                 registry_url=registry_url, validity_days_before=policy.validity_days_before,
                                 validity_days_after=policy.validity_days_after, on_bad_input=policy.on_bad_input,
                                 verify=policy.verify, runner=runner, dask_address=dask_address, dask_workers=dask_workers,
                                 detectors_per_task=detectors_per_task)
        except Exception as exc:
            step.update(action="failed", reason=f"{type(exc).__name__}: {exc}"
                        + (f" (after failed {', '.join(sorted(blocked))})" if blocked else ""))
            log.error("%s %s failed: %s", step["type"], step["filter"] or "", exc)
            raise
        held = [p for p in result["products"] if p.status != "certified"]
        step.update(action="built" if result["created"] else "existing", created=result["created"],
                    products=[p.calib_id for p in result["products"]], dropped=result["dropped"],
                    certified=len(result["products"]) - len(held),
                    held=[{"calib_id": p.calib_id, "detector": p.detector, "status": p.status,
                           "failed": (p.verification or {}).get("failed") or []} for p in held],
                    valid=[result["products"][0].valid_begin, result["products"][0].valid_end],
                    mosaic=result["mosaic_png"])
        log.info("%s %s: %d new products, %d already built", step["type"], step["filter"] or "",
                 result["created"], len(result["products"]) - result["created"])

    # builds side by side on threads, or on a cluster the builds share; a local Dask cluster or
    # process pool per build takes every core already
    local_pools = runner == "processes" or (runner == "dask" and not dask_address)
    before = recycle_stats()
    # on threads the builds write over each other's retired intermediates (docs/architecture.md#recycled-files)
    with recycling(store.root / "work") if runner == "threads" else nullcontext():
        run_steps(steps, build_one, 1 if local_pools else policy.parallel_builds)
    after = recycle_stats()
    log.info("%d files (%.2f GB) written over retired intermediates' cached pages",
             after["claimed"] - before["claimed"], (after["claimed_bytes"] - before["claimed_bytes"]) / 1e9)
    summary = {"night": night, "camera": camera, "steps": steps,
               "created": sum(s.get("created", 0) for s in steps)}
    failed = [s for s in steps if s["action"] == "failed"]
    n_held = sum(len(s.get("held") or []) for s in steps)
    summary["state"] = (f"FAILED: {len(failed)} build(s) failed" if failed else
                        f"completed with {n_held} product(s) held back" if n_held else "completed")
    summary["report"] = _night_report(registry, store, cam, night, summary, policy, log)
    _artifact(summary)
    if failed:
        raise RuntimeError(f"night {night}: {len(failed)} build(s) failed: "
                           + "; ".join(f"{s['type']} {s['filter'] or ''}: {s['reason']}" for s in failed))
    return summary


def _night_report(registry, store, cam, night, summary, policy, log) -> str | None:
    """The night's HTML page (docs/architecture.md#the-night-report); a failure to write it is logged,
    never fails the night."""
    from calib_core.quality.report import write_night_report

    try:
        path = write_night_report(registry, store.root, cam, night, summary, policy.verify)
    except Exception as exc:
        log.warning("could not write the night report: %s: %s", type(exc).__name__, exc)
        return None
    log.info("night report: %s", path)
    return str(path)


def nightly_markdown(summary: dict) -> str:
    """The nightly artifact: what each build did, where the night report is, and every build's mosaic
    inline, each shrunk where needed so that all of them together stay within what the Prefect
    server publishes (:func:`flows.build.artifact_budget`; nine full democam mosaics were 2.9 MB)."""
    from .build import artifact_budget, png_data_uri

    lines = [f"## Nightly calibs, {summary['camera']}, night {summary['night']}: {summary.get('state', '')}", "",
             "| type | filter | inputs | action | new products | note |", "|---|---|---|---|---|---|"]
    for s in summary["steps"]:
        note = s.get("reason") or (f"valid {s['valid'][0]} .. {s['valid'][1]}" if s.get("valid") else "")
        if s.get("dropped"):
            note += "; excluded " + "; ".join(f"{e}: {why}" for e, why in s["dropped"].items())
        if s.get("held"):
            note += "; held back " + "; ".join(f"det {h['detector']}: {', '.join(h['failed']) or h['status']}"
                                               for h in s["held"])
        lines.append(f"| {s['type']} | {s['filter'] or '-'} | {s['n_inputs']} | {s['action']} | "
                     f"{s.get('created', 0)} | {note.replace('|', '/')} |")
    if summary.get("report"):
        lines += ["", f"Night report: `{summary['report']}` (`calibflow report --night {summary['night']}`)"]
    pictures = [s for s in summary["steps"] if s.get("mosaic")]
    text = "\n".join(lines)
    share = (artifact_budget() - len(text) - 200 * len(pictures)) // max(len(pictures), 1)
    for s in pictures:
        uri = png_data_uri(s["mosaic"], share)
        lines += ["", f"### {s['type']} {s['filter'] or ''}", "",
                  f"![mosaic]({uri})" if uri else f"(mosaic: `{s['mosaic']}`)"]
    return "\n".join(lines)


def _artifact(summary: dict) -> None:
    try:
        key = f"nightly-{summary['camera']}-{summary['night']}".lower().replace("_", "-")
        create_markdown_artifact(nightly_markdown(summary), key=key[:100], description="what the nightly flow built")
    except Exception as exc:  # a convenience; never fail the night on it
        get_run_logger().warning("could not create the nightly artifact: %s", exc)
