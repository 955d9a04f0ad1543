"""SQLAlchemy 2 models of the registry.

Every raw input and every product is a row here. Unique constraints make duplicates impossible:
one exposure per (camera, exposure id), one raw per (exposure, detector), one calib per
(camera, type, filter, detector, calib date, inputs+config digest).

The schema is created and changed only through Alembic migrations (``migrations/versions``); these
models must match the latest migration (a test checks that).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, Boolean, Date, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class CameraRow(Base):
    __tablename__ = "camera"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    definition: Mapped[str] = mapped_column(Text, nullable=False)       # the YAML as ingested
    checksum: Mapped[str] = mapped_column(String(64), nullable=False)   # sha256 of the definition

    detectors: Mapped[list["DetectorRow"]] = relationship(back_populates="camera",
                                                          cascade="all, delete-orphan")


class DetectorRow(Base):
    __tablename__ = "detector"
    __table_args__ = (UniqueConstraint("camera_id", "number", name="uq_detector_camera_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    camera_id: Mapped[int] = mapped_column(ForeignKey("camera.id", ondelete="CASCADE"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)

    camera: Mapped[CameraRow] = relationship(back_populates="detectors")


class ExposureRow(Base):
    __tablename__ = "exposure"
    __table_args__ = (
        UniqueConstraint("camera_id", "exposure_id", name="uq_exposure_camera_expid"),
        Index("ix_exposure_night_type", "camera_id", "night", "obs_type"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    camera_id: Mapped[int] = mapped_column(ForeignKey("camera.id"), nullable=False)
    exposure_id: Mapped[str] = mapped_column(String(128), nullable=False)
    obs_type: Mapped[str] = mapped_column(String(32), nullable=False)
    filter: Mapped[str] = mapped_column(String(64), nullable=False)
    exptime: Mapped[float] = mapped_column(Float, nullable=False)
    darktime: Mapped[float] = mapped_column(Float, nullable=False)
    date_obs: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    night: Mapped[dt.date] = mapped_column(Date, nullable=False)
    object: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    path: Mapped[str] = mapped_column(Text, nullable=False)             # where the file is now
    original_path: Mapped[str] = mapped_column(Text, nullable=False)    # where it was ingested from
    transfer: Mapped[str] = mapped_column(String(16), nullable=False)
    checksum: Mapped[str] = mapped_column(String(64), nullable=False)   # sha256 of the file bytes
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    n_detectors: Mapped[int] = mapped_column(Integer, nullable=False)
    extra: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    # the camera definition (camera.checksum) the metadata above was read with (ingest, ingest --update)
    camera_checksum: Mapped[str | None] = mapped_column(String(64))
    ingested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    camera: Mapped[CameraRow] = relationship()
    raws: Mapped[list["RawRow"]] = relationship(back_populates="exposure", cascade="all, delete-orphan")


class RawRow(Base):
    __tablename__ = "raw"
    __table_args__ = (UniqueConstraint("exposure_pk", "detector_id", name="uq_raw_exposure_detector"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exposure_pk: Mapped[int] = mapped_column(ForeignKey("exposure.id", ondelete="CASCADE"), nullable=False)
    detector_id: Mapped[int] = mapped_column(ForeignKey("detector.id"), nullable=False)
    hdu: Mapped[str] = mapped_column(String(64), nullable=False)

    exposure: Mapped[ExposureRow] = relationship(back_populates="raws")
    detector: Mapped[DetectorRow] = relationship()


class CalibRow(Base):
    __tablename__ = "calib"
    __table_args__ = (
        UniqueConstraint("camera_id", "calib_type", "filter", "detector_number", "calib_date", "digest",
                         name="uq_calib_identity"),
        Index("ix_calib_lookup", "camera_id", "calib_type", "filter", "detector_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calib_id: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    camera_id: Mapped[int] = mapped_column(ForeignKey("camera.id"), nullable=False)
    calib_type: Mapped[str] = mapped_column(String(16), nullable=False)
    filter: Mapped[str] = mapped_column(String(64), nullable=False)
    detector_number: Mapped[int] = mapped_column(Integer, nullable=False)
    calib_date: Mapped[dt.date] = mapped_column(Date, nullable=False)
    valid_begin: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    valid_end: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    path: Mapped[str] = mapped_column(Text, nullable=False)
    checksum: Mapped[str] = mapped_column(String(64), nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    digest: Mapped[str] = mapped_column(String(64), nullable=False)     # sha256(inputs, config, camera)
    camera_checksum: Mapped[str | None] = mapped_column(String(64))     # camera definition built with
    software_version: Mapped[str] = mapped_column(String(32), nullable=False)
    build_run_id: Mapped[int | None] = mapped_column(ForeignKey("build_run.id"))
    # candidate (registered, not used by lookup) | certified | decertified
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="candidate")
    n_inputs: Mapped[int] = mapped_column(Integer, nullable=False)
    stats: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # the verification gate's checks ({"passed", "checks", "failed", ...}); None: not verified
    verification: Mapped[dict | None] = mapped_column(JSON)
    status_note: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    status_changed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    inputs: Mapped[list["CalibInputRow"]] = relationship(back_populates="calib", cascade="all, delete-orphan")


class CalibMetricRow(Base):
    """One metric of one amplifier (``*``: the detector) of a verified product, for trends."""

    __tablename__ = "calib_metric"
    __table_args__ = (UniqueConstraint("calib_pk", "amp", "metric", name="uq_calib_metric"),
                      Index("ix_calib_metric_metric", "metric"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calib_pk: Mapped[int] = mapped_column(ForeignKey("calib.id", ondelete="CASCADE"), nullable=False)
    amp: Mapped[str] = mapped_column(String(32), nullable=False)
    metric: Mapped[str] = mapped_column(String(64), nullable=False)
    value: Mapped[float | None] = mapped_column(Float)


class CalibInputRow(Base):
    __tablename__ = "calib_input"
    __table_args__ = (UniqueConstraint("calib_pk", "exposure_pk", name="uq_calib_input"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calib_pk: Mapped[int] = mapped_column(ForeignKey("calib.id", ondelete="CASCADE"), nullable=False)
    exposure_pk: Mapped[int] = mapped_column(ForeignKey("exposure.id"), nullable=False)
    scale: Mapped[float | None] = mapped_column(Float)
    used: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")

    calib: Mapped[CalibRow] = relationship(back_populates="inputs")
    exposure: Mapped[ExposureRow] = relationship()


class BuildRunRow(Base):
    __tablename__ = "build_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    calib_type: Mapped[str] = mapped_column(String(16), nullable=False)
    parameters: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
