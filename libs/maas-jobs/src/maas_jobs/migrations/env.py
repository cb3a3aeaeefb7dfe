"""Alembic environment: runs the job table's migrations on the connection handed over."""

from maas_runtime.database import run_migrations

from maas_jobs.schema import metadata

run_migrations(metadata)
