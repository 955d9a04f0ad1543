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
applies to an exposure by explicit rules (:func:`explain_lookup` says, for every product of the type,
why it was or was not chosen; docs/architecture.md#lookup-rules). ISR inside later builds uses
exactly this lookup.

Status (docs/architecture.md#verification-and-certification): a build registers its products as
``candidate`` with their verification; :func:`settle_candidates` certifies those that passed.
:func:`certify` (``force`` for a failed one) and :func:`decertify` are a person's decisions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, Field
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from calib_core.records import CalibProduct
from calib_core.repository.registry import (CalibInputRow, CalibMetricRow, CalibRow, CameraRow, ExposureRow, Registry,
                                            RegistryError, _utc)

__all__ = ["ValidityRule", "CalibInput", "calib_digest", "record_calib", "find_calib", "list_calibs",
           "certify", "decertify", "settle_candidates", "lookup", "explain_lookup", "overlapping",
           "calib_metrics", "make_calib_id", "FILTERLESS_TYPES", "STATUSES"]

#: a product's states: registered and not used by lookup / in use / withdrawn by a person (the
#: record's field states them)
STATUSES: tuple[str, ...] = typing.get_args(CalibProduct.model_fields["status"].annotation)

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


def _calib_record(row: CalibRow, camera: str) -> CalibProduct:
    return CalibProduct(
        calib_id=row.calib_id, type=row.calib_type, camera=camera, filter=row.filter,
        detector=row.detector_number, calib_date=row.calib_date.isoformat(),
        valid_begin=_utc(row.valid_begin).isoformat() if row.valid_begin else None,
        valid_end=_utc(row.valid_end).isoformat() if row.valid_end else None,
        path=row.path, n_inputs=row.n_inputs, checksum=row.checksum, status=row.status,
        config_hash=row.config_hash, software_version=row.software_version, stats=row.stats,
        camera_checksum=row.camera_checksum, verification=row.verification,
        status_note=row.status_note or "", created_at=_utc(row.created_at).isoformat(),
        status_changed_at=_utc(row.status_changed_at).isoformat() if row.status_changed_at else None,
    )


def find_calib(registry: Registry, *, camera: str, calib_type: str, filter: str, detector: int,
               calib_date: dt.date, digest: str) -> CalibProduct | None:
    with registry.session() as s:
        q = (select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
             .where(CameraRow.name == camera, CalibRow.calib_type == calib_type, CalibRow.filter == filter,
                    CalibRow.detector_number == detector, CalibRow.calib_date == calib_date,
                    CalibRow.digest == digest))
        hit = s.execute(q).first()
        return _calib_record(*hit) if hit else None


def record_calib(registry: Registry, *, camera: str, calib_type: str, filter: str, detector: int,
                 calib_date: dt.date, path: str, checksum: str, config_hash: str, digest: str,
                 software_version: str, inputs: list[CalibInput], validity: ValidityRule | None = None,
                 build_run_id: int | None = None, stats: dict | None = None,
                 publish: Callable[[], None] | None = None, camera_checksum: str | None = None,
                 status: str = "certified", verification: dict | None = None,
                 metrics: dict[str, dict[str, float | None]] | None = None) -> tuple[CalibProduct, bool]:
    """Register a product and every input (used or rejected, with scale and reason) in one transaction.

    Returns ``(record, created)``; an identical product (same identity and digest) already registered,
    or registered by a concurrent call while this one was running, is returned with ``created=False``
    and nothing is written.

    ``publish``, when given, puts the product file in place (typically ``os.replace(tmp, path)``). It is
    called only by the call that creates the record, after the row is inserted and before the commit;
    if it raises, nothing is recorded and the error propagates. See the module notes on concurrency.

    ``status``: ``certified`` for a caller that decided (the default of this library call);
    the build flows register ``candidate`` with their ``verification`` and certify with
    :func:`settle_candidates`. ``metrics`` (``{amp: {metric: value}}``) go to the ``calib_metric`` table.
    """
    if status not in STATUSES:
        raise RegistryError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
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
                           software_version=software_version, build_run_id=build_run_id, status=status,
                           n_inputs=sum(1 for i in inputs if i.used), stats=stats or {},
                           camera_checksum=camera_checksum, created_at=dt.datetime.now(dt.timezone.utc),
                           verification=verification, status_note="",
                           status_changed_at=dt.datetime.now(dt.timezone.utc) if status == "certified" else None)
            s.add(row)
            s.flush()           # claims the identity: a concurrent identical insert now waits for us
            _add_metrics(s, row.id, metrics)
            for inp in inputs:
                s.add(CalibInputRow(calib_pk=row.id, exposure_pk=exps[inp.exposure_id].id, scale=inp.scale,
                                    used=inp.used, reason=inp.reason))
            s.flush()
            if publish is not None:
                publish()
            record = _calib_record(row, camera)
    except IntegrityError as exc:
        # a concurrent identical registration committed first (the transaction is rolled back)
        existing = find_calib(registry, **identity)
        if existing:
            return existing, False
        raise RegistryError(f"cannot register {calib_id}: {exc.orig}") from None
    return record, True


def _finite(value) -> float | None:
    """A metric as stored: a finite float, or None (not finite, not measured)."""
    import math

    return None if value is None or not math.isfinite(float(value)) else float(value)


def _add_metrics(s, calib_pk: int, metrics: dict | None) -> None:
    for amp, values in (metrics or {}).items():
        for name, value in values.items():
            if value is not None and not isinstance(value, (int, float)):
                continue
            s.add(CalibMetricRow(calib_pk=calib_pk, amp=str(amp)[:32], metric=str(name)[:64], value=_finite(value)))


def _where_calib(q, calib_type, camera, detector, filter):
    """``q`` (joined to CalibRow and CameraRow) narrowed to the given type, camera, detector, filter."""
    if calib_type:
        q = q.where(CalibRow.calib_type == calib_type)
    if camera:
        q = q.where(CameraRow.name == camera)
    if detector is not None:
        q = q.where(CalibRow.detector_number == detector)
    if filter:
        q = q.where(CalibRow.filter == filter)
    return q


def list_calibs(registry: Registry, *, calib_type: str | None = None, camera: str | None = None,
                detector: int | None = None, filter: str | None = None, status: str | None = None
                ) -> list[CalibProduct]:
    with registry.session() as s:
        q = _where_calib(select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id),
                         calib_type, camera, detector, filter)
        if status:
            q = q.where(CalibRow.status == status)
        q = q.order_by(CalibRow.calib_type, CalibRow.calib_date, CalibRow.detector_number, CalibRow.id)
        return [_calib_record(row, cam) for row, cam in s.execute(q)]


