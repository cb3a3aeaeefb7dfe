"""The registry's schema on the suite's one database layer (`maas_runtime.database`):
SQLite (WAL) by default, PostgreSQL by URL, migrated at start-up under an advisory lock."""

from __future__ import annotations

from pathlib import Path

from maas_runtime import database
from maas_runtime.database import create_database_engine
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).parent / "migrations"

__all__ = ["MIGRATIONS", "create_database_engine", "migrate"]


def migrate(engine: Engine) -> None:
    """Bring the registry's schema to the newest revision."""
    database.migrate(engine, MIGRATIONS)
