"""Prefect tasks of a calib build: thin adapters over calib_core.

Each task receives ids and paths (never pixels), loads what it needs, calls calib_core, writes its
output through the datastore, records it in the registry and returns a small record
(:mod:`calib_core.records`: what each field means). Transient failures
(I/O errors) are retried with backoff; deterministic bad data (unreadable raw, inconsistent calib)
fails at once with the file named.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import threading
from functools import lru_cache

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calib_core.buildplan import intermediate_key
from calib_core.builds.bias_dark_flat import background_level
from calib_core.builds.calibtypes import CalibType
from calib_core.builds.calibtypes import calib_type as spec_of
from calib_core.camera import Camera
from calib_core.errors import is_retryable
from calib_core.io.atomic import private_name
from calib_core.io.productmeta import write_calib_product
from calib_core.io.products import provenance_cards, read_calib, read_product, write_hdulist, write_product
from calib_core.io.raw import RawFile, RawReadError, read_raw
from calib_core.isr.process import IsrError
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.quality.verify import ScreenConfig, TestFrame, VerifyConfig, VerifyInputs, screen_input
from calib_core.records import BuiltProduct, CalibProduct, Exposure, ProcessedInput, SkyResidual
from calib_core.repository import (CalibInput, Datastore, Registry, ValidityRule, calib_digest, explain_lookup,
                                   find_calib, is_transient, make_calib_id, note_transient, record_calib, sha256_file,
                                   verify_raw)
from calib_core.science import find_isr_calibs, readout_keys
from calib_core.sky.frames import bin_detector
from calib_core.stats.background import BackgroundModel
from tasks.allocator import tune_allocator

__all__ = ["BuildContext", "process_detectors", "process_exposure_detector", "sky_rebin",
           "combine_detector", "existing_products"]



class BuildContext(BaseModel):
    """What every task of one build needs, small enough to ship to any worker."""

    repo: str
    registry_url: str
    camera: str                         # the camera's name in the registry
    camera_hash: str = ""               # its definition's content hash (product identity, resume key)
    calib_type: str
    config: dict
    config_hash: str
    calib_date: str
    filter: str
    software_version: str
    validity: ValidityRule = ValidityRule()
    build_run_id: int | None = None
    on_bad_input: str = "fail"          # or "exclude": drop an unreadable exposure and record why
    verify_raws: str = "auto"           # "always": hash every raw read, not only those whose size or mtime changed
    verify: dict = {}                   # VerifyConfig: the gate's thresholds and the screening (not part of identity)
    lookup_token: str = ""              # one per build: its ISR calib lookups are made once (see _isr_calibs)

    @property
    def spec(self) -> CalibType:
        return spec_of(self.calib_type)

    def cfg(self):
        return self.spec.config_model.model_validate(self.config)

    def verify_cfg(self) -> VerifyConfig:
        return VerifyConfig.model_validate(self.verify)

    def screen_cfg(self) -> ScreenConfig:
        return self.verify_cfg().screen


@lru_cache(maxsize=8)
def _registry(url: str) -> Registry:
    return Registry.open(url)


def build_camera(ctx: BuildContext) -> Camera:
    """The build's camera: the definition the registry holds under its name (as ingested), which must
    still be the one the build started with."""
    return _stored_camera(ctx.registry_url, ctx.camera, ctx.camera_hash)


@lru_cache(maxsize=16)
def _stored_camera(url: str, name: str, digest: str) -> Camera:
    cam = _registry(url).stored_camera(name)
    if cam is None:
        raise ValueError(f"camera {name!r} is not in the registry {url}")
    if digest and cam.content_hash != digest:
        raise ValueError(f"camera {name!r} was updated in the registry while this build ran "
                         f"({digest[:12]} -> {cam.content_hash[:12]}); rerun the build")
    return cam


def _transient_only(task, task_run, state) -> bool:
    """Retry what :func:`calib_core.errors.is_retryable` says can succeed later (I/O errors, transient
    database errors, :class:`~calib_core.errors.TransientError`), never bad data."""
    try:
        state.result()
    except Exception as exc:
        if not is_retryable(exc):
            return False
        if is_transient(exc):
            note_transient(exc, f"task {task_run.name}", 0)
        return True
    return False


def _logger():
    """The task's Prefect logger, or a plain one when the task function runs outside Prefect."""
    try:
        return get_run_logger()
    except Exception:
        import logging

        return logging.getLogger("calibflow.tasks")


