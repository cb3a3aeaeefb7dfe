"""The job table: an abstract store and its SQL implementation (SQLite WAL by default).

Every change of a job's state writes the matching `state_change` event in the same
transaction, so a job's history and its row can never disagree. State changes are
compare-and-set (`transition` only moves a job out of the states it names): a cancel racing
a job's completion is decided by whichever commits first, never by both.

The table lives in SQLite (the embedded default, one service instance) or in PostgreSQL
(several replicas on one table). Every read-then-write locks the job's row first
(`SELECT … FOR UPDATE`; SQLite's BEGIN IMMEDIATE serialises writers anyway), and a replica
starts a job by claiming it (`FOR UPDATE SKIP LOCKED`: a row another replica is claiming
right now is skipped, not waited for) under a lease it renews while the job runs. A job whose
lease lapsed is taken over by another replica, which resumes it from its checkpoint.
On PostgreSQL every event appended also NOTIFYs `EVENTS_CHANNEL` with the job's id (in the
same transaction), so watchers on every replica wake at once (`changes`).
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, overload

from maas_runtime.database import (
    create_database_engine,
    is_postgresql,
    migrate,
    notifications,
    sqlite_url,
)
from maas_runtime.errors import AlreadyExists, InvalidArgument, NotFound
from maas_runtime.filtering import (
    FilterExpr,
    FilterSchema,
    Operator,
    ScalarField,
    ValueKind,
    compile_filter,
)
from sqlalchemy import Connection, Engine, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from maas_jobs import schema as t
from maas_jobs.records import (
    EventKind,
    JobCollection,
    JobDraft,
    JobError,
    JobEvent,
    JobRecord,
    JobState,
    LogLevel,
)

MIGRATIONS = Path(__file__).parent / "migrations"
EVENTS_CHANNEL = "maas_job_events"
"""The PostgreSQL NOTIFY channel of new job events; the payload is the job's id."""
VERSION_TABLE = "alembic_version_jobs"
"""The job table's own Alembic version table: it may share a database with other schemas."""

JOB_FILTER_SCHEMA = FilterSchema([
    ScalarField("state", ValueKind.ENUM, frozenset(state.value for state in JobState)),
    ScalarField("tenant", ValueKind.STRING),
    ScalarField("creator", ValueKind.STRING),
    ScalarField("create_time", ValueKind.TIMESTAMP),
])
"""What List filters may name: `state = "RUNNING" AND tenant = "vision"`."""


def utc_now() -> datetime:
    return datetime.now(UTC)


@overload
def _aware(value: datetime) -> datetime: ...
@overload
def _aware(value: None) -> None: ...
def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were stored as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class JobPage:
    """One page of a listing, newest first, and the cursor of the next (None on the last)."""

    items: list[JobRecord]
    next_cursor: dict | None


