"""Products in the registry: recording a calib with its inputs, validity ranges, certification, lookup.

A calib is identified by (camera, type, filter, detector, calib date, digest), where the digest is the
sha256 of its inputs (exposure ids and checksums) and its config hash: rebuilding with identical inputs
and config finds the existing record instead of creating a duplicate.

Concurrency: two identical builds may finish at the same moment. The identity's unique constraint is
the arbiter: ``record_calib`` inserts the row, then (still inside the transaction, holding the claim)
calls ``publish`` to put the product file in place, then commits. A concurrent identical insert waits
for that commit (PostgreSQL: the unique index; SQLite: the write lock, within the busy timeout) and
then fails on the constraint; ``record_calib`` turns that into ``created=False`` with the winner's
record, without calling its ``publish``. So exactly one file is published per product, and a committed
row always has its file in place.

Validity: each product gets ``[valid_begin, valid_end)`` from a :class:`ValidityRule` (calib date
minus N days to plus M days by default); ``certify`` edits it. ``lookup`` answers which certified calib
applies to an exposure: the one whose range contains the exposure's date, nearest in calib date, newest
on a tie. ISR inside later builds uses exactly this lookup.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import CalibInputRow, CalibRow, CameraRow, ExposureRow, Registry, RegistryError, _utc

__all__ = ["ValidityRule", "CalibInput", "calib_digest", "record_calib", "find_calib", "list_calibs",
           "certify", "lookup", "make_calib_id", "FILTERLESS_TYPES"]

FILTERLESS_TYPES = ("bias", "dark", "defects", "ptc")   # the calib types with CalibType.filtered False


class ValidityRule(BaseModel):
    """How long a new product is valid around its calib date."""

    days_before: float = Field(15.0, ge=0, description="valid from calib date minus this many days")
    days_after: float = Field(15.0, ge=0, description="valid until calib date plus this many days")

    def range_for(self, calib_date: dt.date) -> tuple[dt.datetime, dt.datetime]:
        noon = dt.datetime.combine(calib_date, dt.time(12), tzinfo=dt.timezone.utc)
        return noon - dt.timedelta(days=self.days_before), noon + dt.timedelta(days=self.days_after)


@dataclass
class CalibInput:
    exposure_id: str
    scale: float | None = None
    used: bool = True
    reason: str = ""


def calib_digest(inputs: list[tuple[str, str]], config_hash: str, isr_calibs=(), camera_hash: str = "",
                 excluded=()) -> str:
    """sha256 over sorted (exposure id, checksum) pairs, the config hash, the ids of the calibs
    the inputs' ISR used (a dark rebuilt after a new bias is certified is a different product), the
    camera definition's hash (a corrected camera file rebuilds) and the inputs excluded as bad input
    (a product of 4 of 5 inputs is not the product of all 5)."""
    content = {"inputs": sorted(inputs), "config": config_hash}
    if camera_hash:
        content["camera"] = camera_hash
    if isr_calibs:                 # absent for bias: digests of ISR-free products are unchanged
        content["isr"] = sorted(set(isr_calibs))
    if excluded:                   # absent when nothing was excluded: digests of full builds are unchanged
        content["excluded"] = sorted(set(excluded))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def make_calib_id(calib_type: str, camera: str, filter: str, calib_date: dt.date, detector: int,
                  digest: str) -> str:
    safe_filter = "".join(c if c.isalnum() or c in "-_" else "_" for c in filter)
    return f"{calib_type}-{camera}-{safe_filter}-{calib_date.isoformat()}-det{detector:03d}-{digest[:8]}"


def _calib_dict(row: CalibRow, camera: str) -> dict:
    return {
        "calib_id": row.calib_id, "type": row.calib_type, "camera": camera, "filter": row.filter,
        "detector": row.detector_number, "calib_date": row.calib_date.isoformat(),
        "valid_begin": _utc(row.valid_begin).isoformat() if row.valid_begin else None,
        "valid_end": _utc(row.valid_end).isoformat() if row.valid_end else None,
        "path": row.path, "n_inputs": row.n_inputs, "checksum": row.checksum, "status": row.status,
        "config_hash": row.config_hash, "software_version": row.software_version, "stats": row.stats,
        "camera_checksum": row.camera_checksum,
    }


def find_calib(registry: Registry, *, camera: str, calib_type: str, filter: str, detector: int,
               calib_date: dt.date, digest: str) -> dict | None:
    with registry.session() as s:
        q = (select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
             .where(CameraRow.name == camera, CalibRow.calib_type == calib_type, CalibRow.filter == filter,
                    CalibRow.detector_number == detector, CalibRow.calib_date == calib_date,
                    CalibRow.digest == digest))
        hit = s.execute(q).first()
        return _calib_dict(*hit) if hit else None


def record_calib(registry: Registry, *, camera: str, calib_type: str, filter: str, detector: int,
                 calib_date: dt.date, path: str, checksum: str, config_hash: str, digest: str,
                 software_version: str, inputs: list[CalibInput], validity: ValidityRule | None = None,
                 build_run_id: int | None = None, stats: dict | None = None,
                 publish: Callable[[], None] | None = None, camera_checksum: str | None = None
                 ) -> tuple[dict, bool]:
    """Register a product and every input (used or rejected, with scale and reason) in one transaction.

    Returns ``(record, created)``; an identical product (same identity and digest) already registered,
    or registered by a concurrent call while this one was running, is returned with ``created=False``
    and nothing is written.

    ``publish``, when given, puts the product file in place (typically ``os.replace(tmp, path)``). It is
    called only by the call that creates the record, after the row is inserted and before the commit;
    if it raises, nothing is recorded and the error propagates. See the module notes on concurrency.
    """
    identity = dict(camera=camera, calib_type=calib_type, filter=filter, detector=detector,
                    calib_date=calib_date, digest=digest)
    existing = find_calib(registry, **identity)
    if existing:
        return existing, False
    begin, end = (validity or ValidityRule()).range_for(calib_date)
    calib_id = make_calib_id(calib_type, camera, filter, calib_date, detector, digest)
    try:
        with registry.session() as s:
            cam = s.scalar(select(CameraRow).where(CameraRow.name == camera))
            if cam is None:
                raise RegistryError(f"camera {camera!r} is not in the registry")
            exps = {e.exposure_id: e for e in s.scalars(select(ExposureRow).where(
                ExposureRow.camera_id == cam.id, ExposureRow.exposure_id.in_([i.exposure_id for i in inputs])))}
            missing = sorted({i.exposure_id for i in inputs} - set(exps))
            if missing:
                raise RegistryError(f"inputs not in the registry: {', '.join(missing)}")
            row = CalibRow(calib_id=calib_id, camera_id=cam.id, calib_type=calib_type, filter=filter,
                           detector_number=detector, calib_date=calib_date, valid_begin=begin, valid_end=end,
                           path=str(path), checksum=checksum, config_hash=config_hash, digest=digest,
                           software_version=software_version, build_run_id=build_run_id, status="certified",
                           n_inputs=sum(1 for i in inputs if i.used), stats=stats or {},
                           camera_checksum=camera_checksum, created_at=dt.datetime.now(dt.timezone.utc))
            s.add(row)
            s.flush()           # claims the identity: a concurrent identical insert now waits for us
            for inp in inputs:
                s.add(CalibInputRow(calib_pk=row.id, exposure_pk=exps[inp.exposure_id].id, scale=inp.scale,
                                    used=inp.used, reason=inp.reason))
            s.flush()
            if publish is not None:
                publish()
            record = _calib_dict(row, camera)
    except IntegrityError as exc:
        # a concurrent identical registration committed first (the transaction is rolled back)
        existing = find_calib(registry, **identity)
        if existing:
            return existing, False
        raise RegistryError(f"cannot register {calib_id}: {exc.orig}") from None
    return record, True


def list_calibs(registry: Registry, *, calib_type: str | None = None, camera: str | None = None,
                detector: int | None = None, filter: str | None = None) -> list[dict]:
    with registry.session() as s:
        q = select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
        if calib_type:
            q = q.where(CalibRow.calib_type == calib_type)
        if camera:
            q = q.where(CameraRow.name == camera)
        if detector is not None:
            q = q.where(CalibRow.detector_number == detector)
        if filter:
            q = q.where(CalibRow.filter == filter)
        q = q.order_by(CalibRow.calib_type, CalibRow.calib_date, CalibRow.detector_number, CalibRow.id)
        return [_calib_dict(row, cam) for row, cam in s.execute(q)]


def calib_inputs(registry: Registry, calib_id: str) -> list[dict]:
    with registry.session() as s:
        q = (select(CalibInputRow, ExposureRow.exposure_id).join(CalibRow, CalibInputRow.calib_pk == CalibRow.id)
             .join(ExposureRow, CalibInputRow.exposure_pk == ExposureRow.id).where(CalibRow.calib_id == calib_id)
             .order_by(ExposureRow.exposure_id))
        return [{"exposure_id": e, "scale": r.scale, "used": r.used, "reason": r.reason} for r, e in s.execute(q)]


def certify(registry: Registry, calib_id: str, begin: dt.datetime, end: dt.datetime | None) -> dict:
    """Set the validity range of a product (``end=None``: open-ended) and mark it certified."""
    if end is not None and end <= begin:
        raise RegistryError(f"validity end {end.isoformat()} is not after begin {begin.isoformat()}")
    with registry.session() as s:
        hit = s.execute(select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
                        .where(CalibRow.calib_id == calib_id)).first()
        if hit is None:
            raise RegistryError(f"no calib {calib_id!r} in the registry (see `calibflow calibs`)")
        row, cam = hit
        row.valid_begin, row.valid_end, row.status = begin, end, "certified"
        s.flush()
        return _calib_dict(row, cam)


def lookup(registry: Registry, *, camera: str, exposure_id: str, calib_type: str,
           detector: int | None = None) -> list[dict]:
    """The certified calib(s) of ``calib_type`` that apply to an exposure, one per detector.

    Filter must match the exposure's (bias and dark are filterless); the exposure date must lie in
    ``[valid_begin, valid_end)``; among candidates the nearest calib date wins, then the newest.
    """
    with registry.session() as s:
        exp = s.scalar(select(ExposureRow).join(CameraRow, ExposureRow.camera_id == CameraRow.id)
                       .where(CameraRow.name == camera, ExposureRow.exposure_id == exposure_id))
        if exp is None:
            raise RegistryError(f"no exposure {exposure_id!r} of camera {camera!r} in the registry")
        when = _utc(exp.date_obs)
        filt = "NONE" if calib_type in FILTERLESS_TYPES else exp.filter
        q = (select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
             .where(CameraRow.name == camera, CalibRow.calib_type == calib_type, CalibRow.filter == filt,
                    CalibRow.status == "certified"))
        if detector is not None:
            q = q.where(CalibRow.detector_number == detector)
        best: dict[int, tuple] = {}
        for row, cam in s.execute(q):
            begin = _utc(row.valid_begin) if row.valid_begin else None
            end = _utc(row.valid_end) if row.valid_end else None
            if begin is None or when < begin or (end is not None and when >= end):
                continue
            key = (abs((row.calib_date - exp.night).days), -row.created_at.timestamp(), -row.id)
            if row.detector_number not in best or key < best[row.detector_number][0]:
                best[row.detector_number] = (key, _calib_dict(row, cam))
        return [best[d][1] for d in sorted(best)]
