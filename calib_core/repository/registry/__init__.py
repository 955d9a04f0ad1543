"""The SQL registry: every raw input and every product, on SQLite (default) or PostgreSQL.

>>> reg = Registry.open("sqlite:///calibrepo/registry.sqlite3")   # doctest: +SKIP
>>> reg.upgrade()          # create or migrate the schema (Alembic)          # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from calib_core.camera import Camera, camera_from_definition, is_camera_file, load_camera
from calib_core.errors import CalibflowError
from calib_core.records import Exposure
from calib_core.repository.registry.models import (Base, BuildRunRow, CalibInputRow, CalibMetricRow, CalibRow,
                                                   CameraRow, DetectorRow, ExposureRow, RawRow)

__all__ = ["Registry", "RegistryError", "CameraMismatch", "mask_url", "resolve_url", "is_transient", "retry_transient",
           "TRANSIENT_BACKOFF_S", "Base", "CameraRow", "DetectorRow", "ExposureRow", "RawRow",
           "CalibRow", "CalibInputRow", "CalibMetricRow", "BuildRunRow", "HEAD_REVISION"]

HEAD_REVISION = "0003"
_MIGRATIONS = Path(__file__).parent / "migrations"


class RegistryError(CalibflowError, RuntimeError):
    """The registry cannot be opened, is not initialised, or a record conflicts."""


class CameraMismatch(RegistryError):
    """A camera file differs from the definition the registry holds under its name."""


# waits between attempts when the database is unreachable: about 16 s in all, so a server restart
# (a failover, a package upgrade) is ridden out, while a wrong URL still fails within seconds
TRANSIENT_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_TRANSIENT_WORDS = ("shutting down", "starting up", "connection refused", "server closed the connection",
                    "terminating connection", "could not connect", "connection is closed", "connection is lost",
                    "consuming input failed", "connection reset", "in recovery mode", "database is locked",
                    "not yet accepting connections", "ssl syscall", "broken pipe", "connection timed out",
                    "the connection is closed", "server conn crashed", "admin_shutdown", "cannot_connect_now")
_log = logging.getLogger("calibflow.registry")
#: how many times an operation was retried after a transient database error (tests read it)
transient_retries = 0


def is_transient(exc: BaseException) -> bool:
    """True for database errors a later attempt can succeed after: the server restarting or
    unreachable, a dropped connection, a locked SQLite file. Bad SQL, constraint violations, a
    wrong password or database name are not."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (OperationalError, InterfaceError)):
        text = str(exc).lower()
        return any(w in text for w in _TRANSIENT_WORDS)
    return False


def note_transient(exc: BaseException, what: str, delay: float) -> None:
    global transient_retries
    transient_retries += 1
    _log.warning("%s: database unavailable (%s); retrying in %g s", what,
                 mask_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__), delay)