class JobStore(abc.ABC):
    """What the job machinery needs from persistent storage."""

    @abc.abstractmethod
    def create(self, draft: JobDraft, reason: str) -> JobRecord:
        """Insert a QUEUED job and its first event; ALREADY_EXISTS when the id is taken."""

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord:
        """The job; NOT_FOUND when there is none."""

    @abc.abstractmethod
    def list(self, filter_expr: FilterExpr | None, page_size: int,
             cursor: dict | None) -> JobPage: ...

    @abc.abstractmethod
    def in_states(self, states: Iterable[JobState]) -> builtins.list[JobRecord]:
        """Jobs in any of `states`, oldest submission first."""

    @abc.abstractmethod
    def transition(self, job_id: str, from_states: Iterable[JobState], to_state: JobState,
                   reason: str, *, error: JobError | None = None,
                   result: dict[str, Any] | None = None, owner: str | None = None,
                   unless_publishing: bool = False) -> JobRecord | None:
        """Move the job to `to_state` if it is in one of `from_states`; None otherwise.

        With `owner`, only while that replica holds the job's lease; with
        `unless_publishing`, never while its result is being published. A final or QUEUED
        job holds no lease.
        """

    @abc.abstractmethod
    def claim(self, job_id: str, owner: str, lease_seconds: float,
              reason: str) -> JobRecord | None:
        """Start a QUEUED job (RUNNING) under `owner`'s lease; None when it is not queued any
        more, or another replica is claiming it this instant (its row is skipped)."""

    @abc.abstractmethod
    def lapsed(self, owner: str, *, own_too: bool = True) -> builtins.list[JobRecord]:
        """RUNNING jobs `owner` may take over, oldest submission first: their lease lapsed,
        they have none, or (`own_too`) it is `owner`'s own (a previous run of the replica)."""

    @abc.abstractmethod
    def take_over(self, job_id: str, owner: str, lease_seconds: float,
                  reason: str) -> JobRecord | None:
        """Hold a lapsed RUNNING job under `owner`'s lease, counted and logged as a resume;
        None when another replica holds or is taking it. The record keeps the previous run's
        process id (to reap what it left behind, when that run was the same replica's)."""

    @abc.abstractmethod
    def renew_leases(self, owner: str, job_ids: Iterable[str],
                     lease_seconds: float) -> set[str]:
        """Extend `owner`'s leases on `job_ids`; the ids it still holds (RUNNING, its own)."""

    @abc.abstractmethod
    def release_leases(self, owner: str, job_ids: Iterable[str]) -> None:
        """End `owner`'s leases now, so another replica takes the jobs over at once."""

    def changes(self) -> AsyncIterator[str | None] | None:
        """Ids of jobs that got new events anywhere (None: listening restarted, anything may
        have changed); None when only this process writes the table (no feed needed)."""
        return None

    @abc.abstractmethod
    def start_publishing(self, job_id: str, owner: str) -> JobRecord | None:
        """Mark the RUNNING job `owner` holds as publishing its result (no cancel from now
        on); None when it is not running under `owner`'s lease any more."""

    @abc.abstractmethod
    def record_metrics(self, job_id: str, epoch: int, phase: str,
                       values: dict[str, float]) -> JobEvent | None:
        """Append a metrics event and fold the values into the job's latest metrics.

        None, and nothing written, once the job is final: its final state change stays the
        last event (output still in a stopped process's pipe arrives after it).
        """

    @abc.abstractmethod
    def append_log(self, job_id: str, level: LogLevel, message: str) -> JobEvent | None:
        """Append a log event; None, and nothing written, once the job is final."""

    @abc.abstractmethod
    def mark_resumed(self, job_id: str, reason: str) -> JobRecord:
        """Count a resume after a restart and log why."""

    @abc.abstractmethod
    def set_process(self, job_id: str, process_id: int | None) -> None: ...

    @abc.abstractmethod
    def events_after(self, job_id: str, after_sequence: int, limit: int) -> builtins.list[JobEvent]: ...

    @abc.abstractmethod
    def tenant_last_start_times(self) -> dict[str, datetime]:
        """When each tenant last had a job started: the fair-share scheduler's memory."""

    @abc.abstractmethod
    def state_summary(self) -> JobStateSummary:
        """How many jobs are in each state, and when the oldest queued one was submitted."""


@dataclass(frozen=True)
class JobStateSummary:
    """Counts by state (every state present, 0 when none) and the oldest queued submission."""

    counts: dict[JobState, int]
    oldest_queued: datetime | None


class _JobColumns:
    """`compile_filter`'s view of the jobs table."""

    def scalar(self, field_name: str):
        return t.jobs.c[field_name]

    def map_compare(self, map_name: str, key: str, operator: Operator, value):
        raise InvalidArgument.for_field("filter", f"{map_name} cannot be filtered on")

    def map_has(self, map_name: str, key: str):
        raise InvalidArgument.for_field("filter", f"{map_name} cannot be filtered on")


