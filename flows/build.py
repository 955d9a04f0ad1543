"""The calib build flow: select -> process (per exposure x detector) -> scale -> combine (per detector)
-> write, with the reference's per-type hooks and barriers (``CalibTask``, docs/architecture.md#barriers-by-calib-type):

* bias, dark, fringe: process -> combine;
* flat: process (ISR + background level) -> **scale solve over the CCD x exposure matrix** -> combine;
* sky: process (ISR + object masking + 32-px binned model of each (exposure, detector)) -> **on the
  bins of every exposure: smooth focal-plane surfaces, residuals, outlier exposures rejected, the
  per-bin average** (calib_core.sky.frames.solve_sky_frames) -> with ``n_passes`` > 1, per (exposure,
  detector) objects masked again without the first pass's sky, and the barrier again -> per
  detector: write and register the frame.

Pixels never travel through Prefect: tasks exchange paths in the datastore and small records
(:mod:`calib_core.records`, docs/architecture.md#records).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import hashlib
import math
import os
import pickle
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run

from calib_core.buildplan import BuildRequest, config_hash, plan_build
from calib_core.builds.bias_dark_flat import solve_flat_scales
from calib_core.builds.calibtypes import CalibTypeName
from calib_core.builds.calibtypes import calib_type as spec_of
from calib_core.camera import Camera, effective_config
from calib_core.io.atomic import sweep_stale
from calib_core.io.products import write_hdulist
from calib_core.io.recycle import recycling
from calib_core.quality.mosaic import write_product_mosaic
from calib_core.quality.verify import VerifyConfig
from calib_core.records import BuiltProduct, ProcessedInput, SkyResidual
from calib_core.repository import (Datastore, Registry, ValidityRule, check_identifier, finish_build_run, resolve_url,
                                   retry_transient, start_build_run)
from calib_core.sky.frames import solve_sky_frames
from calib_core.stats.background import BackgroundModel
from tasks.allocator import tune_allocator
from tasks.calib_tasks import (BuildContext, build_camera, combine_detector, existing_products, process_detectors,
                               sky_rebin)

__all__ = ["build_calib", "run_build", "make_task_runner", "detector_batches", "resolve_registry_url", "RUNNERS",
           "progress_listener"]

RUNNERS = ("threads", "processes", "dask")


def _version() -> str:
    from calibflow import __version__

    return __version__


def resolve_registry_url(registry_url: str | None) -> str | None:
    """The registry URL a run's parameter names: the URL itself, ``env:NAME`` (an environment variable
    of the run's process) or ``secret:BLOCK`` (a Prefect Secret block holding the URL). Deployments
    and the CLI pass references, so no password is stored with a flow run."""
    if not registry_url:
        return None
    if registry_url.startswith("secret:"):
        from prefect.blocks.system import Secret

        return str(Secret.load(registry_url[len("secret:"):]).get())
    return resolve_url(registry_url)


def _current_api_url() -> str | None:
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.api_url).rstrip("/")
    except Exception:
        return None


def make_task_runner(runner: str = "threads", dask_address: str | None = None, dask_workers: int | None = None):
    """The task runner of a build: threads sized to the cores (default), processes, or Dask.

    ``dask`` connects to an existing ``dask.distributed`` scheduler at ``dask_address``, or starts a
    local cluster of ``dask_workers`` single-threaded worker processes (default: one per core). Local workers are pointed at this
    process's Prefect API so their task runs are recorded with the flow's; workers of an existing
    cluster must have calibflow installed, the datastore mounted at the same path and
    ``PREFECT_API_URL`` set (see the README, "Scaling out").
    """
    n = os.cpu_count() or 2
    if runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=n)
    if runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        url = _current_api_url()
        if url and not os.environ.get("PREFECT_API_URL"):
            # inherited by the pool workers: without it each one starts a temporary server of its own
            os.environ["PREFECT_API_URL"] = url

        return ProcessPoolTaskRunner(max_workers=n)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        url = _current_api_url()
        if url and not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_API_URL"] = url      # inherited by the local worker processes
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers or n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {runner!r}")


_PROGRESS_LISTENERS: list[Callable[[str, str, int, int], None]] = []


@contextmanager
def progress_listener(callback: Callable[[str, str, int, int], None]):
    """Within the block, ``callback(build, stage, done, total)`` is called in this process as each
    task of a build's stage finishes (and with ``done=0`` when the stage starts): ``build`` names the
    build (``"bias"``, ``"flat r"``), ``stage`` its step (``"process"``, ``"sky pass 2"``,
    ``"combine"``). The CLI draws its progress bars from it; a callback's error is ignored."""
    _PROGRESS_LISTENERS.append(callback)
    try:
        yield callback
    finally:
        _PROGRESS_LISTENERS.remove(callback)


