"""Alembic environment: runs the deployment table's migrations on the connection handed over."""

from maas_runtime.database import run_migrations

from maas_inference.store import metadata

run_migrations(metadata)