class SqlJobStore(JobStore):
    """JobStore on SQLAlchemy Core."""

    def __init__(self, engine: Engine, collection: JobCollection, url: str = ""):
        self._engine = engine
        self._collection = collection
        self._url = url
        self._shared = is_postgresql(engine)

    @classmethod
    def open(cls, url: str, collection: JobCollection) -> SqlJobStore:
        """The job table at SQLAlchemy `url`, migrated to the newest schema first."""
        engine = create_database_engine(url)
        migrate(engine, MIGRATIONS, VERSION_TABLE)
        return cls(engine, collection, url)

    @classmethod
    def open_sqlite(cls, path: Path, collection: JobCollection) -> SqlJobStore:
        """The store of one service instance: a SQLite file, migrated when it is older."""
        return cls.open(sqlite_url(path), collection)

    def close(self) -> None:
        self._engine.dispose()

    def changes(self) -> AsyncIterator[str | None] | None:
        if not self._shared or not self._url:
            return None
        return notifications(self._url, EVENTS_CHANNEL)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as connection:
            yield connection

    def _lease_now(self, connection: Connection) -> datetime:
        """The clock leases are granted, renewed and judged by: the database's when replicas
        share it (a replica whose own clock runs ahead would otherwise take over jobs whose
        leases are live), this process's on SQLite (one instance)."""
        if self._shared:
            return _aware(connection.execute(select(func.statement_timestamp())).scalar_one())
        return utc_now()

    # -- rows ---------------------------------------------------------------------------------

    @staticmethod
    def _record(row) -> JobRecord:
        error = JobError(row.error_code, row.error_message or "") if row.error_code else None
        return JobRecord(
            job_id=row.job_id, spec=row.spec, tenant=row.tenant, creator=row.creator,
            workers=row.workers, priority=row.priority, state=JobState(row.state),
            create_time=_aware(row.create_time), start_time=_aware(row.start_time),
            end_time=_aware(row.end_time), epoch=row.epoch, metrics=dict(row.metrics),
            error=error, result=dict(row.result), resume_count=row.resume_count,
            process_id=row.process_id, queue_position=row.pk, lease_owner=row.lease_owner,
            lease_expires=_aware(row.lease_expires), publishing=bool(row.publishing))

    @staticmethod
    def _event(job_id: str, row) -> JobEvent:
        return JobEvent(job_id=job_id, sequence=row.sequence, time=_aware(row.time),
                        kind=EventKind(row.kind), payload=dict(row.payload))

    def _row(self, connection: Connection, job_id: str, *, lock: bool = False):
        query = select(t.jobs).where(t.jobs.c.job_id == job_id)
        if lock:  # PostgreSQL: hold the row until commit (SQLite: BEGIN IMMEDIATE did)
            query = query.with_for_update()
        row = connection.execute(query).first()
        if row is None:
            raise NotFound(self._collection.resource_type, self._collection.name(job_id))
        return row

    def _append(self, connection: Connection, row, kind: EventKind, payload: dict,
                now: datetime) -> JobEvent:
        sequence = row.last_sequence + 1
        connection.execute(insert(t.job_events).values(
            job_pk=row.pk, sequence=sequence, time=now, kind=kind.value, payload=payload))
        connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk)
                           .values(last_sequence=sequence))
        if self._shared:  # delivered on commit: a woken watcher finds the event
            connection.execute(select(func.pg_notify(EVENTS_CHANNEL, row.job_id)))
        return JobEvent(job_id=row.job_id, sequence=sequence, time=now, kind=kind,
                        payload=payload)

    # -- JobStore -----------------------------------------------------------------------------

    def create(self, draft: JobDraft, reason: str) -> JobRecord:
        now = utc_now()
        try:
            with self._write() as connection:
                connection.execute(insert(t.jobs).values(
                    job_id=draft.job_id, spec=draft.spec, state=JobState.QUEUED.value,
                    tenant=draft.tenant, creator=draft.creator, priority=draft.priority,
                    workers=draft.workers, create_time=now, metrics={}, result={},
                    epoch=0, resume_count=0, last_sequence=0))
                row = self._row(connection, draft.job_id)
                self._append(connection, row, EventKind.STATE_CHANGE,
                             {"state": JobState.QUEUED.value, "reason": reason}, now)
                return self._record(self._row(connection, draft.job_id))
        except IntegrityError:
            raise AlreadyExists(self._collection.resource_type,
                                self._collection.name(draft.job_id)) from None

    def get(self, job_id: str) -> JobRecord:
        with self._read() as connection:
            return self._record(self._row(connection, job_id))

    def list(self, filter_expr: FilterExpr | None, page_size: int,
             cursor: dict | None) -> JobPage:
        query = select(t.jobs).order_by(t.jobs.c.pk.desc()).limit(page_size + 1)
        if filter_expr is not None:
            query = query.where(compile_filter(filter_expr, _JobColumns()))
        if cursor is not None:
            query = query.where(t.jobs.c.pk < int(cursor["before_pk"]))
        with self._read() as connection:
            rows = connection.execute(query).all()
        has_more = len(rows) > page_size
        rows = rows[:page_size]
        next_cursor = {"before_pk": rows[-1].pk} if has_more else None
        return JobPage([self._record(row) for row in rows], next_cursor)

    def in_states(self, states: Iterable[JobState]) -> builtins.list[JobRecord]:
        names = [state.value for state in states]
        with self._read() as connection:
            rows = connection.execute(
                select(t.jobs).where(t.jobs.c.state.in_(names)).order_by(t.jobs.c.pk)).all()
        return [self._record(row) for row in rows]

    def transition(self, job_id: str, from_states: Iterable[JobState], to_state: JobState,
                   reason: str, *, error: JobError | None = None,
                   result: dict[str, Any] | None = None, owner: str | None = None,
                   unless_publishing: bool = False) -> JobRecord | None:
        allowed = {state.value for state in from_states}
        now = utc_now()
        with self._write() as connection:
            row = self._row(connection, job_id, lock=True)
            if row.state not in allowed:
                return None
            if owner is not None and row.lease_owner != owner:
                return None
            if unless_publishing and row.publishing:
                return None
            changes: dict[str, Any] = {"state": to_state.value}
            if to_state is JobState.RUNNING and row.start_time is None:
                changes["start_time"] = now
            if to_state.is_final:
                changes["end_time"] = now
                changes["process_id"] = None
            if to_state is not JobState.RUNNING:
                changes["lease_expires"] = None
                changes["publishing"] = False
            if error is not None:
                changes["error_code"], changes["error_message"] = error.code, error.message
            if result is not None:
                changes["result"] = result
            connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk).values(**changes))
            self._append(connection, row, EventKind.STATE_CHANGE,
                         {"state": to_state.value, "reason": reason}, now)
            return self._record(self._row(connection, job_id))

    def claim(self, job_id: str, owner: str, lease_seconds: float,
              reason: str) -> JobRecord | None:
        with self._write() as connection:
            now = self._lease_now(connection)
            row = connection.execute(
                select(t.jobs)
                .where(t.jobs.c.job_id == job_id, t.jobs.c.state == JobState.QUEUED.value)
                .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk).values(
                state=JobState.RUNNING.value, start_time=row.start_time or now,
                lease_owner=owner, lease_expires=now + timedelta(seconds=lease_seconds),
                publishing=False))
            self._append(connection, row, EventKind.STATE_CHANGE,
                         {"state": JobState.RUNNING.value, "reason": reason}, now)
            return self._record(self._row(connection, job_id))

    @staticmethod
    def _may_take_over(owner: str, now: datetime, own_too: bool = True):
        lapsed = [t.jobs.c.lease_owner.is_(None), t.jobs.c.lease_expires.is_(None),
                  t.jobs.c.lease_expires < now]
        if own_too:
            lapsed.append(t.jobs.c.lease_owner == owner)
        return (t.jobs.c.state == JobState.RUNNING.value) & or_(*lapsed)

    def lapsed(self, owner: str, *, own_too: bool = True) -> builtins.list[JobRecord]:
        with self._read() as connection:
            query = select(t.jobs).where(self._may_take_over(
                owner, self._lease_now(connection), own_too))
            rows = connection.execute(query.order_by(t.jobs.c.pk)).all()
        return [self._record(row) for row in rows]

    def take_over(self, job_id: str, owner: str, lease_seconds: float,
                  reason: str) -> JobRecord | None:
        with self._write() as connection:
            now = self._lease_now(connection)
            row = connection.execute(
                select(t.jobs)
                .where(t.jobs.c.job_id == job_id, self._may_take_over(owner, now))
                .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk).values(
                lease_owner=owner, lease_expires=now + timedelta(seconds=lease_seconds),
                resume_count=row.resume_count + 1, publishing=False))
            self._append(connection, row, EventKind.LOG,
                         {"level": LogLevel.INFO.value, "message": reason}, now)
            return self._record(self._row(connection, job_id))

    def renew_leases(self, owner: str, job_ids: Iterable[str],
                     lease_seconds: float) -> set[str]:
        ids = builtins.list(job_ids)
        if not ids:
            return set()
        held = (t.jobs.c.job_id.in_(ids) & (t.jobs.c.lease_owner == owner)
                & (t.jobs.c.state == JobState.RUNNING.value))
        with self._write() as connection:
            connection.execute(update(t.jobs).where(held).values(
                lease_expires=self._lease_now(connection) + timedelta(seconds=lease_seconds)))
            return set(connection.execute(select(t.jobs.c.job_id).where(held)).scalars())

    def release_leases(self, owner: str, job_ids: Iterable[str]) -> None:
        ids = builtins.list(job_ids)
        if not ids:
            return
        with self._write() as connection:
            connection.execute(update(t.jobs).where(
                t.jobs.c.job_id.in_(ids), t.jobs.c.lease_owner == owner,
                t.jobs.c.state == JobState.RUNNING.value).values(
                    lease_expires=self._lease_now(connection)))

    def start_publishing(self, job_id: str, owner: str) -> JobRecord | None:
        with self._write() as connection:
            row = self._row(connection, job_id, lock=True)
            if row.state != JobState.RUNNING.value or row.lease_owner != owner:
                return None
            connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk)
                               .values(publishing=True))
            return self._record(self._row(connection, job_id))

    def record_metrics(self, job_id: str, epoch: int, phase: str,
                       values: dict[str, float]) -> JobEvent | None:
        with self._write() as connection:
            row = self._row(connection, job_id, lock=True)
            if JobState(row.state).is_final:
                return None
            connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk).values(
                metrics={**row.metrics, **values}, epoch=max(row.epoch, epoch)))
            return self._append(connection, row, EventKind.METRICS,
                                {"epoch": epoch, "phase": phase, "values": values}, utc_now())

    def append_log(self, job_id: str, level: LogLevel, message: str) -> JobEvent | None:
        with self._write() as connection:
            row = self._row(connection, job_id, lock=True)
            if JobState(row.state).is_final:
                return None
            return self._append(connection, row, EventKind.LOG,
                                {"level": level.value, "message": message}, utc_now())

    def mark_resumed(self, job_id: str, reason: str) -> JobRecord:
        with self._write() as connection:
            row = self._row(connection, job_id, lock=True)
            connection.execute(update(t.jobs).where(t.jobs.c.pk == row.pk)
                               .values(resume_count=row.resume_count + 1))
            self._append(connection, row, EventKind.LOG,
                         {"level": LogLevel.INFO.value, "message": reason}, utc_now())
            return self._record(self._row(connection, job_id))

    def set_process(self, job_id: str, process_id: int | None) -> None:
        with self._write() as connection:
            connection.execute(update(t.jobs).where(t.jobs.c.job_id == job_id)
                               .values(process_id=process_id))

    def events_after(self, job_id: str, after_sequence: int, limit: int) -> builtins.list[JobEvent]:
        with self._read() as connection:
            row = self._row(connection, job_id)
            rows = connection.execute(
                select(t.job_events)
                .where(t.job_events.c.job_pk == row.pk, t.job_events.c.sequence > after_sequence)
                .order_by(t.job_events.c.sequence).limit(limit)).all()
        return [self._event(job_id, event_row) for event_row in rows]

    def tenant_last_start_times(self) -> dict[str, datetime]:
        with self._read() as connection:
            rows = connection.execute(
                select(t.jobs.c.tenant, func.max(t.jobs.c.start_time))
                .where(t.jobs.c.start_time.is_not(None)).group_by(t.jobs.c.tenant)).all()
        return {tenant: _aware(started) for tenant, started in rows}

    def state_summary(self) -> JobStateSummary:
        with self._read() as connection:
            rows = connection.execute(
                select(t.jobs.c.state, func.count()).group_by(t.jobs.c.state)).all()
            oldest = connection.execute(
                select(func.min(t.jobs.c.create_time))
                .where(t.jobs.c.state == JobState.QUEUED.value)).scalar()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): count for state, count in rows})
        return JobStateSummary(counts, _aware(oldest))