def _tell(build: str, stage: str, done: int, total: int) -> None:
    for callback in list(_PROGRESS_LISTENERS):
        try:
            callback(build, stage, done, total)
        except Exception:  # a progress bar must never fail a build
            pass


def _build_label(ctx: BuildContext) -> str:
    return ctx.calib_type if ctx.filter in ("NONE", "", None) else f"{ctx.calib_type} {ctx.filter}"


def _gather(futures, ctx: BuildContext, stage: str, log) -> list:
    """Results in submission order, logging progress as tasks finish (and telling the listeners)."""
    build = _build_label(ctx)
    total = len(futures)
    step = max(1, total // 10)
    _tell(build, stage, 0, total)
    if futures and isinstance(futures[0], concurrent.futures.Future):
        finished = concurrent.futures.as_completed(futures)
    else:
        finished = as_completed(futures)
    for done, _ in enumerate(finished, 1):
        _tell(build, stage, done, total)
        if done % step == 0 or done == total:
            log.info("%s %s: %d/%d done", build, stage, done, total)
    return [f.result() for f in futures]


@flow(name="build-calib", log_prints=True)
def build_calib(calib_type: CalibTypeName, camera: str | None = None,
                night: str | None = None, exposures: list[str] | None = None, filter: str | None = None,
                detectors: list[int] | None = None, repo: str = "calibrepo", registry_url: str | None = None,
                config: dict | None = None, drop_incomplete: bool = False, calib_date: str | None = None,
                validity_days_before: float = 15.0, validity_days_after: float = 15.0,
                on_bad_input: Literal["fail", "exclude"] = "fail",
                runner: Literal["threads", "processes", "dask"] = "threads",
                dask_address: str | None = None, dask_workers: int | None = None,
                detectors_per_task: int | None = None, verify: VerifyConfig | None = None) -> dict:
    """Build one calib type for every selected detector and register the products.

    Inputs: the ingested exposures of the type's raw kind (bias, dark, flat; science for fringe and
    sky) selected by night, explicit ids, filter and detectors. ``on_bad_input="exclude"`` drops an
    exposure whose raw cannot be read and records why; the default fails the build naming the file.
    ``camera`` is a registered camera's name or its YAML file (which must equal the registered
    definition); None when the registry holds one camera, or one has exposures of the selection.
    An identical earlier build (same inputs, config, ISR calibs and camera definition) is found and
    nothing is redone.
    ``detectors_per_task`` sets how many detectors of one exposure a process task handles (default:
    as many as keeps about four tasks per worker busy, see :func:`detector_batches`).
    ``verify``: the verification gate's thresholds and input screening (docs/algorithms.md#verification-thresholds);
    products that pass are certified, the others stay candidates with their failed checks.
    """
    request = BuildRequest(calib_type=calib_type, camera=camera, night=night, exposures=exposures, filter=filter,
                           detectors=detectors, repo=repo, registry_url=registry_url, config=config,
                           drop_incomplete=drop_incomplete, calib_date=calib_date,
                           validity_days_before=validity_days_before, validity_days_after=validity_days_after,
                           on_bad_input=on_bad_input, runner=runner, dask_address=dask_address,
                           dask_workers=dask_workers, detectors_per_task=detectors_per_task, verify=verify)
    return run_build(request, task_runner=make_task_runner(runner, dask_address, dask_workers),
                     log=get_run_logger(), flow_run_id=str(flow_run.get_id() or ""), runner_name=runner)


def run_build(request: BuildRequest, *, task_runner, log, flow_run_id: str = "", runner_name: str = "",
              artifacts: bool = True) -> dict:
    """The body of :func:`build_calib` for any task runner with Prefect's ``submit(task, parameters)``
    interface (the overhead benchmark runs it with a plain thread pool, outside Prefect).

    On threads, files are written over retired intermediates' cached pages while it runs (a night's
    builds share the night's pool; docs/architecture.md#recycled-files). Tasks in other processes
    (``processes``, ``dask``) could not take the pool's files, which would only hold disk."""
    pool = recycling(Datastore(request.repo).root / "work") if runner_name in ("", "threads") else nullcontext()
    with pool:
        return _run_build(request, task_runner=task_runner, log=log, flow_run_id=flow_run_id,
                          runner_name=runner_name, artifacts=artifacts)


def _run_build(request: BuildRequest, *, task_runner, log, flow_run_id: str, runner_name: str,
               artifacts: bool) -> dict:
    r = request
    calib_type, camera, night, exposures, filter = r.calib_type, r.camera, r.night, r.exposures, r.filter
    detectors, repo, registry_url, config, calib_date = r.detectors, r.repo, r.registry_url, r.config, r.calib_date
    drop_incomplete, on_bad_input, detectors_per_task = r.drop_incomplete, r.on_bad_input, r.detectors_per_task
    validity_days_before, validity_days_after = r.validity_days_before, r.validity_days_after
    spec = spec_of(calib_type)
    from calib_core.repository import retention_policy

    retention_policy()      # a mistyped CALIBFLOW_INTERMEDIATES fails the build before any work
    tune_allocator()        # the flow's own threads: barriers, verification, the mosaic
    store = Datastore(repo)
    url = resolve_registry_url(registry_url) or store.default_registry_url
    registry = Registry.open(url)
    registry.check_ready(retry=True)
    cam = retry_transient(registry.resolve_camera, camera, night=night, exposure_ids=exposures,
                          what="resolve the camera")
    camera = check_identifier(cam.name, "camera name") or cam.name   # it names folders this build writes
    # the type's defaults, the camera's ISR defaults over them, the build's own settings over both
    cfg = effective_config(spec.config_model, cam, config)
    plan = retry_transient(plan_build, registry, calib_type, camera, night=night, exposure_ids=exposures,
                           filter=filter, detectors=detectors, drop_incomplete=drop_incomplete,
                           calib_date=calib_date, what="select the inputs")
    log.info("%s build: %d exposures x %d detectors, filter %s, calib date %s%s", calib_type,
             len(plan.exposures), len(plan.detectors), plan.filter, plan.calib_date,
             f", dropped {plan.dropped}" if plan.dropped else "")
    ctx = BuildContext(repo=str(store.root), registry_url=url, camera=camera, camera_hash=cam.content_hash,
                       calib_type=calib_type,
                       config=cfg.model_dump(mode="json"), config_hash=config_hash(cfg),
                       calib_date=plan.calib_date.isoformat(), filter=plan.filter, software_version=_version(),
                       validity=ValidityRule(days_before=validity_days_before, days_after=validity_days_after),
                       on_bad_input=on_bad_input, verify=(r.verify or VerifyConfig()).model_dump(mode="json"),
                       verify_raws="always" if os.environ.get("CALIBFLOW_VERIFY_RAWS") == "always" else "auto",
                       lookup_token=uuid.uuid4().hex)
    done = retry_transient(existing_products, registry, ctx, plan.exposures, plan.detectors,
                           what="look up earlier products")
    if len(done) == len(plan.detectors):
        log.info("%s build: every product already exists (identical inputs and config); nothing to do", calib_type)
        run_id = start_build_run(registry, flow_run_id, calib_type, {"night": night, "exposures": exposures,
                                                                     "filter": filter, "detectors": detectors})
        finish_build_run(registry, run_id, "completed", f"0 new products: all {len(done)} already built by an "
                         "identical earlier build")
        products = _settle(registry, ctx, [BuiltProduct.of(done[d], created=False) for d in plan.detectors], log)
        # a build killed after registering its products left its intermediates: no resume needs them
        _retire_intermediates(registry, ctx, plan, store, log, run_id)
        _announce_settled()
        png = _mosaic_path(ctx, store)
        if not (png.exists() and png.with_suffix(".fits").exists()):
            # a build killed after registering its products never wrote them: do it now
            log.info("%s build: writing the missing mosaic %s", calib_type, png)
            png = _report(ctx, cam, products, store, log, artifacts)
        elif artifacts:
            _table_artifact(ctx, products, log)
        return {"calib_type": calib_type, "products": products, "created": 0, "calib_date": ctx.calib_date,
                "filter": plan.filter, "dropped": plan.dropped, "mosaic_png": str(png),
                "processed": []}

    # a build killed earlier (SIGKILL, OOM, lost node) may have left half-written temporaries behind
    swept = [p for sub in ("work", "calib") for p in sweep_stale(store.root / sub / camera / calib_type)]
    if swept:
        log.info("removed %d temporary files left by an interrupted earlier build", len(swept))
    run_id = start_build_run(registry, flow_run_id, calib_type,
                             {"night": night, "exposures": exposures, "filter": filter, "detectors": detectors,
                              "config": cfg.model_dump(mode="json"), "runner": runner_name})
    ctx = ctx.model_copy(update={"build_run_id": run_id})
    try:
        with task_runner as tr:
            products, dropped, processed, residuals = _run_stages(ctx, plan, cfg, tr, log, detectors_per_task)
    except BaseException as exc:
        finish_build_run(registry, run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    created = sum(p.created for p in products)
    products = _settle(registry, ctx, products, log, residuals)
    # the products are registered and judged: the intermediates go now (into the recycle pool, for the
    # next build's writes), and the builds that apply the products may start beside this one's report
    # (docs/architecture.md#builds-side-by-side)
    _retire_intermediates(registry, ctx, plan, store, log, run_id)
    _announce_settled()
    summary = _report(ctx, cam, products, store, log, artifacts)
    finish_build_run(registry, run_id, "completed", f"{created} new products, {len(products) - created} existing")
    return {"calib_type": calib_type, "products": products, "created": created, "calib_date": ctx.calib_date,
            "filter": plan.filter, "dropped": dropped, "mosaic_png": summary,
            "processed": [p.model_dump(mode="json", include={"exposure_id", "detector", "reused", "pid"})
                          for p in processed]}


#: set by whoever runs a build to hear when its products are registered, judged and certified (or
#: held back), before the build's report: :func:`flows.nightly.run_steps` starts the builds whose ISR
#: applies them then (docs/architecture.md#builds-side-by-side)
products_settled: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "calibflow_products_settled", default=None)


def _announce_settled() -> None:
    hook = products_settled.get()
    if hook is not None:
        hook()


def may_share_inputs(running: set[tuple[str, str | None]], calib_type: str, filter: str | None) -> bool:
    """Whether one of the ``running`` builds (type, filter, as :func:`running_builds` gives them: None
    for no or an unknown filter) may read a build's intermediates: one of the same type whose filter is
    the same or unknown (an exposure has one filter, so flat z never reads flat r's)."""
    mine = None if filter in (None, "", "NONE") else filter
    return any(t == calib_type and (f is None or mine is None or f == mine) for t, f in running)


def _retire_intermediates(registry, ctx: BuildContext, plan, store: Datastore, log, run_id: int) -> None:
    """The retention of docs/architecture.md#intermediates-and-disk: once the build's products are
    registered and verified, its intermediates (its exposures and detectors) are removed, unless
    ``CALIBFLOW_INTERMEDIATES=keep`` or another build of the type and filter is running (it may read
    the same files: they are left for ``calibflow prune``; a build of another filter has other
    exposures, so only the frames, which do not name theirs, are left to the type's last build).
    Never fails the build."""
    from calib_core.repository import build_files, mark_crashed_runs, remove_files, retention_policy, running_builds

    try:
        if retention_policy() == "keep":
            return
        retry_transient(mark_crashed_runs, registry, what="check for running builds")
        others = retry_transient(running_builds, registry, run_id, what="check for running builds")
        if may_share_inputs(others, ctx.calib_type, plan.filter):
            log.info("%s build: intermediates kept, another %s build is running (calibflow prune frees them)",
                     _build_label(ctx), _build_label(ctx))
            return
        # a build of the type for another filter (sky z beside sky r) reads none of this build's
        # exposures' files, but its frames are named by detector and digest only: they are left, and
        # the last build of the type to end removes every frame of its detectors
        same_type = any(t == ctx.calib_type for t, _ in others)
        work = store.root / "work" / ctx.camera / ctx.calib_type
        n, freed = remove_files(build_files(work, plan.exposure_ids, plan.detectors, frames=not same_type))
        if n:
            log.info("%s build: removed %d intermediate files (%.1f MB)", _build_label(ctx), n, freed / 1e6)
    except Exception as exc:        # disk housekeeping must not fail a build whose products are registered
        log.warning("%s build: intermediates not removed (%s: %s); calibflow prune frees them",
                    _build_label(ctx), type(exc).__name__, exc)


def _parallelism(tr) -> int:
    """How many tasks the entered runner runs at once (threads, processes, Dask worker threads)."""
    for attr in ("_max_workers", "workers"):
        n = getattr(tr, attr, None)
        if isinstance(n, int) and 0 < n < 10_000:
            return n
    client = getattr(tr, "_client", None)
    if client is not None:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:
            pass
    return os.cpu_count() or 2


def detector_batches(detectors: list[int], n_exposures: int, parallelism: int,
                     per_task: int | None = None) -> list[list[int]]:
    """Split one exposure's detectors into the groups that process tasks handle.

    Prefect costs a roughly fixed time per task run (state changes, logs: ~15 ms on a quiet 2-core
    machine, several times that when the API server competes for the cores), so one task per
    (exposure, detector) lets it eat a fifth of a night on small detectors. The default keeps at least
    four tasks per worker in flight (load balance) and no more: the groups are as large as that allows,
    split evenly. ``per_task`` fixes the group size instead (1 = one task per detector).
    """
    if not detectors:
        return []
    if per_task is None:
        groups = max(1, min(len(detectors), math.ceil(4 * parallelism / max(n_exposures, 1))))
    else:
        groups = math.ceil(len(detectors) / per_task)
    size, extra = divmod(len(detectors), groups)
    out, start = [], 0
    for g in range(groups):
        stop = start + size + (1 if g < extra else 0)
        out.append(list(detectors[start:stop]))
        start = stop
    return out


def _run_stages(ctx: BuildContext, plan, cfg, tr, log, per_task: int | None = None
                ) -> tuple[list[BuiltProduct], dict[str, str], list[ProcessedInput], dict]:
    """process -> scale -> combine; returns the products, every exposure left out (with why), the
    per-(exposure, detector) results and the sky build's binned residuals of the exposures used
    (``{exposure: {detector: path}}``; empty for the other types), which its verification scores
    the frame on."""
    calib_type, spec = ctx.calib_type, ctx.spec
    # process: mapped tasks over (exposure, group of detectors)
    batches = detector_batches(plan.detectors, len(plan.exposures), _parallelism(tr), per_task)
    futures = [tr.submit(process_detectors, {"ctx": ctx, "exposure": e, "detectors": b})
               for e in plan.exposures for b in batches]
    log.info("%s process: %d tasks of %s detectors each", calib_type, len(futures),
             "/".join(sorted({str(len(b)) for b in batches}, key=int)))
    processed = [r for rs in _gather(futures, ctx, "process", log) for r in rs]
    log.info("processed %d (exposure, detector) pairs, %d reused from an earlier run", len(processed),
             sum(p.reused for p in processed))
    dropped = dict(plan.dropped)
    for p in processed:
        if p.error is not None:
            dropped.setdefault(p.exposure_id, f"unreadable raw: {p.error}")
    for p in processed:
        if p.screened:     # docs/algorithms.md#input-screening: the whole exposure is left out
            dropped.setdefault(p.exposure_id, f"screened out: {p.screened}")
    # inputs left out as bad input (unreadable, or screened out against an earlier night's master)
    # are part of the products' identity (outlier rejection is not: it follows from the inputs); a
    # repaired raw then makes a new, full product
    excluded = sorted({p.exposure_id for p in processed if p.error is not None or p.screened})
    if len(dropped) > len(plan.dropped):
        log.warning("excluded exposures: %s", {e: r for e, r in dropped.items() if e not in plan.dropped})
    order = [e for e in plan.exposure_ids if e not in dropped]
    if not order:
        raise ValueError(f"{calib_type} build: no usable exposures left: {dropped}")
    per_det = {d: sorted((p for p in processed if p.detector == d and p.exposure_id not in dropped),
                         key=lambda p: order.index(p.exposure_id)) for d in plan.detectors}

    # scale: the barrier
    exp_scales, ccd_scales, residuals = None, {}, {}
    if spec.barrier == "flat_scales":
        import numpy as np

        levels = np.array([[p.level for p in per_det[d]] for d in plan.detectors], dtype=float)
        weights = (np.array([[p.npoint for p in per_det[d]] for d in plan.detectors], dtype=float)
                   if cfg.weighted else None)
        scales = solve_flat_scales(levels, iterations=cfg.iterations, weights=weights)
        exp_scales = [float(s) for s in scales.exp_scales]
        ccd_scales = {d: float(c) for d, c in zip(plan.detectors, scales.ccd_scales)}
    elif spec.barrier == "sky_passes":
        per_det = _sky_second_pass(ctx, plan, cfg, tr, log, per_det, order, dropped, per_task)
        for d, items in per_det.items():
            for it in items:
                residuals.setdefault(it.exposure_id, {})[d] = it.residual

    # combine + write, one task per detector
    combos = [tr.submit(combine_detector, {"ctx": ctx, "detector": d, "items": per_det[d], "exposures": plan.exposures,
                                           "exp_scales": exp_scales, "ccd_scale": ccd_scales.get(d),
                                           "dropped": dropped, "excluded": excluded})
              for d in plan.detectors]
    return _gather(combos, ctx, "combine", log), dropped, processed, residuals


def _sky_second_pass(ctx, plan, cfg, tr, log, per_det: dict[int, list[ProcessedInput]], order, dropped,
                     per_task=None) -> dict[int, list[SkyResidual]]:
    """The sky build's barrier(s), on the binned models of every (exposure, detector): surfaces,
    residuals, exposure rejection and the frame (:func:`calib_core.sky.frames.solve_sky_frames`); with
    ``n_passes`` > 1 a mapped re-masking between barriers. ``dropped`` gets the rejected exposures;
    returns the items to combine per detector, each carrying its frame's path."""
    camera = build_camera(ctx)
    store = Datastore(ctx.repo)
    work = store.root / "work" / ctx.camera / ctx.calib_type
    index = {(it.exposure_id, it.detector): it for d in plan.detectors for it in per_det[d]}
    result = None
    for k in range(cfg.n_passes):
        if k > 0:
            batches = detector_batches(plan.detectors, len(order), _parallelism(tr), per_task)
            digest, frames = _write_frames(work, result, "pass-frame")
            models = {e: _pass_model(store, work, result.surfaces[e], e, digest, frames) for e in order}
            futures = [tr.submit(sky_rebin, {"ctx": ctx, "items": [index[(e, d)] for d in b], "k": k,
                                             "model": models[e]})
                       for e in order for b in batches]
            for it in (r for rs in _gather(futures, ctx, f"pass {k + 1}", log) for r in rs):
                index[(it.exposure_id, it.detector)] = it
        binned = {e: {d: BackgroundModel.from_fits(index[(e, d)].bins) for d in plan.detectors} for e in order}
        result = solve_sky_frames(camera, binned, cfg.pass_config(k), result and result.frames)
        log.info("sky pass %d of %d: sky levels %s; rejected %s", k + 1, cfg.n_passes,
                 {e: round(v, 1) for e, v in result.scales.items()}, result.rejected or "none")
    if result.rejected:
        log.warning("sky build: rejected exposures %s", result.rejected)
    if result.warning:
        log.warning("sky build %s: %s", ctx.filter, result.warning)
    dropped.update(result.rejected)
    digest, frames = _write_frames(work, result, f"frame-{ctx.filter}")
    out = {}
    for d in plan.detectors:
        out[d] = []
        for e in result.used:
            it = index[(e, d)]
            resid = work / f"{e}-det{d:03d}-resid-{digest}.fits"
            write_hdulist(resid, result.residuals[e][d].to_hdulist())
            out[d].append(SkyResidual(exposure_id=it.exposure_id, detector=d, path=it.path,
                                      isr_calibs=it.isr_calibs, bins=it.bins, residual=str(resid),
                                      scale=result.scales[e], frame=str(frames[d]), warning=result.warning))
    return out


def _settle(registry, ctx: BuildContext, products: list[BuiltProduct], log, residuals: dict | None = None
            ) -> list[BuiltProduct]:
    """The verification gate's decision (docs/architecture.md#verification-and-certification): the
    checks across detectors (a flat's detector-to-detector scatter; a sky frame's held-out structure,
    scored on ``residuals``, when this run built it) join each product's own, and the candidates that
    passed everything are certified; returns the products as now registered."""
    from calib_core.quality.verify import detector_scatter_checks
    from calib_core.repository import settle_candidates

    extra, extra_metrics = {}, {}
    cfg = VerifyConfig.model_validate(ctx.verify)
    if ctx.calib_type == "flat":
        means = {}
        for p in products:
            metrics = (p.verification or {}).get("metrics") or {}
            if metrics.get("*", {}).get("mean") is not None:
                means[p.calib_id] = metrics["*"]["mean"]
        extra = {cid: [c.to_dict()] for cid, c in detector_scatter_checks(means, cfg).items()}
    elif ctx.calib_type == "sky" and residuals and cfg.enabled:
        extra, extra_metrics = _sky_structure(ctx, products, residuals, cfg, log)
    rows = retry_transient(settle_candidates, registry, [p.calib_id for p in products], extra, extra_metrics,
                           what="certify the products")
    by_id = {r.calib_id: r for r in rows}
    out = [BuiltProduct.of(by_id[p.calib_id], p.created) for p in products]     # as registered now
    held = [p for p in out if p.status != "certified"]
    if held:
        log.warning("%s: %d of %d products held back (not certified): %s", _build_label(ctx), len(held), len(out),
                    "; ".join(f"detector {p.detector}: {p.status}"
                              + (f" ({'; '.join((p.verification or {}).get('failed') or [])})"
                                 if (p.verification or {}).get("failed") else "") for p in held))
    return out


def _sky_structure(ctx: BuildContext, products: list[BuiltProduct], residuals: dict, cfg: VerifyConfig, log
                   ) -> tuple[dict, dict]:
    """The sky frame's held-out checks (:func:`calib_core.quality.verify.sky_structure_checks`) on the
    frames as registered and the build's binned residuals: (checks, metrics) by calib id."""
    from calib_core.quality import verify
    frames = {p.detector: BackgroundModel.from_fits(p.path) for p in products}
    models = {e: {d: BackgroundModel.from_fits(path) for d, path in by_det.items()} for e, by_det in residuals.items()}
    result = verify.sky_structure_checks(build_camera(ctx), models, frames, cfg, ctx.cfg())
    checks, metrics = {}, {}
    for p in products:
        found, values = result[p.detector]
        checks[p.calib_id] = [c.to_dict() for c in found]
        metrics[p.calib_id] = {"*": values}
    ratios = {d: round(v[1]["structure_ratio"], 1) for d, v in sorted(result.items())}
    log.info("sky %s: held-out structure without / with the frame, per detector %s (limit %g)", ctx.filter,
             ratios, cfg.sky_min_improvement)
    return checks, metrics


def _frames_digest(result) -> str:
    h = hashlib.sha256()
    for d in sorted(result.frames):
        h.update(result.frames[d].values.tobytes())
    for e in sorted(result.surfaces, key=str):
        h.update(str(e).encode())
        h.update(result.surfaces[e].coeffs.tobytes())
    return h.hexdigest()[:16]


def _write_frames(work, result, prefix: str) -> tuple[str, dict]:
    """A pass's frames in the datastore, named by their content digest: (digest, {detector: path})."""
    digest = _frames_digest(result)
    paths = {}
    for d, frame in result.frames.items():
        paths[d] = work / f"{prefix}-det{d:03d}-{digest}.fits"
        if not paths[d].exists():
            write_hdulist(paths[d], frame.to_hdulist())
    return digest, paths


def _pass_model(store, work, surface, exposure_id: str, frames_digest: str, frames: dict) -> dict:
    """What the next pass needs of one exposure, by reference: its surface (pickled) and the frames."""
    digest = hashlib.sha256(surface.coeffs.tobytes() + frames_digest.encode()).hexdigest()[:16]
    spath = work / f"{exposure_id}-surface-{digest}.pkl"
    if not spath.exists():
        store.atomic_write_bytes(spath, pickle.dumps(surface))
    return {"surface": str(spath), "frames": {str(d): str(p) for d, p in frames.items()}, "digest": digest}


def _mosaic_path(ctx: BuildContext, store: Datastore):
    stem = f"{ctx.calib_type}-{ctx.camera}-{ctx.filter}-{ctx.calib_date}".replace("/", "_").replace("\\", "_")
    return store.inside(store.root / "calib" / ctx.camera / ctx.calib_type / f"{stem}-mosaic.png")


def _fmt(value, digits: int):
    return None if value is None or not math.isfinite(float(value)) else round(float(value), digits)


def _report(ctx: BuildContext, camera: Camera, products: list[BuiltProduct], store: Datastore, log,
            artifacts: bool = True) -> str:
    """Camera mosaic (FITS + PNG) and Prefect artifacts: a table per detector and the picture."""
    # (with header-defined geometry and every raw reused, the products give the detector sizes)
    png = _mosaic_path(ctx, store)
    write_product_mosaic(camera, ctx.calib_type, {p.detector: p.path for p in products},
                         fits_path=png.with_suffix(".fits"), png_path=png, filter=ctx.filter,
                         calib_date=ctx.calib_date, calib_ids={p.detector: p.calib_id for p in products},
                         n_inputs={p.detector: p.stats.get("n_used") for p in products})
    if not artifacts:
        return str(png)
    _table_artifact(ctx, products, log)
    try:
        create_markdown_artifact(mosaic_markdown(ctx, png, products), key=f"{_artifact_key(ctx)}-mosaic"[:100],
                                 description=f"mosaic of {_build_label(ctx)} {ctx.calib_date}")
    except Exception as exc:  # artifacts are a convenience; never fail a build on them
        log.warning("could not create artifacts: %s", exc)
    return str(png)


def artifact_budget() -> int:
    """Characters an artifact may hold so that the Prefect server still publishes the event it makes
    of it: the server refuses events above ``PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES`` (default
    1.5 MB) and prints ``Refusing to publish event of size ...`` on the terminal of the command that
    started it (docs/prefect.md#artifacts). The setting is read where the artifact is made, which is
    the server's own for the embedded server; 100 kB are kept for the text and the event's envelope."""
    try:
        from prefect.settings import get_current_settings

        limit = int(get_current_settings().server.events.maximum_size_bytes)
    except Exception:       # an older Prefect without the setting: its default
        limit = 1_500_000
    return max(limit - 100_000, 0)


def png_data_uri(png, max_chars: int | None = None) -> str | None:
    """The PNG as a ``data:`` URI, which Prefect's UI renders inline in a markdown artifact (a
    ``file://`` link is refused by browsers and meaningless off the machine; docs/prefect.md#artifacts),
    at most ``max_chars`` long (default :func:`artifact_budget`): a larger picture is reduced to 256
    colours and, where that is not enough, shrunk (Lanczos, both axes by the same factor) until it
    fits. None if the file is missing, not a PNG, or would have to shrink below 64 px to fit."""
    import base64
    import io
    from pathlib import Path

    prefix = "data:image/png;base64,"
    budget = (artifact_budget() if max_chars is None else int(max_chars)) - len(prefix)
    raw_budget = budget // 4 * 3            # base64: 4 characters for 3 bytes
    try:
        data = Path(png).read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG"):
        return None
    if len(data) > raw_budget:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                full = img.copy()
        except Exception:
            return None
        # a colormapped picture, so 256 colours lose nothing visible; a PNG of them is a half to a
        # quarter the size of the RGBA one and is written in ~0.05 s (the RGBA one, with
        # optimize=True, took 0.5 s, and several tries a picture: 7.6 s for the nightly artifact)
        factor = 1.0
        while True:
            size = (round(full.width * factor), round(full.height * factor))
            if min(size) < 64:
                return None
            small = full if factor == 1.0 else full.resize(size, Image.LANCZOS)
            out = io.BytesIO()
            small.quantize(256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG")
            data = out.getvalue()
            if len(data) <= raw_budget:
                break
            factor *= min(0.9, 0.95 * math.sqrt(raw_budget / len(data)))
    return prefix + base64.b64encode(data).decode("ascii")


def mosaic_markdown(ctx: BuildContext, png, products: list[BuiltProduct]) -> str:
    """The mosaic artifact: the picture inline, what was certified or held back, and where the
    files and the night report are."""
    from calib_core.quality.verify import summarise_checks

    uri = png_data_uri(png)
    lines = [f"## {_build_label(ctx)} {ctx.calib_date} ({ctx.camera})", ""]
    lines.append(f"![mosaic of {_build_label(ctx)}]({uri})" if uri else f"(mosaic too large to show inline: `{png}`)")
    certified = sum(p.status == "certified" for p in products)
    lines += ["", f"**{certified} of {len(products)} products certified.**"]
    for p in products:
        if p.status != "certified":
            lines.append(f"- held back: detector {p.detector} `{p.calib_id}` ({p.status}): "
                         f"{summarise_checks(p.verification)}")
    lines += ["", f"Mosaic FITS and PNG: `{png.with_suffix('.fits')}`, `{png}`",
              f"Night reports: `{Path(ctx.repo) / 'reports'}` (`calibflow report --night NIGHT`)"]
    return "\n".join(lines)


def _artifact_key(ctx: BuildContext) -> str:
    """``<type>[-<filter>]-<camera>-<calib date>``: the filter keeps the r and z builds of one night
    apart on the Artifacts page (Prefect keys: lower-case letters, digits and dashes)."""
    import re

    parts = [ctx.calib_type] + ([ctx.filter] if ctx.filter not in ("NONE", "", None) else []) + [ctx.camera,
                                                                                                  ctx.calib_date]
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


#: the table artifact's description starts with this (``calibflow trigger --watch`` lists the products from it)
PRODUCTS_ARTIFACT = "products of"


def _summary(p: BuiltProduct) -> str:
    from calib_core.quality.verify import summarise_checks

    return summarise_checks(p.verification)


def _table_artifact(ctx: BuildContext, products: list[BuiltProduct], log) -> None:
    """A table per detector on the flow run (the UI's Artifacts tab; ``trigger --watch`` prints it):
    the product, whether this run made it (``new``) or found it built, its inputs and statistics."""
    rows = [{"detector": p.detector, "calib_id": p.calib_id, "new": p.created,
             "inputs used": p.stats.get("n_used"),
             "rejected": p.stats.get("n_rejected"), "level": _fmt(p.stats.get("level"), 5),
             "noise": _fmt(p.stats.get("noise"), 5),
             "clipped fraction": _fmt(p.stats.get("clipped_fraction"), 4),
             "status": p.status, "verification": _summary(p)} for p in products]
    created = sum(r["new"] for r in rows)
    label = _build_label(ctx)
    try:
        create_table_artifact(rows, key=_artifact_key(ctx)[:100],
                              description=f"{PRODUCTS_ARTIFACT} {label} {ctx.calib_date}: {created} new, "
                                          f"{len(rows) - created} already built")
    except Exception as exc:  # artifacts are a convenience; never fail a build on them
        log.warning("could not create artifacts: %s", exc)
