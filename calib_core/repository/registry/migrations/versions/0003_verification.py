"""Verification before certification (docs/architecture.md#verification-and-certification): a
product's verification record and the note of a person's decision on the calib row, and the
per-amplifier metrics of every verified product in their own table (for trends).

Existing products stay ``certified``; new ones are registered as ``candidate`` and certified when
they pass.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calib") as batch:
        batch.add_column(sa.Column("verification", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("status_note", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "calib_metric",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("calib_pk", sa.Integer(), sa.ForeignKey("calib.id", ondelete="CASCADE"), nullable=False),
        sa.Column("amp", sa.String(32), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.UniqueConstraint("calib_pk", "amp", "metric", name="uq_calib_metric"),
    )
    op.create_index("ix_calib_metric_metric", "calib_metric", ["metric"])


def downgrade() -> None:
    op.drop_index("ix_calib_metric_metric", table_name="calib_metric")
    op.drop_table("calib_metric")
    with op.batch_alter_table("calib") as batch:
        batch.drop_column("status_changed_at")
        batch.drop_column("status_note")
        batch.drop_column("verification")
