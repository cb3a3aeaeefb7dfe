"""The test PostgreSQL server (MAAS_TEST_POSTGRES_URL): a throw-away database per use, so
parallel runs and tests never see each other's tables."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgres))


def backend_url_fixture(sqlite_file: str | None = None) -> Any:
    """A fixture over both state backends: "sqlite" yields `sqlite:///<tmp_path>/<sqlite_file>`
    (or "" — the service's default SQLite in its state directory — when `sqlite_file` is None),
    "postgresql" a fresh database on the test server (the test skips when it is unreachable)."""

    @pytest.fixture(params=BACKENDS)
    def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
        if request.param == "sqlite":
            yield "" if sqlite_file is None else f"sqlite:///{tmp_path / sqlite_file}"
            return
        with postgres_database_or_skip() as url:
            yield url

    return backend_url


def postgres_url_fixture() -> Any:
    """A fixture yielding a fresh PostgreSQL database's URL (the test skips when unreachable)."""

    @pytest.fixture
    def postgres_url() -> Iterator[str]:
        with postgres_database_or_skip() as url:
            yield url

    return postgres_url



def run_together(action: Callable[[int], object], threads: int = 4,
                 timeout: float = 60.0) -> None:
    """Run `action(number)` on `threads` threads (numbered from 0) released at the same
    instant, like replicas racing on one database; raise the first error any of them met."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def run(number: int) -> None:
        try:
            barrier.wait()
            action(number)
        except BaseException as exc:  # noqa: BLE001 (raised below)
            errors.append(exc)

    started = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout)
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class DatabaseSchema:
    """What migrations left in a database: the revisions recorded and the tables."""

    versions: list[str]
    tables: set[str]


def database_schema(url: str, version_table: str) -> DatabaseSchema:
    """The revisions in `version_table` and the table names of the database at `url`."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(f"SELECT version_num FROM {version_table}").all()
            tables = set(sqlalchemy.inspect(connection).get_table_names())
    finally:
        engine.dispose()
    return DatabaseSchema([row[0] for row in rows], tables)