#: (build's lookup token, exposure, detector) -> the ISR calibs found; a build asks the same question
#: for each (exposure, detector) when it plans (product identity), processes and combines
_ISR_CALIBS: dict[tuple[str, str, int], dict[str, CalibProduct]] = {}
_ISR_CALIBS_LOCK = threading.Lock()
_ISR_CALIBS_MAX = 200_000


def _isr_calibs(ctx: BuildContext, registry: Registry, exposure_id: str, detector: int) -> dict[str, CalibProduct]:
    """The certified calibs the type's ISR applies (the registry lookup, as any later reduction).

    Within one build (its ``lookup_token``) the answer is looked up once per (exposure, detector) and
    kept in this process: the ISR calibs are products of other types, so every step of the build
    applies the same ones, as its product identity records, even if one of them is certified or
    replaced while the build runs."""
    key = (ctx.lookup_token, exposure_id, detector)
    if ctx.lookup_token:
        with _ISR_CALIBS_LOCK:
            found = _ISR_CALIBS.get(key)
        if found is not None:
            return found
    found = find_isr_calibs(registry, ctx.camera, exposure_id, detector, ctx.cfg().isr, ctx.spec.isr_calibs,
                            readout=readout_keys(build_camera(ctx)),
                            purpose=f"{ctx.calib_type} build")
    if ctx.lookup_token:
        with _ISR_CALIBS_LOCK:
            if len(_ISR_CALIBS) >= _ISR_CALIBS_MAX:
                _ISR_CALIBS.clear()
            _ISR_CALIBS[key] = found
    return found


def _work_dir(ctx: BuildContext, store: Datastore):
    return store.root / "work" / ctx.camera / ctx.calib_type


def _detector_span(detectors) -> str:
    detectors = list(detectors)
    return f"det{detectors[0]}" if len(detectors) == 1 else f"det{detectors[0]}-{detectors[-1]}"


def _process_run_name(parameters: dict) -> str:
    return f"process-{parameters['exposure'].exposure_id}-{_detector_span(parameters['detectors'])}"


def _rebin_run_name(parameters: dict) -> str:
    items = parameters["items"]
    return f"sky-pass{parameters['k']}-{items[0].exposure_id}-{_detector_span(i.detector for i in items)}"


@task(name="process", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_only,
      cache_policy=NO_CACHE, task_run_name=_process_run_name)
def process_detectors(ctx: BuildContext, exposure: Exposure, detectors: list[int]) -> list[ProcessedInput]:
    """:func:`process_exposure_detector` for some detectors of one exposure: the unit of work the flow
    maps. Several detectors per task keep Prefect's per-task cost small beside the pixel work; a
    retry redoes only the detectors whose intermediate is not yet written."""
    tune_allocator()        # once per worker process (threads, processes, a Dask worker)
    with _OneOpen(exposure.path) as raw:
        return [process_exposure_detector(ctx, exposure, d, raw) for d in detectors]


class _OneOpen:
    """The task's raw file, opened (headers parsed) at the first detector that needs its pixels and
    kept for the others: not once per detector. A file that cannot be opened gives each detector
    that asks the same error."""

    def __init__(self, path: str):
        self.path = path
        self._file: RawFile | None = None
        self._error: RawReadError | None = None

    def detector(self, camera, detector: int):
        if self._file is None and self._error is None:
            try:
                self._file = RawFile(self.path, camera)
            except RawReadError as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._file.detector(detector)

    def __enter__(self) -> "_OneOpen":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


