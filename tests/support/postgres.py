"""The test PostgreSQL server (MAAS_TEST_POSTGRES_URL): a throw-away database per use, so
parallel runs and tests never see each other's tables."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

POSTGRES_URL_ENV = "MAAS_TEST_POSTGRES_URL"


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_URL_ENV)


def postgres_unreachable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    url = postgres_admin_url()
    if not url:
        return f"{POSTGRES_URL_ENV} is not set (.ci/run sets it to the machine's PostgreSQL)"
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # any connection failure means: not here
        return f"PostgreSQL at {POSTGRES_URL_ENV} is unreachable: {exc.__class__.__name__}"
    return None


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A throw-away database on the test PostgreSQL server; yields its SQLAlchemy URL."""
    import sqlalchemy

    base = postgres_admin_url()
    if not base:
        raise RuntimeError(f"{POSTGRES_URL_ENV} is not set")
    engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"maas_test_{uuid.uuid4().hex[:12]}"
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


@contextmanager
def postgres_database_or_skip() -> Iterator[str]:
    """A fresh database, or the test skips naming why PostgreSQL is not here."""
    reason = postgres_unreachable_reason()
    if reason:
        pytest.skip(reason)
    with fresh_postgres_database() as url:
        yield url