def retry_transient(fn, *args, what: str = "registry", backoff=TRANSIENT_BACKOFF_S, **kwargs):
    """``fn(*args, **kwargs)``, tried again with backoff while it fails with a transient database
    error (:func:`is_transient`); any other error is raised at once."""
    for delay in (*backoff, None):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            note_transient(exc, what, delay)
            time.sleep(delay)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for every message and log line)."""
    import re

    return re.sub(r"(://[^/@:\s]*:)[^/\s]*@", r"\1***@", str(url))


def resolve_url(url: str) -> str:
    """A registry URL given by reference: ``env:NAME`` is the value of environment variable NAME.

    Flow-run and deployment parameters carry the reference, never the URL (which may hold a
    password); the run resolves it from its own environment."""
    import os

    if url.startswith("env:"):
        name = url[4:]
        value = os.environ.get(name)
        if not value:
            raise RegistryError(f"registry URL reference {url!r}: environment variable {name} is not set")
        return value
    return url


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Registry:
    """A handle on one registry database."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> "Registry":
        """Connect to a SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``)."""
        url = resolve_url(url)
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        kwargs = {"future": True}
        if url.startswith("sqlite"):
            path = url.split("sqlite:///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_engine(url, **kwargs)
        except Exception as exc:
            detail = mask_url(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
            raise RegistryError(f"cannot use registry URL {mask_url(url)!r}: {detail}") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        return cls(engine)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    # -- schema ------------------------------------------------------------------------------------

    def _alembic_config(self, connection):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        """Create or migrate the schema to ``revision`` through Alembic."""
        from alembic import command

        with self.engine.begin() as conn:
            command.upgrade(self._alembic_config(conn), revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def check_ready(self, retry: bool = False) -> None:
        """The schema is at this calibflow's revision. ``retry``: ride out a restarting server
        (builds); without it an unreachable server is reported at once (the CLI's first check)."""
        try:
            rev = retry_transient(self.current_revision) if retry else self.current_revision()
        except Exception as exc:
            raise RegistryError(f"cannot connect to registry {self.url}: "
                                f"{mask_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
        if rev is None:
            raise RegistryError(f"registry {self.url} is not initialised: run `calibflow init`")
        if rev != HEAD_REVISION:
            raise RegistryError(f"registry {self.url} is at schema {rev}, this calibflow needs "
                                f"{HEAD_REVISION}: run `calibflow init` to migrate")

    def table_names(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def _ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error.

        On a server database the connection is checked first, waiting with backoff while the server
        is unreachable (a restart): most transient outages are absorbed here, before any work."""
        if self.engine.dialect.name != "sqlite":
            retry_transient(self._ping)
        with self._sessions() as s:
            with s.begin():
                yield s

    # -- cameras -------------------------------------------------------------------------------------

    def ensure_camera(self, s: Session, camera: Camera, update: bool = False) -> CameraRow:
        """Register a camera and its detectors (idempotent).

        A different definition under the same name is refused (:class:`CameraMismatch`) unless
        ``update`` (``calibflow ingest --update``, which re-reads every exposure's headers with it)."""
        text, digest = camera.to_yaml(), camera.content_hash
        row = s.scalar(select(CameraRow).where(CameraRow.name == camera.name))
        if row is None:
            row = CameraRow(name=camera.name, definition=text, checksum=digest)
            s.add(row)
            s.flush()
        elif row.checksum != digest:
            if not update:
                raise CameraMismatch(_mismatch_message(camera.name, "the camera given"))
            row.definition, row.checksum = text, digest
        have = {d.number: d for d in s.scalars(select(DetectorRow).where(DetectorRow.camera_id == row.id))}
        for det in camera.detectors:
            if det.id not in have:
                s.add(DetectorRow(camera_id=row.id, number=det.id, name=det.name))
            elif have[det.id].name != det.name:
                have[det.id].name = det.name
        s.flush()
        return row

    def camera_row(self, s: Session, name: str) -> CameraRow | None:
        return s.scalar(select(CameraRow).where(CameraRow.name == name))

    def check_camera(self, camera: Camera) -> None:
        """Raise :class:`CameraMismatch` if the registry holds a different definition under this name."""
        with self.session() as s:
            row = self.camera_row(s, camera.name)
            if row is not None and row.checksum != camera.content_hash:
                raise CameraMismatch(_mismatch_message(camera.name, "the camera given"))

    def camera_names(self, *, night: dt.date | str | None = None,
                     exposure_ids: list[str] | None = None) -> list[str]:
        """Names of the registered cameras (those with exposures of ``night`` / ``exposure_ids``)."""
        with self.session() as s:
            if night is None and not exposure_ids:
                return sorted(s.scalars(select(CameraRow.name)))
            q = select(CameraRow.name).join(ExposureRow, ExposureRow.camera_id == CameraRow.id).distinct()
            if night is not None:
                q = q.where(ExposureRow.night == (dt.date.fromisoformat(night) if isinstance(night, str) else night))
            if exposure_ids:
                q = q.where(ExposureRow.exposure_id.in_(list(exposure_ids)))
            return sorted(s.scalars(q))

    def stored_camera(self, name: str) -> Camera | None:
        """The camera definition the registry holds under ``name`` (as ingested), or None."""
        with self.session() as s:
            row = self.camera_row(s, name)
            if row is None:
                return None
            return camera_from_definition(row.definition, f"registry camera {name!r}")

    def resolve_camera(self, spec: str | None, *, night: dt.date | str | None = None,
                       exposure_ids: list[str] | None = None) -> Camera:
        """The camera a command means by ``--camera NAME|FILE``, as the registry holds it.

        A name is looked up in the registry (the definition stored at ingest: no file needed). A YAML
        file is loaded and must equal the registry's definition of its name (a corrected file is
        taken in with ``calibflow ingest --update``). ``None`` is allowed where the registry decides:
        it holds one camera, or one has exposures of ``night`` / ``exposure_ids``.

        Raises
        ------
        CameraError
            The file does not load or validate.
        RegistryError
            The camera is not in the registry (the message lists the cameras it holds), or several
            could be meant, or the file differs from the registered definition (:class:`CameraMismatch`).
        """
        every = self.camera_names()
        listing = f"cameras in registry {self.url}: {', '.join(every) if every else 'none (ingest raw files first)'}"
        if spec is None or str(spec).strip() == "":
            where = " and ".join(w for w in ((f"night {night}" if night else ""),
                                             ("the exposures given" if exposure_ids else "")) if w)
            # one camera in the registry decides; else the one with exposures of the selection
            names = every if len(every) <= 1 or not where else self.camera_names(night=night,
                                                                                  exposure_ids=exposure_ids)
            if len(names) == 1:
                return self.stored_camera(names[0])
            if not names:
                raise RegistryError(f"no camera has exposures{' of ' + where if where else ''}; {listing}")
            raise RegistryError(f"several cameras{' have exposures of ' + where if where else ''}: "
                                f"{', '.join(names)}; choose one with --camera NAME|FILE")
        spec = str(spec)
        if is_camera_file(spec):
            cam = load_camera(spec)
            stored = self.stored_camera(cam.name)
            if stored is None:
                raise RegistryError(f"camera {cam.name!r} (file {spec}) is not in the registry: ingest its raw "
                                    f"files first (calibflow ingest FILES --camera {spec}); {listing}")
            if stored.content_hash != cam.content_hash:
                raise CameraMismatch(_mismatch_message(cam.name, f"file {spec}", spec))
            return stored
        stored = self.stored_camera(spec)
        if stored is None:
            raise RegistryError(f"unknown camera {spec!r}: {listing}; or give the camera's YAML file")
        return stored

    # -- exposures -----------------------------------------------------------------------------------

    def find_exposure(self, s: Session, camera_id: int, exposure_id: str) -> ExposureRow | None:
        return s.scalar(select(ExposureRow).where(ExposureRow.camera_id == camera_id,
                                                  ExposureRow.exposure_id == exposure_id))

    def query_exposures(self, *, camera: str | None = None, obs_type: str | None = None,
                        filter: str | None = None, night: dt.date | str | None = None,
                        exposure_ids: list[str] | None = None) -> list[Exposure]:
        """The exposures that match, ordered by date."""
        with self.session() as s:
            q = select(ExposureRow, CameraRow.name).join(CameraRow, ExposureRow.camera_id == CameraRow.id)
            if camera:
                q = q.where(CameraRow.name == camera)
            if obs_type:
                q = q.where(ExposureRow.obs_type == obs_type)
            if filter:
                q = q.where(ExposureRow.filter == filter)
            if night:
                if isinstance(night, str):
                    night = dt.date.fromisoformat(night)
                q = q.where(ExposureRow.night == night)
            if exposure_ids:
                q = q.where(ExposureRow.exposure_id.in_(list(exposure_ids)))
            q = q.order_by(ExposureRow.date_obs, ExposureRow.exposure_id)
            return [_exposure_record(row, cam) for row, cam in s.execute(q)]

    def exposure_detectors(self, camera: str, exposure_ids: list[str]) -> dict[str, set[int]]:
        """Detector numbers registered for each exposure (for consistency checks)."""
        with self.session() as s:
            q = (select(ExposureRow.exposure_id, DetectorRow.number)
                 .join(RawRow, RawRow.exposure_pk == ExposureRow.id)
                 .join(DetectorRow, RawRow.detector_id == DetectorRow.id)
                 .join(CameraRow, ExposureRow.camera_id == CameraRow.id)
                 .where(CameraRow.name == camera, ExposureRow.exposure_id.in_(list(exposure_ids))))
            out: dict[str, set[int]] = {e: set() for e in exposure_ids}
            for exp, det in s.execute(q):
                out[exp].add(det)
            return out

    def count(self, model) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(model))

    def snapshot(self) -> dict[str, int]:
        """Row counts of every table (used by tests to prove nothing changed)."""
        return {m.__tablename__: self.count(m) for m in (CameraRow, DetectorRow, ExposureRow, RawRow,
                                                          CalibRow, CalibInputRow, CalibMetricRow, BuildRunRow)}


def _mismatch_message(name: str, what: str, path: str = "FILE") -> str:
    return (f"camera {name!r}: {what} differs from the definition in the registry (the one its exposures "
            f"were ingested with); to use it, re-read their headers with it: calibflow ingest --update "
            f"--camera {path}")


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite drops the time zone; every time in the registry is UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _exposure_record(row: ExposureRow, camera: str) -> Exposure:
    return Exposure(exposure_id=row.exposure_id, camera=camera, obs_type=row.obs_type, filter=row.filter,
                    exptime=row.exptime, darktime=row.darktime, date_obs=_utc(row.date_obs).isoformat(),
                    night=row.night.isoformat(), object=row.object, n_detectors=row.n_detectors, path=row.path,
                    checksum=row.checksum, size_bytes=row.size_bytes,
                    ingested_at=_utc(row.ingested_at).isoformat(), extra=dict(row.extra or {}))