def calib_inputs(registry: Registry, calib_id: str) -> list[dict]:
    with registry.session() as s:
        q = (select(CalibInputRow, ExposureRow.exposure_id).join(CalibRow, CalibInputRow.calib_pk == CalibRow.id)
             .join(ExposureRow, CalibInputRow.exposure_pk == ExposureRow.id).where(CalibRow.calib_id == calib_id)
             .order_by(ExposureRow.exposure_id))
        return [{"exposure_id": e, "scale": r.scale, "used": r.used, "reason": r.reason} for r, e in s.execute(q)]


def _calib_row(s, calib_id: str):
    hit = s.execute(select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
                    .where(CalibRow.calib_id == calib_id)).first()
    if hit is None:
        raise RegistryError(f"no calib {calib_id!r} in the registry (see `calibflow calibs`)")
    return hit


def certify(registry: Registry, calib_id: str, begin: dt.datetime | None = None, end: dt.datetime | None = None,
            *, force: bool = False, note: str = "", keep_end: bool = False) -> CalibProduct:
    """Certify a product; ``begin``/``end`` set its validity (``end=None``: open-ended, unless
    ``keep_end``); without ``begin`` the recorded range stays.

    A candidate that failed verification is refused unless ``force`` (the failed checks stay
    recorded, and the note says it was forced); so is a decertified one."""
    now = dt.datetime.now(dt.timezone.utc)
    with registry.session() as s:
        row, cam = _calib_row(s, calib_id)
        b = begin or (_utc(row.valid_begin) if row.valid_begin else None)
        e = end if (begin is not None and not keep_end) or end is not None else (
            _utc(row.valid_end) if row.valid_end else None)
        if b is None:
            raise RegistryError(f"{calib_id} has no validity begin: give one (--begin)")
        if e is not None and e <= b:
            raise RegistryError(f"validity end {e.isoformat()} is not after begin {b.isoformat()}")
        ver = row.verification or {}
        if not force:
            if row.status == "decertified":
                raise RegistryError(f"{calib_id} was decertified ({row.status_note or 'no reason given'}); "
                                    "certify it again with --force")
            if ver and not ver.get("passed", True):
                raise RegistryError(f"{calib_id} failed verification ({'; '.join(ver.get('failed') or [])}); "
                                    "certify it anyway with --force")
        forced = force and (row.status == "decertified" or (ver and not ver.get("passed", True)))
        if forced:
            row.status_note = f"certified by force{': ' + note if note else ''} (was {row.status})"
        elif note:
            row.status_note = note
        row.valid_begin, row.valid_end = b, e
        if row.status != "certified":
            row.status, row.status_changed_at = "certified", now
        s.flush()
        return _calib_record(row, cam)


