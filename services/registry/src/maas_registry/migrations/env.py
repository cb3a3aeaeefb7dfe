"""Alembic environment: runs migrations on the connection handed over by the registry."""

from maas_runtime.database import run_migrations

from maas_registry.schema import metadata

run_migrations(metadata)
