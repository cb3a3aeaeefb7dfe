"""Deployment table: what each deployment should serve, persisted across restarts and shared
by replicas.

Each deployment is one row holding its record as JSON. The table lives in SQLite (the
embedded default, one service instance) or in PostgreSQL (`database_url`; every replica of
the inference service reads and writes the same table). On PostgreSQL every change also
sends a notification on `CHANGES_CHANNEL` in the same transaction (delivered on commit, so a
listener never sees a change before it can read it): `{"id": …, "by": <replica>}`. Other
replicas follow it onto their own Triton (`maas_inference.replicas`). Schema changes are
Alembic revisions in `maas_inference/migrations`, applied at start.

Leases: a deployment is CREATING while the replica that took the user's create loads it, and
ROLLING_OUT while the replica that took an update (or an alias move) loads the new versions.
That replica holds the row's lease (`create_lease_owner` until `create_lease_expires`, by the
database's clock on PostgreSQL; the columns are named for the creates they guarded first,
migration 0002), renewed while it loads. The record leaving CREATING or ROLLING_OUT ends the
lease. A replica that died mid-create or mid-rollout stops renewing; once its lease lapsed
another replica takes the operation over (`take_over`: one replica only, `FOR UPDATE SKIP
LOCKED`), which counts the interruption (`create_interruptions`, per operation: a new lease
starts it at 0) and gives the record a new etag, so a holder that was only stalled can no
longer record or delete it.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from maas_runtime import contract_enums
from maas_runtime.database import create_database_engine, is_postgresql, migrate, sqlite_url
from maas_runtime.errors import Aborted, AlreadyExists, NotFound
from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Delete,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Update,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_deployments"
"""The deployment table's own Alembic version table: it may share a database with others."""
CHANGES_CHANNEL = "maas_deployments"
"""The PostgreSQL NOTIFY channel of deployment changes."""
CREATING = contract_enums.DEPLOYMENT_STATE_CREATING
ROLLING_OUT = contract_enums.DEPLOYMENT_STATE_ROLLING_OUT
LEASED_STATES = (CREATING, ROLLING_OUT)
"""The record states a lease guards: a replica is changing what the deployment serves."""

metadata = MetaData()

deployments = Table(
    "deployments", metadata,
    Column("id", String(63), primary_key=True),
    Column("record", JSON, nullable=False),
    # The lease of a create or rollout (named for creates, the first it guarded).
    Column("create_lease_owner", String(64)),
    Column("create_lease_expires", DateTime(timezone=True)),
    Column("create_interruptions", Integer, nullable=False, server_default="0"),
)

_IS_LEASED = deployments.c.record["state"].as_string().in_(LEASED_STATES)
"""The rows a lease guards."""

_Statement = TypeVar("_Statement", Update, Delete)


def new_etag() -> str:
    """A fresh etag for a deployment record that changed."""
    return uuid.uuid4().hex[:16]


LocalWriteHook = Callable[[str, dict | None], None]
"""Called after this process committed a deployment's record (None: deleted)."""


@dataclass(frozen=True)
class TakenOver:
    """A CREATING or ROLLING_OUT deployment whose lease this replica now holds."""

    record: dict
    """Its record as written by the takeover (a new etag: the former holder's writes fail)."""
    interruptions: int
    """How many holders of the operation's lease stopped renewing it, this takeover's
    included."""