def decertify(registry: Registry, calib_id: str, reason: str = "") -> CalibProduct:
    """Withdraw a product: lookup no longer returns it; the reason is recorded."""
    with registry.session() as s:
        row, cam = _calib_row(s, calib_id)
        row.status, row.status_changed_at = "decertified", dt.datetime.now(dt.timezone.utc)
        row.status_note = reason or "decertified"
        s.flush()
        return _calib_record(row, cam)


def settle_candidates(registry: Registry, calib_ids: list[str], extra_checks: dict[str, list[dict]] | None = None,
                      extra_metrics: dict[str, dict[str, dict[str, float | None]]] | None = None
                      ) -> list[CalibProduct]:
    """The verification gate's decision for a build's products, in one transaction: checks made
    across products (``extra_checks`` by calib id: the flat's detector-to-detector scatter, the sky
    frame's held-out structure) are added to each one's verification, and their metrics
    (``extra_metrics`` by calib id, ``{amp: {metric: value}}``) to its metrics and the
    ``calib_metric`` table, replacing earlier values of the same names; a ``candidate`` that passed
    every check is certified, one that failed stays a candidate. Certified and decertified products
    keep their status (a rerun never undoes a person's decision); a product without a verification
    record is certified as before."""
    extra_checks = extra_checks or {}
    extra_metrics = extra_metrics or {}
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    with registry.session() as s:
        for cid in calib_ids:
            row, cam = _calib_row(s, cid)
            ver = dict(row.verification) if row.verification else None
            if ver is not None and extra_checks.get(cid):
                names = {(c["name"], c.get("amp")) for c in extra_checks[cid]}
                checks = [c for c in ver.get("checks", []) if (c["name"], c.get("amp")) not in names]
                checks += extra_checks[cid]
                ver["checks"] = checks
                ver["failed"] = [_describe(c) for c in checks if not c["passed"]]
                ver["passed"] = not ver["failed"]
                row.verification = ver
            if ver is not None and extra_metrics.get(cid):
                metrics = {a: dict(m) for a, m in (ver.get("metrics") or {}).items()}
                for amp, values in extra_metrics[cid].items():
                    s.execute(delete(CalibMetricRow).where(CalibMetricRow.calib_pk == row.id,
                                                           CalibMetricRow.amp == str(amp)[:32],
                                                           CalibMetricRow.metric.in_(list(values))))
                    metrics.setdefault(amp, {}).update({k: _finite(v) for k, v in values.items()})
                _add_metrics(s, row.id, extra_metrics[cid])
                row.verification = {**ver, "metrics": metrics}
            if row.status == "candidate" and (ver is None or ver.get("passed")):
                row.status, row.status_changed_at = "certified", now
            s.flush()
            out.append(_calib_record(row, cam))
    return out


