"""Camera definitions travel with the data: record which camera definition (sha256 of the canonical
YAML, ``camera.checksum``) each exposure's metadata was read with and each product was built with.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exposure") as batch:
        batch.add_column(sa.Column("camera_checksum", sa.String(64), nullable=True))
    with op.batch_alter_table("calib") as batch:
        batch.add_column(sa.Column("camera_checksum", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calib") as batch:
        batch.drop_column("camera_checksum")
    with op.batch_alter_table("exposure") as batch:
        batch.drop_column("camera_checksum")
