"""Alembic environment: runs migrations on the connection calibflow hands over (no alembic.ini)."""

from alembic import context

from calib_core.repository.registry.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - calibflow always passes a connection
    raise RuntimeError("calibflow migrations are run through calib_core.repository.registry.Registry.upgrade(), not the alembic CLI")
context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