def _describe(c: dict) -> str:
    where = f" amp {c['amp']}" if c.get("amp") else ""
    val = "n/a" if c.get("value") is None else f"{c['value']:.4g}"
    lim = "" if c.get("limit") is None else f" (limit {c.get('op', '<=')} {c['limit']:.4g})"
    return f"{c['name']}{where}: {val}{lim}" + (f"; {c['note']}" if c.get("note") else "")


def calib_metrics(registry: Registry, *, camera: str | None = None, calib_type: str | None = None,
                  metric: str | None = None, detector: int | None = None, filter: str | None = None) -> list[dict]:
    """Per-amplifier metrics of verified products: ``{calib_id, type, filter, detector, calib_date,
    status, amp, metric, value}``, ordered by calib date."""
    with registry.session() as s:
        q = _where_calib(select(CalibMetricRow, CalibRow, CameraRow.name)
                         .join(CalibRow, CalibMetricRow.calib_pk == CalibRow.id)
                         .join(CameraRow, CalibRow.camera_id == CameraRow.id), calib_type, camera, detector, filter)
        if metric:
            q = q.where(CalibMetricRow.metric == metric)
        q = q.order_by(CalibRow.calib_date, CalibRow.detector_number, CalibMetricRow.amp, CalibRow.id)
        return [{"calib_id": c.calib_id, "camera": cam, "type": c.calib_type, "filter": c.filter,
                 "detector": c.detector_number, "calib_date": c.calib_date.isoformat(), "status": c.status,
                 "amp": m.amp, "metric": m.metric, "value": m.value} for m, c, cam in s.execute(q)]


def _key_time(row: CalibRow) -> float:
    return _utc(row.status_changed_at or row.created_at).timestamp()


def overlapping(rows: list[CalibProduct]) -> dict[str, list[str]]:
    """For each certified product in ``rows``, the other certified products of the same camera,
    type, filter and detector whose validity overlaps its own (lookup then decides by
    docs/architecture.md#lookup-rules)."""
    def rng(r: CalibProduct):
        b = dt.datetime.fromisoformat(r.valid_begin) if r.valid_begin else None
        e = dt.datetime.fromisoformat(r.valid_end) if r.valid_end else None
        return b, e

    groups: dict[tuple, list[CalibProduct]] = {}
    for r in rows:
        if r.status == "certified" and r.valid_begin:
            groups.setdefault((r.camera, r.type, r.filter, r.detector), []).append(r)
    out: dict[str, list[str]] = {}
    for group in groups.values():
        for a in group:
            ba, ea = rng(a)
            out[a.calib_id] = [b.calib_id for b in group if b is not a and
                                  (ea is None or rng(b)[0] < ea) and (rng(b)[1] is None or ba < rng(b)[1])]
    return out


