"""Initial registry schema: camera, detector, exposure, raw, calib, calib_input, build_run.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "camera",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("definition", sa.Text, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
    )
    op.create_table(
        "detector",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("camera_id", sa.Integer, sa.ForeignKey("camera.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.UniqueConstraint("camera_id", "number", name="uq_detector_camera_number"),
    )
    op.create_table(
        "exposure",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("camera_id", sa.Integer, sa.ForeignKey("camera.id"), nullable=False),
        sa.Column("exposure_id", sa.String(128), nullable=False),
        sa.Column("obs_type", sa.String(32), nullable=False),
        sa.Column("filter", sa.String(64), nullable=False),
        sa.Column("exptime", sa.Float, nullable=False),
        sa.Column("darktime", sa.Float, nullable=False),
        sa.Column("date_obs", sa.DateTime(timezone=True), nullable=False),
        sa.Column("night", sa.Date, nullable=False),
        sa.Column("object", sa.String(256), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("original_path", sa.Text, nullable=False),
        sa.Column("transfer", sa.String(16), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("n_detectors", sa.Integer, nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("camera_id", "exposure_id", name="uq_exposure_camera_expid"),
    )
    op.create_index("ix_exposure_night_type", "exposure", ["camera_id", "night", "obs_type"])
    op.create_table(
        "raw",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("exposure_pk", sa.Integer, sa.ForeignKey("exposure.id", ondelete="CASCADE"), nullable=False),
        sa.Column("detector_id", sa.Integer, sa.ForeignKey("detector.id"), nullable=False),
        sa.Column("hdu", sa.String(64), nullable=False),
        sa.UniqueConstraint("exposure_pk", "detector_id", name="uq_raw_exposure_detector"),
    )
    op.create_table(
        "build_run",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("flow_run_id", sa.String(64)),
        sa.Column("calib_type", sa.String(16), nullable=False),
        sa.Column("parameters", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "calib",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("calib_id", sa.String(200), nullable=False, unique=True),
        sa.Column("camera_id", sa.Integer, sa.ForeignKey("camera.id"), nullable=False),
        sa.Column("calib_type", sa.String(16), nullable=False),
        sa.Column("filter", sa.String(64), nullable=False),
        sa.Column("detector_number", sa.Integer, nullable=False),
        sa.Column("calib_date", sa.Date, nullable=False),
        sa.Column("valid_begin", sa.DateTime(timezone=True)),
        sa.Column("valid_end", sa.DateTime(timezone=True)),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("software_version", sa.String(32), nullable=False),
        sa.Column("build_run_id", sa.Integer, sa.ForeignKey("build_run.id")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n_inputs", sa.Integer, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("camera_id", "calib_type", "filter", "detector_number", "calib_date", "digest",
                            name="uq_calib_identity"),
    )
    op.create_index("ix_calib_lookup", "calib", ["camera_id", "calib_type", "filter", "detector_number"])
    op.create_table(
        "calib_input",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("calib_pk", sa.Integer, sa.ForeignKey("calib.id", ondelete="CASCADE"), nullable=False),
        sa.Column("exposure_pk", sa.Integer, sa.ForeignKey("exposure.id"), nullable=False),
        sa.Column("scale", sa.Float),
        sa.Column("used", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.UniqueConstraint("calib_pk", "exposure_pk", name="uq_calib_input"),
    )


def downgrade() -> None:
    for table in ("calib_input", "calib", "build_run", "raw", "exposure", "detector", "camera"):
        op.drop_table(table)
