"""Deployment table: what each deployment should serve, persisted across restarts and shared
by replicas.

Each deployment is one row holding its record as JSON. The table lives in SQLite (the
embedded default, one service instance) or in PostgreSQL (`database_url`; every replica of
the inference service reads and writes the same table). On PostgreSQL every change also
sends a notification on `CHANGES_CHANNEL` in the same transaction (delivered on commit, so a
listener never sees a change before it can read it): `{"id": …, "by": <replica>}`. Other
replicas follow it onto their own Triton (`maas_inference.replicas`). Schema changes are
Alembic revisions in `maas_inference/migrations`, applied at start.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from maas_runtime.database import create_database_engine, is_postgresql, migrate, sqlite_url
from maas_runtime.errors import Aborted, AlreadyExists, NotFound
from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_deployments"
"""The deployment table's own Alembic version table: it may share a database with others."""
CHANGES_CHANNEL = "maas_deployments"
"""The PostgreSQL NOTIFY channel of deployment changes."""

metadata = MetaData()

deployments = Table(
    "deployments", metadata,
    Column("id", String(63), primary_key=True),
    Column("record", JSON, nullable=False),
)

LocalWriteHook = Callable[[str, dict | None], None]
"""Called after this process committed a deployment's record (None: deleted)."""


class DeploymentStore(abc.ABC):
    """Persistence of deployment records (plain dicts in the contract's JSON shape)."""

    shared: bool = False
    """True when other replicas read and write the same table (and may be mid-change)."""

    @abc.abstractmethod
    def create(self, deployment_id: str, record: dict) -> None: ...

    @abc.abstractmethod
    def get(self, deployment_id: str) -> dict: ...

    @abc.abstractmethod
    def put(self, deployment_id: str, record: dict, expected_etag: str | None = None) -> None:
        """Replace the record; with `expected_etag`, only while the stored record still has
        that etag (ABORTED, ETAG_MISMATCH, otherwise: another replica changed or deleted it
        since it was read), checked and written in one statement."""

    @abc.abstractmethod
    def delete(self, deployment_id: str) -> None: ...

    @abc.abstractmethod
    def list(self, after: str, limit: int) -> list[tuple[str, dict]]: ...


class SqlDeploymentStore(DeploymentStore):
    """DeploymentStore on SQLAlchemy Core: SQLite (WAL, fsynced commits) or PostgreSQL."""

    def __init__(self, engine: Engine, url: str = "", replica_id: str = ""):
        self._engine = engine
        self.url = url
        """The database's URL, for a replica's change listener."""
        self.replica_id = replica_id or uuid.uuid4().hex
        """Names this process's changes in notifications, so it can tell them from others'."""
        self.shared = is_postgresql(engine)
        """True when replicas share the table (PostgreSQL) and changes are notified."""
        self._local_write_hooks: list[LocalWriteHook] = []

    @classmethod
    def open(cls, url: str, replica_id: str = "") -> SqlDeploymentStore:
        """The deployment table at SQLAlchemy `url`, migrated to the newest schema first."""
        engine = create_database_engine(url)
        migrate(engine, MIGRATIONS, VERSION_TABLE)
        return cls(engine, url, replica_id)

    @classmethod
    def open_sqlite(cls, path: Path) -> SqlDeploymentStore:
        """The table of one service instance: a SQLite file (the embedded default)."""
        return cls.open(sqlite_url(path))

    def on_local_write(self, hook: LocalWriteHook) -> None:
        """Call `hook` after each change this process commits (the replica follower's view
        of what the local controller applied itself)."""
        self._local_write_hooks.append(hook)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _write(self, deployment_id: str, record: dict | None) -> Iterator[Connection]:
        with self._engine.begin() as connection:
            yield connection
            if self.shared:
                payload = json.dumps({"id": deployment_id, "by": self.replica_id})
                connection.execute(select(func.pg_notify(CHANGES_CHANNEL, payload)))
        for hook in self._local_write_hooks:
            hook(deployment_id, record)

    def create(self, deployment_id: str, record: dict) -> None:
        try:
            with self._write(deployment_id, record) as connection:
                connection.execute(insert(deployments).values(id=deployment_id, record=record))
        except IntegrityError:
            raise AlreadyExists("deployment", f"deployments/{deployment_id}") from None

    def get(self, deployment_id: str) -> dict:
        with self._engine.connect() as connection:
            record = connection.execute(
                select(deployments.c.record).where(deployments.c.id == deployment_id)).scalar()
        if record is None:
            raise NotFound("deployment", f"deployments/{deployment_id}")
        return dict(record)

    def put(self, deployment_id: str, record: dict, expected_etag: str | None = None) -> None:
        statement = update(deployments).where(deployments.c.id == deployment_id)
        if expected_etag is not None:
            statement = statement.where(deployments.c.record["etag"].as_string() == expected_etag)
        with self._write(deployment_id, record) as connection:
            if connection.execute(statement.values(record=record)).rowcount == 0 and (
                    expected_etag is not None):
                raise Aborted(f"deployments/{deployment_id} changed since it was read",
                              reason="ETAG_MISMATCH")

    def delete(self, deployment_id: str) -> None:
        with self._write(deployment_id, None) as connection:
            connection.execute(delete(deployments).where(deployments.c.id == deployment_id))

    def list(self, after: str, limit: int) -> list[tuple[str, dict]]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(deployments.c.id, deployments.c.record)
                .where(deployments.c.id > after).order_by(deployments.c.id).limit(limit)).all()
        return [(deployment_id, dict(record)) for deployment_id, record in rows]


def SqliteDeploymentStore(path: Path) -> SqlDeploymentStore:  # noqa: N802 (the old class name)
    """The embedded default: one SQLite file (kept under the name callers know)."""
    return SqlDeploymentStore.open_sqlite(path)
