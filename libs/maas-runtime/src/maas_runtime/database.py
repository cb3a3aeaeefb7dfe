"""Engines and migrations of every service table: SQLite (WAL) by default, PostgreSQL by URL.

One way for all stores (registry, job tables, deployments): a SQLAlchemy engine chosen by
URL, and Alembic migrations run at start-up under a lock — a PostgreSQL advisory lock (SQLite
serialises writers itself) — so replicas starting together upgrade a schema exactly once.
Each schema keeps its own Alembic version table, so several schemas may share one database.
Replicas hear of each other's changes through PostgreSQL LISTEN/NOTIFY (`notifications`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import Engine, MetaData, create_engine, event, text
from sqlalchemy.engine import make_url

_log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 0x6D616173  # "maas": one advisory lock id for schema upgrades
DEFAULT_VERSION_TABLE = "alembic_version"

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file (its directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def normalized_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3, the driver the suite ships."""
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def is_postgresql(url_or_engine: str | Engine) -> bool:
    if isinstance(url_or_engine, Engine):
        return url_or_engine.dialect.name == "postgresql"
    return normalized_url(url_or_engine).startswith("postgresql")


def create_database_engine(url: str) -> Engine:
    """SQLite in WAL mode with writers serialised at BEGIN, or a pooled PostgreSQL engine."""
    url = normalized_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # SQLAlchemy's documented pysqlite recipe: the driver must not open transactions
            # itself, so the BEGIN IMMEDIATE below is the only one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")  # a committed write survives power loss
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection):
            # Take the write lock at BEGIN so read-then-write transactions never deadlock.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def migrate(engine: Engine, script_location: Path,
            version_table: str = DEFAULT_VERSION_TABLE) -> None:
    """Bring the schema whose Alembic scripts are in `script_location` to its newest revision.

    Safe when several replicas start at once: on PostgreSQL the upgrade runs under an
    advisory lock, so the second replica finds the schema current and does nothing.
    """
    from alembic import command
    from alembic.config import Config

    postgresql = is_postgresql(engine)
    with engine.connect() as connection:
        if postgresql:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        try:
            config = Config()
            config.set_main_option("script_location", str(script_location))
            config.attributes["connection"] = connection
            config.attributes["version_table"] = version_table
            command.upgrade(config, "head")
            connection.commit()
        finally:
            if postgresql:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
                connection.commit()


def run_migrations(target_metadata: MetaData) -> None:
    """The body of a schema's Alembic `env.py`: migrate the connection `migrate` handed over."""
    from alembic import context

    attributes = context.config.attributes
    context.configure(connection=attributes["connection"], target_metadata=target_metadata,
                      render_as_batch=True,
                      version_table=attributes.get("version_table", DEFAULT_VERSION_TABLE))
    with context.begin_transaction():
        context.run_migrations()


def libpq_conninfo(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a libpq connection string (psycopg's own)."""
    return make_url(normalized_url(url)).set(drivername="postgresql").render_as_string(
        hide_password=False)


async def notifications(url: str, channel: str,
                        retry_seconds: float = 1.0) -> AsyncIterator[str | None]:
    """Payloads NOTIFYed on `channel` of the PostgreSQL database at `url`, for ever.

    Yields None each time listening (re)starts: notifications sent while nobody listened
    are lost, so the caller compares its view with the tables then. A lost connection is
    retried every `retry_seconds`.
    """
    import psycopg
    from psycopg import sql

    conninfo = libpq_conninfo(url)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=10) as connection:
                await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                yield None
                async for notification in connection.notifies():
                    yield notification.payload
        except (psycopg.Error, OSError) as exc:
            _log.warning("listening on %s failed (%s); reconnecting", channel, exc)
        await asyncio.sleep(retry_seconds)