def process_exposure_detector(ctx: BuildContext, exposure: Exposure, detector: int,
                              raw_file: _OneOpen | None = None) -> ProcessedInput:
    """ISR and the type's preparation of one (exposure, detector); the intermediate goes to the datastore.

    Resume: the intermediate is keyed on the raw checksum, the config hash and the ISR calibs used; an
    existing one is reused and the work skipped. Its record, less ``reused`` and ``screened``, is the
    ``.json`` beside it.
    """
    registry = _registry(ctx.registry_url)
    store = Datastore(ctx.repo)
    calibs = _isr_calibs(ctx, registry, exposure.exposure_id, detector)
    key = intermediate_key(exposure.checksum, ctx.config_hash, [c.calib_id for c in calibs.values()],
                           ctx.camera_hash)
    out = store.inside(store.root / "work" / ctx.camera / ctx.calib_type
                       / f"{exposure.exposure_id}-det{detector:03d}-{key}.fits")
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        try:
            done = ProcessedInput.model_validate_json(meta.read_text())
        except ValueError as exc:
            raise ValueError(f"{meta}: not a processed-input record ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}); delete it to redo the work") from None
        return _screened(ctx, registry, exposure, detector, done.model_copy(update={"reused": True}))

    camera = build_camera(ctx)
    try:
        # the registered checksum is the raw's identity: a file changed since ingest is bad input
        verify_raw(exposure.path, exposure.checksum, exposure.size_bytes, exposure.ingested_at,
                   always=ctx.verify_raws == "always")
        raw = (raw_file.detector(camera, detector) if raw_file is not None
               else read_raw(exposure.path, camera, [detector]).detectors[detector])
        mi, result, done_variance = _process_pixels(ctx, camera, raw, exposure, detector, calibs, out)
    except (RawReadError, IsrError) as exc:
        if not isinstance(exc, RawReadError):      # bad pixels (no usable overscan, ...): name file and exposure
            exc = RawReadError(exposure.path, f"exposure {exposure.exposure_id} detector {detector}: "
                                                 + str(exc).removeprefix(f"{exposure.path}: "))
        if ctx.on_bad_input == "exclude":      # deterministic: excluded and recorded, never retried
            return ProcessedInput(exposure_id=exposure.exposure_id, detector=detector, error=str(exc))
        raise exc from None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_product(out, mi, {"EXPID": exposure.exposure_id, "DETECTOR": detector, "OBSTYPE": "postisr"},
                  unit=ctx.spec.intermediate_unit, compact_mask=True, variance=done_variance)
    store.atomic_write_bytes(meta, result.model_dump_json(exclude={"reused", "screened"}).encode())
    return _screened(ctx, registry, exposure, detector, result, mi)


def last_good_master(ctx: BuildContext, registry: Registry, exposure_id: str, detector: int) -> CalibProduct | None:
    """The certified product of the build's own type that applies to the exposure and was made
    before this build's calib date (never one of this night's: a rerun then screens and judges as
    the first run did), by the lookup rules."""
    rows = explain_lookup(registry, camera=ctx.camera, exposure_id=exposure_id, calib_type=ctx.calib_type,
                          detector=detector, readout_keys=readout_keys(build_camera(ctx)))
    before = sorted((r for r in rows if r["eligible"] and r["_row"].calib_date < ctx.calib_date),
                    key=lambda r: r["_key"])
    return before[0]["_row"] if before else None


def _screened(ctx: BuildContext, registry: Registry, exposure: Exposure, detector: int, result: ProcessedInput,
              mi=None) -> ProcessedInput:
    """``result`` with ``screened`` (why the input must not be stacked) when it fails the input
    screening against the last good master (docs/algorithms.md#input-screening)."""
    if not ctx.spec.screen_inputs or not ctx.screen_cfg().enabled:
        return result
    master = last_good_master(ctx, registry, exposure.exposure_id, detector)
    if mi is None:
        mi = read_product(result.path)[0]
    why = screen_input(ctx.calib_type, mi, read_calib(master.path) if master else None, ctx.screen_cfg())
    if why:
        return result.model_copy(update={"screened": f"detector {detector}: {why}"
                                          + (f" (master {master.calib_id})" if master and "master" in why else "")})
    return result


def _process_pixels(ctx: BuildContext, camera, raw, exposure: Exposure, detector: int,
                    calibs: dict[str, CalibProduct], out) -> tuple[MaskedImage, ProcessedInput, bool]:
    """The type's processing of one raw detector (:attr:`CalibType.process`): (the image, its
    record with the type's scalars, whether its intermediate keeps the variance plane:
    ``Processed.variance``); its side products are written next to the intermediate
    (``<stem>-<suffix>.fits``) and their paths recorded. A scalar or side product the record does
    not know fails here, naming it."""
    done = ctx.spec.process(raw, calibs, exposure, ctx.cfg(), camera, detector)
    fields = dict(done.scalars)
    for key, (suffix, hdulist) in done.sidecars.items():
        side = out.with_name(f"{out.stem}-{suffix}.fits")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_hdulist(side, hdulist)
        fields[key] = str(side)
    unknown = sorted(set(fields) - set(ProcessedInput.model_fields))
    if unknown:
        raise TypeError(f"{ctx.calib_type} processing returned {unknown}, which ProcessedInput "
                        "(calib_core/records.py) has no field for")
    result = ProcessedInput(exposure_id=exposure.exposure_id, detector=detector, path=str(out),
                            isr_calibs={t: c.calib_id for t, c in calibs.items()}, pid=os.getpid(), **fields)
    return done.image, result, done.variance


