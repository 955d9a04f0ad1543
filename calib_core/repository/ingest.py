"""Ingest raw files into the registry and datastore.

Each file is read completely (so a truncated or inconsistent file is caught before anything is
recorded), checksummed, transferred into the datastore and registered in ONE transaction with all of
its detectors. A file either ends up fully registered or not at all, and the reason is reported.

Idempotent: the same file (same checksum) twice is a no-op; a different file claiming an exposure id
that is already registered is an error naming both files.

Impossible metadata is refused, naming the file and the key (:func:`check_plausible`): an exposure id
that cannot be a file name, a missing observation type the camera does not map, non-finite pixels,
an exposure time beyond the camera's ``max_exptime``, a date outside 1975-2100, ``BSCALE = 0``. A
refused or unreadable file never stops the rest of the batch.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from astropy.io import fits
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from calib_core.camera import Camera
from calib_core.io.raw import RawExposure, RawReadError, read_raw
from calib_core.repository.datastore import Datastore, DatastoreError, check_identifier, sha256_file
from calib_core.repository.registry import DetectorRow, ExposureRow, RawRow, Registry
from calib_core.stats.warnfilters import filtered_warnings

__all__ = ["IngestReport", "ingest_files", "find_raw_files", "check_plausible", "RAW_SUFFIXES", "DATE_RANGE",
           "UpdateReport", "update_exposures", "METADATA_FIELDS"]

RAW_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fz")
# observation dates a CCD raw can have (UTC): anything outside is a corrupt or placeholder header
DATE_RANGE = (dt.datetime(1975, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc))


def _keys(rule) -> str:
    return "/".join(rule.keys) if rule.keys else "file name"


def check_plausible(raw: RawExposure, camera: Camera) -> None:
    """Refuse metadata and pixels no real raw has; :class:`RawReadError` names the file and the key."""
    path, meta, md = raw.path, raw.metadata, camera.metadata
    try:
        check_identifier(meta.exposure_id, "exposure id")
    except DatastoreError as exc:
        raise RawReadError(path, f"{exc} (from {_keys(md.exposure_id)})") from None
    if meta.obs_type == "unknown" and md.obs_type_default == "unknown":
        header_keys = [r.key for r in md.obs_type if r.key and r.hdu in (0, "PRIMARY")]
        if header_keys and not any(k in raw.primary_header for k in header_keys):
            raise RawReadError(path, f"missing observation type: no {'/'.join(dict.fromkeys(header_keys))} "
                                     "key and the camera maps none")
    for what, value, rule in (("exposure time", meta.exptime, md.exptime), ("dark time", meta.darktime, md.darktime)):
        if not np.isfinite(value) or value < 0 or value > camera.max_exptime:
            raise RawReadError(path, f"{_keys(rule)} = {value:g} s is not a credible {what} (camera "
                                     f"{camera.name} allows 0 to {camera.max_exptime:g} s)")
    if not DATE_RANGE[0] <= meta.date_obs < DATE_RANGE[1]:
        raise RawReadError(path, f"{_keys(md.date_obs)} = {meta.date_obs.date().isoformat()} lies outside "
                                 f"{DATE_RANGE[0].year}-{DATE_RANGE[1].year - 1}")
    with filtered_warnings(("ignore", Warning)):
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            for i, hdu in enumerate(hdul):
                if hdu.header.get("BSCALE", 1) == 0:
                    raise RawReadError(path, f"HDU {hdu.name or i}: BSCALE = 0 (every pixel would be BZERO)")
    for det in raw.detectors.values():
        seen = set()
        for amp in det.amps:
            if id(amp.raw) in seen:
                continue
            seen.add(id(amp.raw))
            bad = int(np.count_nonzero(~np.isfinite(amp.raw)))
            if bad:
                where = "every" if bad == amp.raw.size else f"{bad} of {amp.raw.size}"
                raise RawReadError(path, f"detector {det.detector.name}: {where} pixels are NaN or infinite")


@dataclass
class IngestReport:
    ingested: list[str] = field(default_factory=list)      # exposure ids
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, why)
    failed: list[tuple[str, str]] = field(default_factory=list)    # (path, why)

    @property
    def ok(self) -> bool:
        return not self.failed


def find_raw_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively) into raw FITS files; files are kept as given."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(RAW_SUFFIXES)))
        else:
            out.append(p)
    return out


def ingest_files(paths: Iterable[str | Path], camera: Camera, registry: Registry, datastore: Datastore,
                 transfer: str = "copy", progress: Callable[[str, str], None] | None = None) -> IngestReport:
    """Ingest raw files of one camera.

    Parameters
    ----------
    paths
        Files or folders (searched recursively for FITS files).
    camera
        The camera the files come from.
    transfer
        ``copy`` (default), ``symlink``, ``hardlink``, ``move`` or ``direct`` (leave in place).
    progress
        Called as ``progress(path, outcome)`` after each file.
    """
    report = IngestReport()
    registry.check_camera(camera)     # a changed definition goes through update_exposures, not here
    datastore.ensure()
    hints: list[str] = []
    files = [Path(p) for p in find_raw_files(paths)]
    # the files are read (checksum, every pixel, plausibility) a few ahead on a small pool, and
    # registered one by one in their order: reports, hints and the registry's rows come out as from
    # one loop, while the reads use the cores (docs/architecture.md#warnings-and-threads says why
    # reading FITS files on threads is safe)
    workers = max(1, min(READ_AHEAD_WORKERS, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest-read") as pool:
        ahead = 2 * workers
        reads = [pool.submit(_read_one, f, camera) for f in files[:ahead]]
        for i, path in enumerate(files):
            got = reads[i].result()
            reads[i] = None                    # the pixels of a registered file are not kept
            if i + ahead < len(files):
                reads.append(pool.submit(_read_one, files[i + ahead], camera))
            outcome = _ingest_one(path, camera, registry, datastore, transfer, got, report, hints)
            if progress:
                progress(str(path), outcome)
    return report


#: threads that read files ahead of their registration in :func:`ingest_files`
READ_AHEAD_WORKERS = 2


# read errors that say nothing about the camera: no point trying the file with the others
_NOT_A_CAMERA_PROBLEM = ("file not found", "file is empty", "not a FITS file", "corrupt gzip", "cannot open as FITS")


def suggest_camera(path: Path, camera: Camera, tried_first: list[str] | None = None) -> str | None:
    """The name of a built-in camera (other than ``camera``) that reads ``path`` cleanly, if any.

    ``tried_first``: names suggested earlier in the batch, tried first (a folder of another
    camera's files costs one read per file, not one per camera)."""
    from calib_core.camera import CameraError, list_cameras, load_camera

    names = [n for n in dict.fromkeys([*(tried_first or []), *list_cameras()]) if n != camera.name]
    for name in names:
        try:
            read_raw(path, load_camera(name))
        except (RawReadError, CameraError):
            continue
        except Exception:
            continue
        return name
    return None


def _unreadable(report: "IngestReport", path: Path, exc: Exception) -> str:
    """Record a file that could not be read (an OS error, or a header no rule foresaw: it must not stop
    the rest of the batch)."""
    why = f"cannot read: {exc}" if isinstance(exc, OSError) else f"cannot read: {type(exc).__name__}: {exc}"
    report.failed.append((str(path), why.splitlines()[0]))
    return "failed"


@dataclass
class _Read:
    """What reading one file gave: its checksum, size and contents, or the exception that stopped
    the read (``read_error``) or the plausibility check (``check_error``)."""

    checksum: str = ""
    size: int = 0
    raw: RawExposure | None = None
    read_error: Exception | None = None
    check_error: Exception | None = None


def _read_one(path: Path, camera: Camera) -> _Read:
    """The reading half of :func:`_ingest_one` (no registry, no datastore): safe on any thread."""
    got = _Read()
    try:
        if not path.exists():
            raise RawReadError(path, "file not found")
        got.checksum, got.size = sha256_file(path), path.stat().st_size
        got.raw = read_raw(path, camera)      # reads every pixel: truncated or inconsistent files fail here
    except Exception as exc:
        got.read_error = exc
        return got
    try:
        check_plausible(got.raw, camera)
    except Exception as exc:
        got.check_error = exc
    return got


def _ingest_one(path: Path, camera: Camera, registry: Registry, datastore: Datastore, transfer: str,
                got: _Read, report: IngestReport, hints: list[str] | None = None) -> str:
    """Register one file, read by :func:`_read_one` into ``got``, and place it."""
    try:
        if got.read_error is not None:
            raise got.read_error
        checksum, size, raw = got.checksum, got.size, got.raw
    except RawReadError as exc:
        problem = exc.problem
        if hints is not None and not problem.startswith(_NOT_A_CAMERA_PROBLEM):
            other = suggest_camera(path, camera, hints)
            if other:
                if other not in hints:
                    hints.insert(0, other)
                problem += f" (it reads cleanly as camera {other}: wrong --camera?)"
        report.failed.append((str(path), problem))
        return "failed"
    except Exception as exc:
        return _unreadable(report, path, exc)
    try:
        if got.check_error is not None:
            raise got.check_error
    except RawReadError as exc:
        report.failed.append((str(path), exc.problem))
        return "failed"
    except Exception as exc:
        return _unreadable(report, path, exc)

    meta = raw.metadata
    # two attempts: the second sees what a concurrent ingest committed (then: skipped, or a clear conflict)
    for attempt in (0, 1):
        target = None
        try:
            with registry.session() as s:
                cam = registry.ensure_camera(s, camera)
                existing = registry.find_exposure(s, cam.id, meta.exposure_id)
                if existing is not None:
                    if existing.checksum == checksum:
                        report.skipped.append((str(path), f"exposure {meta.exposure_id} already ingested"))
                        return "skipped"
                    raise _Conflict(f"exposure {meta.exposure_id} of camera {camera.name} is already registered "
                                    f"from {existing.original_path} with different contents (sha256 "
                                    f"{existing.checksum[:12]} vs {checksum[:12]})")
                dest = datastore.raw_target(camera.name, meta.night.isoformat(), path, meta.exposure_id)
                placed = path.absolute() if transfer == "direct" else dest
                det_rows = {d.number: d for d in s.scalars(select(DetectorRow).where(DetectorRow.camera_id == cam.id))}
                row = ExposureRow(camera_id=cam.id, exposure_id=meta.exposure_id, obs_type=meta.obs_type,
                                  filter=meta.filter, exptime=meta.exptime, darktime=meta.darktime,
                                  date_obs=meta.date_obs, night=meta.night, object=meta.object[:256],
                                  path=str(placed), original_path=str(path.absolute()), transfer=transfer,
                                  checksum=checksum, size_bytes=size,
                                  n_detectors=len(raw.detectors), extra=meta.extra,
                                  camera_checksum=camera.content_hash, ingested_at=dt.datetime.now(dt.timezone.utc))
                s.add(row)
                # claim the exposure before placing the file: a concurrent ingest of it waits here for
                # our commit, then sees it as already ingested (second attempt)
                s.flush()
                datastore.transfer(path, dest, transfer)
                target = dest         # set only once placed: never undo a file another ingest put there
                for det_id, rd in raw.detectors.items():
                    hdu = rd.detector.hdu if rd.detector.hdu is not None else rd.amps[0].amp.hdu
                    s.add(RawRow(exposure_pk=row.id, detector_id=det_rows[det_id].id, hdu=str(hdu)))
                s.flush()
        except _Conflict as exc:
            report.failed.append((str(path), str(exc)))
            return "failed"
        except (IntegrityError, FileExistsError, OSError) as exc:
            if target is not None:
                datastore.undo_transfer(path, target, transfer)
            if isinstance(exc, (IntegrityError, FileExistsError)) and attempt == 0:
                continue      # a concurrent ingest registered the camera or this exposure first: look again
            msg = str(exc).splitlines()[0]
            if isinstance(exc, IntegrityError):
                msg = f"registry refused the record (concurrent ingest or duplicate): {msg}"
            report.failed.append((str(path), msg))
            return "failed"
        except BaseException:
            if target is not None:
                datastore.undo_transfer(path, target, transfer)
            raise
        break
    report.ingested.append(meta.exposure_id)
    return "ingested"


class _Conflict(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# ingest --update: re-read the headers of registered exposures with a (corrected) camera definition
# --------------------------------------------------------------------------------------------------

#: the exposure fields a camera definition decides (what ``update_exposures`` compares and rewrites)
METADATA_FIELDS = ("exposure_id", "obs_type", "filter", "exptime", "darktime", "date_obs", "night", "object",
                   "extra")


@dataclass
class UpdateReport:
    changed: dict[str, dict[str, tuple]] = field(default_factory=dict)   # exposure id -> field -> (old, new)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)          # (path, why)
    camera_changed: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


class _Rollback(Exception):
    pass


def update_exposures(camera: Camera, registry: Registry, paths: Iterable[str | Path] | None = None) -> UpdateReport:
    """Re-read the headers of a camera's registered exposures with ``camera`` (a corrected definition),
    record what changed per exposure and store the definition in the registry.

    Every raw is read completely first (as at ingest); raws and products are never touched. All or
    nothing: if any exposure cannot be read with the new definition (or its new exposure id clashes,
    or its detectors change), nothing in the registry changes and ``failed`` says why.

    Parameters
    ----------
    paths
        Raw files (or folders) to re-read, matched to registered exposures by content (sha256);
        default: every exposure of the camera.
    """
    report = UpdateReport()
    wanted = None
    if paths is not None:
        wanted = {}
        for p in find_raw_files(paths):
            try:
                wanted[sha256_file(p)] = str(p)
            except OSError as exc:
                report.failed.append((str(p), f"cannot read: {exc}"))
        if report.failed:
            return report
    try:
        with registry.session() as s:
            cam = registry.camera_row(s, camera.name)
            if cam is None:
                raise _Conflict(f"camera {camera.name!r} is not in the registry: nothing to update (ingest first)")
            rows = list(s.scalars(select(ExposureRow).where(ExposureRow.camera_id == cam.id)
                                  .order_by(ExposureRow.date_obs, ExposureRow.exposure_id)))
            if wanted is not None:
                known = {r.checksum for r in rows}
                report.failed += [(p, f"not an ingested exposure of camera {camera.name}")
                                  for c, p in wanted.items() if c not in known]
                rows = [r for r in rows if r.checksum in wanted]
            report.camera_changed = cam.checksum != camera.content_hash
            registry.ensure_camera(s, camera, update=True)
            det_rows = {d.number: d for d in s.scalars(select(DetectorRow).where(DetectorRow.camera_id == cam.id))}
            by_pk = {d.id: d.number for d in det_rows.values()}
            for row in rows:
                try:
                    raw = read_raw(row.path, camera)
                except RawReadError as exc:
                    report.failed.append((row.path, exc.problem))
                    continue
                registered = {by_pk[r.detector_id] for r in row.raws}
                if set(raw.detectors) != registered:
                    report.failed.append((row.path, f"exposure {row.exposure_id}: the camera now reads detectors "
                                                    f"{sorted(raw.detectors)}, registered {sorted(registered)}; "
                                                    "a change of detectors needs a new repository"))
                    continue
                meta = raw.metadata
                new = {"exposure_id": meta.exposure_id, "obs_type": meta.obs_type, "filter": meta.filter,
                       "exptime": meta.exptime, "darktime": meta.darktime, "date_obs": meta.date_obs,
                       "night": meta.night, "object": meta.object[:256], "extra": meta.extra}
                diff = {}
                for name, value in new.items():
                    old = getattr(row, name)
                    if name == "date_obs" and old.tzinfo is None:
                        old = old.replace(tzinfo=dt.timezone.utc)
                    if old != value:
                        diff[name] = (_plain(old), _plain(value))
                        setattr(row, name, value)
                row.camera_checksum = camera.content_hash
                if diff:
                    report.changed[meta.exposure_id] = diff
                else:
                    report.unchanged.append(meta.exposure_id)
            if report.failed:
                raise _Rollback()
            s.flush()           # a new exposure id clashing with another one fails here
    except _Rollback:
        report.changed.clear()
        report.unchanged.clear()
        report.camera_changed = False
    except (_Conflict, IntegrityError) as exc:
        msg = str(exc) if isinstance(exc, _Conflict) else f"registry refused the update: {str(exc).splitlines()[0]}"
        report.failed.append(("", msg))
        report.changed.clear()
        report.unchanged.clear()
        report.camera_changed = False
    return report


def _plain(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value