class DeploymentStore(abc.ABC):
    """Persistence of deployment records (plain dicts in the contract's JSON shape)."""

    shared: bool = False
    """True when other replicas read and write the same table (and may be mid-change)."""
    replica_id: str = ""
    """This replica's name in the table (leases, change notifications)."""

    @abc.abstractmethod
    def create(self, deployment_id: str, record: dict, lease_owner: str = "",
               lease_seconds: float = 0.0) -> None:
        """Insert a new record (ALREADY_EXISTS if the id is taken); with `lease_owner`, a
        CREATING record under that replica's lease for `lease_seconds`."""

    @abc.abstractmethod
    def get(self, deployment_id: str) -> dict: ...

    @abc.abstractmethod
    def put(self, deployment_id: str, record: dict, expected_etag: str | None = None,
            lease_owner: str = "", lease_seconds: float = 0.0) -> None:
        """Replace the record; with `expected_etag`, only while the stored record still has
        that etag (ABORTED, ETAG_MISMATCH, otherwise: another replica changed or deleted it
        since it was read), checked and written in one statement. With `lease_owner`, the
        record (ROLLING_OUT, say) is put under that replica's new lease for `lease_seconds`,
        no interruption counted yet; a record neither CREATING nor ROLLING_OUT ends the
        lease."""

    @abc.abstractmethod
    def delete(self, deployment_id: str, expected_etag: str | None = None) -> bool:
        """Delete the record (with `expected_etag`, only while it still has that etag);
        whether a record was deleted."""

    @abc.abstractmethod
    def renew_lease(self, deployment_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease; False when it holds it no longer (taken over after it
        lapsed, the create or rollout recorded, or the deployment deleted)."""

    @abc.abstractmethod
    def release_lease(self, deployment_id: str, owner: str) -> None:
        """Give `owner`'s lease up now (the operation waits for a retry): another replica
        takes it over at once, without counting an interruption."""

    @abc.abstractmethod
    def lapsed_leases(self) -> list[str]:
        """Ids of the CREATING or ROLLING_OUT deployments nobody holds a live lease on."""

    @abc.abstractmethod
    def take_over(self, deployment_id: str, owner: str,
                  lease_seconds: float) -> TakenOver | None:
        """Hold a lapsed lease under `owner`; None when the deployment is not CREATING or
        ROLLING_OUT with a lapsed lease any more, or another replica is taking it over right
        now."""

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

    def _lease_now(self, connection: Connection) -> datetime:
        """The clock leases are granted, renewed and judged by: the database's when
        replicas share it (a replica whose clock runs ahead would take over live leases),
        this process's on SQLite (one instance)."""
        if self.shared:
            # timestamptz: psycopg returns it zone-aware, comparable with the lease columns.
            return connection.execute(select(func.statement_timestamp())).scalar_one()
        return datetime.now(UTC)

    @staticmethod
    def _lapsed(now: datetime):
        columns = deployments.c
        return _IS_LEASED & or_(
            columns.create_lease_owner.is_(None), columns.create_lease_expires.is_(None),
            columns.create_lease_expires < now)

    def create(self, deployment_id: str, record: dict, lease_owner: str = "",
               lease_seconds: float = 0.0) -> None:
        try:
            with self._write(deployment_id, record) as connection:
                lease = {}
                if lease_owner:
                    lease = {"create_lease_owner": lease_owner, "create_lease_expires":
                             self._lease_now(connection) + timedelta(seconds=lease_seconds)}
                connection.execute(insert(deployments).values(id=deployment_id, record=record,
                                                              **lease))
        except IntegrityError:
            raise AlreadyExists("deployment", f"deployments/{deployment_id}") from None

    def get(self, deployment_id: str) -> dict:
        with self._engine.connect() as connection:
            record = connection.execute(
                select(deployments.c.record).where(deployments.c.id == deployment_id)).scalar()
        if record is None:
            raise NotFound("deployment", f"deployments/{deployment_id}")
        return dict(record)

    def put(self, deployment_id: str, record: dict, expected_etag: str | None = None,
            lease_owner: str = "", lease_seconds: float = 0.0) -> None:
        statement = _with_etag(update(deployments).where(deployments.c.id == deployment_id),
                               expected_etag)
        values: dict = {"record": record}
        if record.get("state") not in LEASED_STATES:
            values.update(create_lease_owner=None, create_lease_expires=None,
                          create_interruptions=0)
        with self._write(deployment_id, record) as connection:
            if lease_owner:
                values.update(create_lease_owner=lease_owner, create_interruptions=0,
                              create_lease_expires=self._lease_now(connection)
                              + timedelta(seconds=lease_seconds))
            if connection.execute(statement.values(**values)).rowcount == 0 and (
                    expected_etag is not None):
                raise Aborted(f"deployments/{deployment_id} changed since it was read",
                              reason="ETAG_MISMATCH")

    def delete(self, deployment_id: str, expected_etag: str | None = None) -> bool:
        statement = _with_etag(delete(deployments).where(deployments.c.id == deployment_id),
                               expected_etag)
        with self._write(deployment_id, None) as connection:
            return connection.execute(statement).rowcount > 0

    def renew_lease(self, deployment_id: str, owner: str, lease_seconds: float) -> bool:
        with self._engine.begin() as connection:
            return connection.execute(
                update(deployments)
                .where(deployments.c.id == deployment_id,
                       deployments.c.create_lease_owner == owner, _IS_LEASED)
                .values(create_lease_expires=self._lease_now(connection)
                        + timedelta(seconds=lease_seconds))).rowcount > 0

    def release_lease(self, deployment_id: str, owner: str) -> None:
        with self._engine.begin() as connection:
            connection.execute(
                update(deployments)
                .where(deployments.c.id == deployment_id,
                       deployments.c.create_lease_owner == owner)
                .values(create_lease_owner=None, create_lease_expires=None))

    def lapsed_leases(self) -> list[str]:
        with self._engine.connect() as connection:
            return list(connection.execute(
                select(deployments.c.id).where(self._lapsed(self._lease_now(connection)))
                .order_by(deployments.c.id)).scalars())

    def take_over(self, deployment_id: str, owner: str,
                  lease_seconds: float) -> TakenOver | None:
        with self._engine.begin() as connection:
            now = self._lease_now(connection)
            row = connection.execute(
                select(deployments.c.record, deployments.c.create_lease_owner,
                       deployments.c.create_interruptions)
                .where(deployments.c.id == deployment_id, self._lapsed(now))
                .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            # A lease given up (no owner) was not interrupted; one that lapsed was.
            interruptions = row.create_interruptions + (row.create_lease_owner is not None)
            record = {**dict(row.record), "etag": new_etag()}
            connection.execute(
                update(deployments).where(deployments.c.id == deployment_id)
                .values(record=record, create_lease_owner=owner,
                        create_lease_expires=now + timedelta(seconds=lease_seconds),
                        create_interruptions=interruptions))
        return TakenOver(record, interruptions)

    def list(self, after: str, limit: int) -> list[tuple[str, dict]]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(deployments.c.id, deployments.c.record)
                .where(deployments.c.id > after).order_by(deployments.c.id).limit(limit)).all()
        return [(deployment_id, dict(record)) for deployment_id, record in rows]


def _with_etag(statement: _Statement, expected_etag: str | None) -> _Statement:
    """`statement` narrowed to the record while it still has `expected_etag` (None: any)."""
    if expected_etag is None:
        return statement
    return statement.where(deployments.c.record["etag"].as_string() == expected_etag)


def SqliteDeploymentStore(path: Path) -> SqlDeploymentStore:  # noqa: N802 (the old class name)
    """The embedded default: one SQLite file (kept under the name callers know)."""
    return SqlDeploymentStore.open_sqlite(path)