@task(name="sky-pass", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_only,
      cache_policy=NO_CACHE, task_run_name=_rebin_run_name)
def sky_rebin(ctx: BuildContext, items: list[ProcessedInput], k: int, model: dict) -> list[ProcessedInput]:
    """Pass ``k`` of the sky build for some detectors of one exposure: objects masked again on the
    post-ISR image minus the previous pass's sky ``L * (1 + F)``, and the binned model re-measured.

    ``model`` holds the paths of the previous pass's surface of this exposure (pickled
    :class:`~calib_core.sky.frames.SkySurface`) and frame of each detector, and a digest of both (the
    output name, so a resumed build reuses what it already measured)."""
    tune_allocator()
    store = Datastore(ctx.repo)
    camera = build_camera(ctx)
    cfg = ctx.cfg().pass_config(k)
    with open(model["surface"], "rb") as fh:
        surface = pickle.load(fh)
    out_items = []
    for it in items:
        d = it.detector
        out = store.inside(_work_dir(ctx, store) / f"{it.exposure_id}-det{d:03d}-bins{k}-{model['digest']}.fits")
        if not out.exists():
            mi = read_product(it.path)[0]
            frame = BackgroundModel.from_fits(model["frames"][str(d)])
            pattern = surface.on_detector(camera, camera.detector(d)) * (1.0 + frame.evaluate())
            # the intermediate keeps no variance plane where its median was recorded (Processed.variance)
            write_hdulist(out, bin_detector(camera, d, mi, cfg, pattern, it.variance_median).to_hdulist())
        out_items.append(it.model_copy(update={"bins": str(out)}))
    return out_items


def _identity(ctx: BuildContext, registry: Registry, exposures: list[Exposure], detector: int, excluded=()
              ) -> tuple[str, dt.date, set[str]]:
    """(digest of the inputs, config, ISR calibs and inputs excluded as bad; calib date; the ISR calib
    ids): with camera, type, filter and detector, what makes two products the same. The ISR calibs
    are those the registry lookup gives each exposure's ``detector`` (as the process step uses)."""
    isr_ids = {c.calib_id for e in exposures
               for c in _isr_calibs(ctx, registry, e.exposure_id, detector).values()}
    digest = calib_digest([(e.exposure_id, e.checksum) for e in exposures], ctx.config_hash, isr_ids,
                          camera_hash=ctx.camera_hash, excluded=excluded)
    return digest, dt.date.fromisoformat(ctx.calib_date), isr_ids


def _find_identical(registry: Registry, ctx: BuildContext, detector: int, digest: str, calib_date: dt.date):
    return find_calib(registry, camera=ctx.camera, calib_type=ctx.calib_type, filter=ctx.filter, detector=detector,
                      calib_date=calib_date, digest=digest)


def existing_products(registry: Registry, ctx: BuildContext, exposures: list[Exposure], detectors: list[int]
                      ) -> dict[int, CalibProduct]:
    """Products an identical earlier build made (same inputs, config and ISR calibs), by detector."""
    found = {}
    for d in detectors:
        hit = _find_identical(registry, ctx, d, *_identity(ctx, registry, exposures, d)[:2])
        if hit:
            found[d] = hit
    return found


@task(name="combine", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_only,
      cache_policy=NO_CACHE, task_run_name="combine-det{detector}")