def explain_lookup(registry: Registry, *, camera: str, exposure_id: str, calib_type: str,
                   detector: int | None = None, readout_keys: tuple[str, ...] = (),
                   _certified_only: bool = False) -> list[dict]:
    """Every product of ``calib_type`` of the camera, per detector, with whether lookup chooses it
    for the exposure and why (docs/architecture.md#lookup-rules).

    The rules, in order: same detector; same filter (bias and dark are filterless); the same
    readout settings (``readout_keys``: header keys the camera names, e.g. binning or gain setting,
    recorded with the product's inputs); status ``certified``; the exposure's date inside
    ``[valid_begin, valid_end)``. Among the products left: the nearest calib date to the
    exposure's night; on a tie, the one certified last (then the newest row).

    Returns ``{detector, calib_id, chosen, eligible, reasons, rank, ...}`` rows ordered by
    detector, chosen first, then rank; ``_row`` is the product's :class:`CalibProduct` and ``_key``
    its sort key among the eligible (both private: the CLI leaves them out).
    """
    with registry.session() as s:
        exp = s.scalar(select(ExposureRow).join(CameraRow, ExposureRow.camera_id == CameraRow.id)
                       .where(CameraRow.name == camera, ExposureRow.exposure_id == exposure_id))
        if exp is None:
            raise RegistryError(f"no exposure {exposure_id!r} of camera {camera!r} in the registry")
        when = _utc(exp.date_obs)
        filt = "NONE" if calib_type in FILTERLESS_TYPES else exp.filter
        readout = {k: (exp.extra or {}).get(k) for k in readout_keys}
        q = (select(CalibRow, CameraRow.name).join(CameraRow, CalibRow.camera_id == CameraRow.id)
             .where(CameraRow.name == camera, CalibRow.calib_type == calib_type))
        if detector is not None:
            q = q.where(CalibRow.detector_number == detector)
        if _certified_only:      # lookup: the rows the rules below could choose, filtered in SQL
            q = q.where(CalibRow.status == "certified", CalibRow.filter == filt)
        rows = []
        for row, cam in s.execute(q):
            reasons = []
            if row.filter != filt:
                reasons.append(f"filter {row.filter}, the exposure's is {filt}")
            prod_readout = (row.stats or {}).get("readout") or {}
            for k, v in readout.items():
                if k in prod_readout and prod_readout[k] != v:
                    reasons.append(f"readout {k}={prod_readout[k]}, the exposure's is {v}")
            if row.status != "certified":
                why = row.status
                ver = row.verification or {}
                if row.status == "candidate" and ver and not ver.get("passed", True):
                    why += " (failed verification: " + "; ".join(ver.get("failed") or []) + ")"
                elif row.status == "decertified" and row.status_note:
                    why += f" ({row.status_note})"
                reasons.append(f"not certified: {why}")
            begin = _utc(row.valid_begin) if row.valid_begin else None
            end = _utc(row.valid_end) if row.valid_end else None
            if begin is None or when < begin or (end is not None and when >= end):
                reasons.append(f"validity {begin.isoformat() if begin else '-'} .. "
                               f"{end.isoformat() if end else 'open'} does not contain {when.isoformat()}")
            days = abs((row.calib_date - exp.night).days)
            rows.append({"detector": row.detector_number, "calib_id": row.calib_id, "status": row.status,
                         "filter": row.filter, "calib_date": row.calib_date.isoformat(), "days_from_night": days,
                         "valid_begin": begin.isoformat() if begin else None,
                         "valid_end": end.isoformat() if end else None, "path": row.path,
                         "eligible": not reasons, "reasons": reasons, "chosen": False, "rank": None,
                         "_key": (days, -_key_time(row), -row.id), "_row": _calib_record(row, cam)})
    by_det: dict[int, list[dict]] = {}
    for r in rows:
        by_det.setdefault(r["detector"], []).append(r)
    out = []
    for d in sorted(by_det):
        group = by_det[d]
        eligible = sorted((r for r in group if r["eligible"]), key=lambda r: r["_key"])
        for rank, r in enumerate(eligible, 1):
            r["rank"] = rank
            if rank == 1:
                r["chosen"] = True
                r["reasons"] = [f"certified, valid, calib date {r['days_from_night']} d from the night"
                                + (f"; nearest of {len(eligible)} eligible" if len(eligible) > 1 else "")]
            else:
                best = eligible[0]
                r["reasons"] = [f"eligible but shadowed by {best['calib_id']}: "
                                + ("its calib date is nearer" if best["_key"][0] < r["_key"][0]
                                   else "same distance in calib date, certified later")]
        group.sort(key=lambda r: (not r["chosen"], r["rank"] or 10 ** 6, r["calib_id"]))
        out.extend(group)
    return out


def lookup(registry: Registry, *, camera: str, exposure_id: str, calib_type: str,
           detector: int | None = None, readout_keys: tuple[str, ...] = ()) -> list[CalibProduct]:
    """The certified calib(s) of ``calib_type`` that apply to an exposure, one per detector, by
    the rules of :func:`explain_lookup` (docs/architecture.md#lookup-rules)."""
    return [r["_row"] for r in explain_lookup(registry, camera=camera, exposure_id=exposure_id,
                                              calib_type=calib_type, detector=detector, readout_keys=readout_keys,
                                              _certified_only=True)
            if r["chosen"]]
