"""Alembic environment: runs the usage ledger's migrations on the connection handed over."""

from maas_runtime.database import run_migrations

from maas_inference.usage import metadata

run_migrations(metadata)