def combine_detector(ctx: BuildContext, detector: int, items: list[ProcessedInput] | list[SkyResidual],
                     exposures: list[Exposure],
                     exp_scales: list[float] | None = None, ccd_scale: float | None = None,
                     dropped: dict[str, str] | None = None, excluded: list[str] | None = None) -> BuiltProduct:
    """Combine one detector's intermediates, write the product atomically and register it with every input.

    ``excluded``: exposures left out as bad input (unreadable or changed raws); they change the
    product's identity, so the product of a repaired set is a different one."""
    tune_allocator()
    registry = _registry(ctx.registry_url)
    store = Datastore(ctx.repo)
    by_id = {e.exposure_id: e for e in exposures}
    digest, calib_date, isr_ids = _identity(ctx, registry, exposures, detector, excluded or ())
    used = {c for i in items for c in i.isr_calibs.values()}
    if not used <= isr_ids:
        raise ValueError(f"detector {detector}: the certified calibs changed while this {ctx.calib_type} build "
                         f"ran (inputs processed with {sorted(used - isr_ids)}, no longer certified); rerun "
                         "the build")
    existing = _find_identical(registry, ctx, detector, digest, calib_date)
    if existing:
        return BuiltProduct.of(existing, created=False)

    cfg = ctx.cfg()
    paths = [i.path for i in items]
    ids = [i.exposure_id for i in items]
    if ctx.spec.barrier == "sky_passes":   # scales: each exposure's sky level (recorded, already divided out)
        exp_scales = [i.scale for i in items]
    calib_id = make_calib_id(ctx.calib_type, ctx.camera, ctx.filter, calib_date, detector, digest)
    dates = [dt.datetime.fromisoformat(by_id[e].date_obs) for e in ids]
    cards = provenance_cards(ctx.calib_type, {"calib_id": calib_id, "detector": detector, "filter": ctx.filter,
                                              "calibDate": ctx.calib_date}, ids, dates,
                             [by_id[e].exptime for e in ids], exptime=ctx.spec.product_exptime)
    cards.update({"CAMERA": ctx.camera, "DETECTOR": detector, "FILTER": ctx.filter, "CALIBDATE": ctx.calib_date,
                  "CFG_HASH": ctx.config_hash, "CF_VERS": ctx.software_version,
                  "CAM_HASH": (ctx.camera_hash[:16], "sha256 of the camera definition (first 16)")})
    for i, c in enumerate(sorted(isr_ids)):
        cards[f"CALIB_ISR_{i}"] = c
    if exp_scales is not None:
        # CALIB_INPUT_SCALE_n is the scale of CALIB_INPUT_n (inputs sorted by id, as provenance_cards
        # numbers them); the exposure's name used to be in the comment, cut by the 80-column card
        for n, k in enumerate(sorted(range(len(ids)), key=lambda k: str(ids[k]))):
            cards[f"CALIB_INPUT_SCALE_{n}"] = (float(exp_scales[k]), f"scale of CALIB_INPUT_{n}")
    if ccd_scale is not None:
        cards["CCDSCALE"] = float(ccd_scale)
    final = store.inside(store.root / "calib" / ctx.camera / ctx.calib_type / f"{calib_id}.fits")
    final.parent.mkdir(parents=True, exist_ok=True)
    # Our copy is written under a private name (path); record_calib renames it into place only if this
    # run registers the product. A concurrent identical build may register first: its file stays.
    path = private_name(final, "pending")
    try:
        if ctx.spec.combine is None:
            # sky: the frame was solved at the build's barrier over the whole focal plane (surfaces,
            # rejection, average, normalisation); here it is written and registered
            frame = BackgroundModel.from_fits(items[0].frame)
            write_calib_product(path, "sky", frame, cards, build_camera(ctx), detector)
            stats = {"warning": items[0].warning or None, **_sky_stats(frame, len(items), len(dropped or {}))}
            verification = _verify(ctx, registry, detector, frame, items, by_id)
        else:
            context = {}
            if ctx.spec.combine_context:
                context = {"items": items, "camera": build_camera(ctx), "detector": detector,
                           "calib_date": calib_date}
            combined = ctx.spec.combine(paths, cfg, exp_scales, ccd_scale, **context)
            if combined.warning:
                _logger().warning("detector %d: %s", detector, combined.warning)
            mi = combined.image
            write_calib_product(path, ctx.calib_type, mi, {**cards, **combined.cards}, build_camera(ctx), detector,
                                extra_hdus=combined.extra_hdus)
            for suffix, draw in combined.pictures.items():
                # beside the product, named after it; an identical concurrent build draws the same
                picture = final.with_name(f"{calib_id}-{suffix}.png")
                tmp_png = private_name(picture, "tmp", ".png")
                draw(tmp_png)
                os.replace(tmp_png, picture)
                combined.stats[f"{suffix}_png"] = str(picture)
            level = background_level(mi)
            flagged = (mi.mask & MASK_PLANES.bits(["BAD", "NO_DATA"])) != 0
            stats = {"level": float(level.mean), "noise": float(np.sqrt(max(level.variance, 0.0))),
                     "clipped_fraction": float(1.0 - level.n_used / max(level.npoint, 1)),
                     "bad_fraction": float(flagged.mean()), **combined.stats}
            verification = _verify(ctx, registry, detector, mi, items, by_id)
        stats.update(n_used=len(items), n_rejected=len(dropped or {}), isr_calibs=sorted(isr_ids))
        readout = _readout(ctx, [by_id[e] for e in ids])
        if readout:
            stats["readout"] = readout
        inputs = [CalibInput(e, scale=None if exp_scales is None else float(exp_scales[i]))
                  for i, e in enumerate(ids)]
        inputs += [CalibInput(e, used=False, reason=why) for e, why in (dropped or {}).items()]
        row, created = record_calib(registry, camera=ctx.camera, calib_type=ctx.calib_type, filter=ctx.filter,
                                    detector=detector, calib_date=calib_date, path=str(final),
                                    checksum=sha256_file(path), config_hash=ctx.config_hash, digest=digest,
                                    software_version=ctx.software_version, inputs=inputs, validity=ctx.validity,
                                    build_run_id=ctx.build_run_id, stats=stats,
                                    publish=lambda: os.replace(path, final), camera_checksum=ctx.camera_hash or None,
                                    status="certified" if verification is None else "candidate",
                                    verification=None if verification is None else verification.to_dict(),
                                    metrics=None if verification is None else verification.metrics)
    finally:
        path.unlink(missing_ok=True)      # left when a concurrent identical build registered first, or on any error
    if not created:
        _logger().warning("detector %d: an identical %s was registered by a concurrent build while this "
                          "one was combining; keeping %s, discarding this copy", detector, ctx.calib_type,
                          row.calib_id)
    return BuiltProduct.of(row, created)


