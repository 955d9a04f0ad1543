"""The calib build flow: select -> process (per exposure x detector) -> scale -> combine (per detector)
-> write, as the reference's ``CalibTask`` (ALGORITHMS.md 2, 11). Bias, dark and flat so far."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from calib_core.buildplan import config_hash, plan_build
from calib_core.calibs import solve_flat_scales
from calib_core.camera import load_camera
from calib_core.datastore import Datastore
from calib_core.mosaic import camera_mosaic, write_mosaic
from calib_core.products import read_product
from calib_core.registry import Registry
from calib_core.registry.calibs import ValidityRule
from tasks.calib_tasks import (CONFIG_MODELS, BuildContext, combine_detector, finish_build_run,
                               process_exposure_detector, start_build_run)

__all__ = ["build_calib"]


def _version() -> str:
    from calibflow import __version__

    return __version__


@flow(name="build-calib", log_prints=True)
def build_calib(calib_type: str, camera: str = "democam", night: str | None = None,
                exposures: list[str] | None = None, filter: str | None = None,
                detectors: list[int] | None = None, repo: str = "calibrepo", registry_url: str | None = None,
                config: dict | None = None, drop_incomplete: bool = False, calib_date: str | None = None,
                validity_days_before: float = 15.0, validity_days_after: float = 15.0) -> dict:
    """Build one calib type (bias, dark, flat) for every selected detector and register the products."""
    log = get_run_logger()
    if calib_type not in CONFIG_MODELS:
        raise ValueError(f"calib type {calib_type!r} is not built by this flow yet; available: "
                         f"{', '.join(CONFIG_MODELS)}")
    store = Datastore(repo)
    url = registry_url or store.default_registry_url
    registry = Registry.open(url)
    registry.check_ready()
    cfg = CONFIG_MODELS[calib_type].model_validate(config or {})
    plan = plan_build(registry, calib_type, camera, night=night, exposure_ids=exposures, filter=filter,
                      detectors=detectors, drop_incomplete=drop_incomplete, calib_date=calib_date)
    log.info("%s build: %d exposures x %d detectors, filter %s, calib date %s%s", calib_type,
             len(plan.exposures), len(plan.detectors), plan.filter, plan.calib_date,
             f", dropped {plan.dropped}" if plan.dropped else "")
    run_id = start_build_run(registry, str(flow_run.get_id() or ""), calib_type,
                             {"night": night, "exposures": exposures, "filter": filter, "detectors": detectors,
                              "config": cfg.model_dump(mode="json")})
    ctx = BuildContext(repo=str(store.root), registry_url=url, camera=camera, calib_type=calib_type,
                       config=cfg.model_dump(mode="json"), config_hash=config_hash(cfg),
                       calib_date=plan.calib_date.isoformat(), filter=plan.filter, software_version=_version(),
                       validity=ValidityRule(days_before=validity_days_before, days_after=validity_days_after),
                       build_run_id=run_id)
    try:
        # process: one mapped task per (exposure, detector)
        pairs = [(e, d) for e in plan.exposures for d in plan.detectors]
        futures = [process_exposure_detector.submit(ctx, e, d) for e, d in pairs]
        processed = [f.result() for f in futures]
        reused = sum(p["reused"] for p in processed)
        log.info("processed %d (exposure, detector) pairs, %d reused from an earlier run", len(processed), reused)
        per_det = {d: [p for p in processed if p["detector"] == d] for d in plan.detectors}

        # scale: the barrier (flat: CCD x exposure scale solve over the whole matrix)
        exp_scales = ccd_scales = None
        if calib_type == "flat":
            import numpy as np

            levels = np.array([[next(p["level"] for p in per_det[d] if p["exposure_id"] == e)
                                for e in plan.exposure_ids] for d in plan.detectors], dtype=float)
            weights = (np.array([[next(p["npoint"] for p in per_det[d] if p["exposure_id"] == e)
                                  for e in plan.exposure_ids] for d in plan.detectors], dtype=float)
                       if cfg.weighted else None)
            scales = solve_flat_scales(levels, iterations=cfg.iterations, weights=weights)
            exp_scales = [float(s) for s in scales.exp_scales]
            ccd_scales = {d: float(c) for d, c in zip(plan.detectors, scales.ccd_scales)}

        # combine + write, one task per detector
        combos = [combine_detector.submit(ctx, d, sorted(per_det[d], key=lambda p: plan.exposure_ids.index(p["exposure_id"])),
                                          plan.exposures, exp_scales, None if ccd_scales is None else ccd_scales[d],
                                          plan.dropped) for d in plan.detectors]
        products = [c.result() for c in combos]
    except BaseException as exc:
        finish_build_run(registry, run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    created = sum(p["created"] for p in products)
    summary = _report(ctx, plan, products, store)
    finish_build_run(registry, run_id, "completed", f"{created} new products, {len(products) - created} existing")
    return {"calib_type": calib_type, "products": products, "created": created, "calib_date": ctx.calib_date,
            "filter": plan.filter, "dropped": plan.dropped, "mosaic_png": summary}


def _report(ctx: BuildContext, plan, products: list[dict], store: Datastore) -> str:
    """Camera mosaic (FITS + PNG) and Prefect artifacts: a table per detector and the picture."""
    camera = load_camera(ctx.camera)
    images = {p["detector"]: read_product(p["path"])[0] for p in products}
    nx = min(camera.detector(d).nx for d in images)
    binning = max(1, nx // 64)
    mosaic = camera_mosaic(camera, images, binning=binning)
    stem = f"{ctx.calib_type}-{ctx.camera}-{ctx.filter}-{ctx.calib_date}".replace("/", "_")
    folder = store.root / "calib" / ctx.camera / ctx.calib_type
    png = folder / f"{stem}-mosaic.png"
    write_mosaic(mosaic, camera, binning, fits_path=folder / f"{stem}-mosaic.fits", png_path=png,
                 title=f"{ctx.calib_type} {ctx.filter} {ctx.calib_date}")
    rows = [{"detector": p["detector"], "calib_id": p["calib_id"], "inputs used": p["stats"].get("n_used"),
             "rejected": p["stats"].get("n_rejected"), "level": round(p["stats"].get("level", float("nan")), 5),
             "noise": round(p["stats"].get("noise", float("nan")), 5),
             "clipped fraction": round(p["stats"].get("clipped_fraction", float("nan")), 4)} for p in products]
    key = f"{ctx.calib_type}-{ctx.camera}-{ctx.calib_date}".lower().replace("_", "-").replace("/", "-")
    try:
        create_table_artifact(rows, key=key[:100], description=f"{ctx.calib_type} build {ctx.calib_date}")
        create_markdown_artifact(f"## {ctx.calib_type} {ctx.filter} {ctx.calib_date}\n\n![mosaic]({png.as_uri()})\n\n"
                                 f"Mosaic FITS and PNG: `{png.parent}`", key=f"{key}-mosaic"[:100])
    except Exception as exc:  # artifacts are a convenience; never fail a build on them
        get_run_logger().warning("could not create artifacts: %s", exc)
    return str(png)