def _sky_stats(frame: BackgroundModel, n_used: int, n_rejected: int) -> dict:
    """A sky frame's row of statistics: median and robust scatter of its bins (the frame's noise:
    its bins' spread, as a bias's is its pixels'), the median error of a bin, and the share of its
    exposures the build rejected (a sky frame's clipped fraction)."""
    values = np.asarray(frame.values, np.float64)
    finite = np.isfinite(values)
    errors = np.asarray(frame.errors, np.float64) if frame.errors is not None else np.full(values.shape, np.nan)
    ok_err = finite & np.isfinite(errors)
    v = values[finite]
    return {"level": float(np.median(v)) if v.size else None,
            "noise": float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else None,
            "bin_error": float(np.median(errors[ok_err])) if ok_err.any() else None,
            "clipped_fraction": float(n_rejected / max(n_used + n_rejected, 1)),
            "bad_fraction": float(1.0 - finite.mean()) if finite.size else 1.0}


def _readout(ctx: BuildContext, exposures: list[Exposure]) -> dict:
    """The readout settings (docs/architecture.md#lookup-rules) the inputs share."""
    out = {}
    for k in readout_keys(build_camera(ctx)):
        values = {json.dumps(e.extra.get(k)) for e in exposures}
        if len(values) == 1:
            out[k] = exposures[0].extra.get(k)
    return out


def _verify(ctx: BuildContext, registry: Registry, detector: int, product,
            items: list[ProcessedInput] | list[SkyResidual], by_id: dict[str, Exposure]):
    """The type's verification of a new product (docs/algorithms.md#verification-before-certification),
    or None when the type has none or the gate is off. The test frame is the first input used."""
    cfg = ctx.verify_cfg()
    if ctx.spec.verify is None or not cfg.enabled:
        return None
    first = items[0]
    exposure = by_id[first.exposure_id]

    def test():
        raw = read_raw(exposure.path, build_camera(ctx), [detector]).detectors[detector]
        return TestFrame(read_product(first.path)[0], raw, exposure.darktime, exposure.exposure_id)

    def incumbent():
        master = last_good_master(ctx, registry, exposure.exposure_id, detector)
        return (read_product(master.path)[0], master.calib_id) if master else None

    result = ctx.spec.verify(product, VerifyInputs(cfg, test, incumbent))
    if not result.passed:
        _logger().warning("detector %d: the new %s fails verification: %s", detector, ctx.calib_type,
                          "; ".join(c.describe() for c in result.checks if not c.passed))
    return result
