"""The usage ledger: one durable record per generation and per Predict, listed and summed.

Records are appended by `TenantLimiter` (see `maas_inference.tenancy`) when an admitted call
ends, and by `DataPlaneUsage` for what the native data plane served. The data path never
waits on the database: `UsageLedger.append` puts the record in a buffer that a background
task writes in batches every `flush_seconds` and on shutdown (`close`). Durability:

- a finished generation is flushed at once, and `await ledger.append_durable(record)` returns
  only when it is committed (the Generate path sends its final response after that), so a
  generation whose final response a client saw is never lost, even to kill -9 (unless the
  database was unwritable for longer than `durable_wait_seconds`, 5 s: then the response goes
  out anyway and the record waits in memory for the database);
- a Predict record may wait up to `flush_seconds` (default 1 s): a kill -9 loses at most the
  Predict records of the last flush interval (and the data plane's counts since its last poll).

The store is SQL (SQLAlchemy Core, engines from `maas_runtime.database`): SQLite at
`<state_dir>/usage.db` by default, the service's PostgreSQL when its `database_url` is set;
the schema is Alembic revisions in `maas_inference/usage_migrations`, applied at start.

Typical use (the composition root):

    ledger = UsageLedger(SqlUsageStore.open(settings.database_url, settings.state_dir))
    await ledger.start()
    ...
    ledger.append(record)                     # Predict: buffered
    await ledger.append_durable(record)       # a finished generation: committed on return
    page = await ledger.list_records(UsageQuery(...), page_size=50, cursor=None)
    await ledger.close()                      # flushes what is buffered
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from maas_runtime.auth import Principal, Role
from maas_runtime.database import create_database_engine, migrate, sqlite_url
from maas_runtime.errors import InvalidArgument
from maas_runtime.filtering import (
    FilterExpr,
    FilterSchema,
    Operator,
    ScalarField,
    ValueKind,
    compile_filter,
    parse_filter,
)
from maas_runtime.pagination import PageTokenCodec, clamp_page_size, query_fingerprint
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.sql.elements import ColumnElement

_log = logging.getLogger(__name__)

USAGE_DB_FILENAME = "usage.db"
MIGRATIONS = Path(__file__).parent / "usage_migrations"
VERSION_TABLE = "alembic_version_usage"
"""The ledger's own Alembic version table: it shares the database with the deployments."""
DEFAULT_FLUSH_SECONDS = 1.0
MAX_BUFFERED_RECORDS = 100_000
"""Beyond this many unwritten records (the database down for long) the oldest are dropped
and counted, rather than the service running out of memory."""
OTHER_TENANTS = "other"
GENERATION, PREDICT = "generation", "predict"


def tenant_of(principal: Principal) -> str:
    """The tenant a call counts against: its token's tenant, else its principal."""
    return principal.tenant or principal.name


@dataclass(frozen=True)
class UsageRecord:
    """One call (or, from the data plane, the calls of one poll interval) of one tenant."""

    tenant: str
    principal: str
    deployment: str
    version: str
    kind: str
    """"generation" or "predict"."""
    start_time: datetime
    duration_seconds: float
    outcome: str
    """"OK", "CANCELLED" or the canonical code the call ended with."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1
    rows: int = 0
    record_id: int = 0
    """Output only: the ledger's sequence number (0 until written)."""


@dataclass(frozen=True)
class UsageTotals:
    """Sums over the records of one group (tenant and/or deployment; "" when not grouped)."""

    tenant: str
    deployment: str
    requests: int
    rows: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageQuery:
    """Which records: a parsed filter, the tenant a caller is confined to, a time range."""

    filter_expr: FilterExpr | None = None
    tenant: str | None = None
    """Only this tenant's records (a non-admin caller); None for all."""
    start_time: datetime | None = None
    end_time: datetime | None = None


USAGE_FILTER_SCHEMA = FilterSchema([
    ScalarField("tenant", ValueKind.STRING),
    ScalarField("principal", ValueKind.STRING),
    ScalarField("deployment", ValueKind.STRING),
    ScalarField("version", ValueKind.STRING),
    ScalarField("kind", ValueKind.ENUM, frozenset({GENERATION, PREDICT})),
    ScalarField("outcome", ValueKind.STRING),
    ScalarField("start_time", ValueKind.TIMESTAMP),
])
"""What `ListUsageRecords` and `SummarizeUsage` accept in `filter`."""

GROUP_FIELDS = ("tenant", "deployment")

metadata = MetaData()
Id = BigInteger().with_variant(Integer(), "sqlite")

usage_records = Table(
    "usage_records", metadata,
    Column("pk", Id, primary_key=True, autoincrement=True),
    Column("tenant", String(256), nullable=False),
    Column("principal", String(256), nullable=False),
    Column("deployment", String(63), nullable=False),
    Column("version", String(512), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("start_time", DateTime(timezone=True), nullable=False),
    Column("duration_seconds", Float, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Index("ix_usage_tenant_start", "tenant", "start_time"),
    Index("ix_usage_deployment_start", "deployment", "start_time"),
    Index("ix_usage_start", "start_time"),
)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were stored as UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class UsageStore(abc.ABC):
    """Where usage records live."""

    @abc.abstractmethod
    def insert_many(self, records: Sequence[UsageRecord]) -> None: ...

    @abc.abstractmethod
    def list_records(self, query: UsageQuery, limit: int, before_id: int | None) -> list[UsageRecord]:
        """Newest first; only records with ids below `before_id` when given."""

    @abc.abstractmethod
    def summarize(self, query: UsageQuery, group_by: Sequence[str]) -> list[UsageTotals]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class _UsageColumns:
    """`compile_filter`'s view of the usage table (scalar fields only)."""

    def scalar(self, field_name: str) -> ColumnElement[Any]:
        return usage_records.c[field_name]

    def map_compare(self, map_name: str, key: str, operator: Operator,
                    value: str | int | float) -> ColumnElement[bool]:
        raise InvalidArgument.for_field("filter", f"{map_name} cannot be filtered on")

    def map_has(self, map_name: str, key: str) -> ColumnElement[bool]:
        raise InvalidArgument.for_field("filter", f"{map_name} cannot be filtered on")


class SqlUsageStore(UsageStore):
    """UsageStore on SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, database_url: str, state_dir: Path) -> SqlUsageStore:
        """The ledger at `database_url` (the service's shared database) or, when empty, in
        `<state_dir>/usage.db`; migrated to the newest schema first."""
        engine = create_database_engine(
            database_url or sqlite_url(state_dir / USAGE_DB_FILENAME))
        migrate(engine, MIGRATIONS, VERSION_TABLE)
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    def insert_many(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        rows = [{key: value for key, value in asdict(record).items() if key != "record_id"}
                for record in records]
        with self._engine.begin() as connection:
            connection.execute(insert(usage_records), rows)

    @staticmethod
    def _where(query: UsageQuery) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        columns = usage_records.c
        if query.filter_expr is not None:
            conditions.append(compile_filter(query.filter_expr, _UsageColumns()))
        if query.tenant is not None:
            conditions.append(columns.tenant == query.tenant)
        if query.start_time is not None:
            conditions.append(columns.start_time >= query.start_time)
        if query.end_time is not None:
            conditions.append(columns.start_time < query.end_time)
        return conditions

    def list_records(self, query: UsageQuery, limit: int, before_id: int | None) -> list[UsageRecord]:
        conditions = self._where(query)
        if before_id is not None:
            conditions.append(usage_records.c.pk < before_id)
        statement = (select(usage_records).where(*conditions)
                     .order_by(usage_records.c.pk.desc()).limit(limit))
        with self._engine.connect() as connection:
            rows = connection.execute(statement).all()
        return [UsageRecord(
            tenant=row.tenant, principal=row.principal, deployment=row.deployment,
            version=row.version, kind=row.kind, start_time=_aware(row.start_time),
            duration_seconds=row.duration_seconds, outcome=row.outcome,
            prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
            requests=row.requests, rows=row.rows, record_id=row.pk) for row in rows]

    def summarize(self, query: UsageQuery, group_by: Sequence[str]) -> list[UsageTotals]:
        columns = usage_records.c
        keys = [columns[name] for name in group_by]
        statement = select(
            *keys, func.coalesce(func.sum(columns.requests), 0),
            func.coalesce(func.sum(columns.rows), 0),
            func.coalesce(func.sum(columns.prompt_tokens), 0),
            func.coalesce(func.sum(columns.completion_tokens), 0),
        ).where(*self._where(query))
        if keys:
            statement = statement.group_by(*keys).order_by(*keys)
        with self._engine.connect() as connection:
            rows = connection.execute(statement).all()
        totals = []
        for row in rows:
            named = dict(zip(group_by, row[:len(keys)], strict=True))
            requests, row_count, prompt, completion = (int(v) for v in row[len(keys):])
            if not keys and requests == 0:
                continue  # SUM over nothing: no group at all
            totals.append(UsageTotals(named.get("tenant", ""), named.get("deployment", ""),
                                      requests, row_count, prompt, completion))
        return totals


@dataclass
class _Pending:
    record: UsageRecord
    committed: asyncio.Future[None] | None = None


@dataclass
class UsageLedger:
    """Buffered, batched appends to a `UsageStore`; reads go straight to the store."""

    store: UsageStore
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    durable_wait_seconds: float = 5.0
    """Longest `append_durable` waits for its commit."""
    on_written: list[Callable[[Sequence[UsageRecord]], None]] = field(default_factory=list)
    """Called with each batch once it is committed."""
    dropped: int = 0
    """Records dropped because the buffer was full (the database unreachable for long)."""
    _buffer: list[_Pending] = field(default_factory=list)
    _wake: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _closing: bool = False

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    def append(self, record: UsageRecord) -> None:
        """Buffer a record; a generation's is written at once, others within a flush."""
        self._push(_Pending(record))
        if record.kind == GENERATION and self._wake is not None:
            self._wake.set()

    async def append_durable(self, record: UsageRecord) -> None:
        """Buffer a record and return once it is committed (shares the next batch), or after
        `durable_wait_seconds` while the database cannot be written (the record stays
        buffered and is written when it can: a caller is never held by an outage)."""
        if self._task is None:  # not started (tests of the domain alone): write directly
            await asyncio.to_thread(self.store.insert_many, [record])
            for callback in self.on_written:
                callback([record])
            return
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._push(_Pending(record, committed))
        if self._wake is not None:
            self._wake.set()
        try:
            async with asyncio.timeout(self.durable_wait_seconds):
                await asyncio.shield(committed)
        except TimeoutError:
            _log.warning("a generation's usage record is not committed after %.0f s (the "
                         "database is not writable); it stays buffered", self.durable_wait_seconds)

    def _push(self, pending: _Pending) -> None:
        if len(self._buffer) >= MAX_BUFFERED_RECORDS:
            self._buffer.pop(0)
            self.dropped += 1
        self._buffer.append(pending)

    async def flush(self) -> None:
        """Write everything buffered now."""
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        try:
            await asyncio.to_thread(self.store.insert_many, [p.record for p in batch])
        except Exception:
            # Kept for the next flush (in front of newer records), the database may be back.
            _log.exception("writing %d usage record(s) failed; retrying at the next flush",
                           len(batch))
            self._buffer = batch + self._buffer
            del self._buffer[:max(len(self._buffer) - MAX_BUFFERED_RECORDS, 0)]
            raise
        for pending in batch:
            if pending.committed is not None and not pending.committed.done():
                pending.committed.set_result(None)
        for callback in self.on_written:
            callback([pending.record for pending in batch])

    async def _flush_forever(self) -> None:
        assert self._wake is not None
        while not self._closing:
            try:
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # logged in flush; keep the loop alive
                await asyncio.sleep(self.flush_seconds)

    async def close(self) -> None:
        """Stop the background task and write what is left."""
        self._closing = True
        if self._task is not None:
            if self._wake is not None:
                self._wake.set()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.flush()
        except Exception:
            _log.error("%d usage record(s) could not be written at shutdown",
                       len(self._buffer))
        self.store.close()

    async def list_records(self, query: UsageQuery, limit: int,
                   before_id: int | None) -> list[UsageRecord]:
        return await asyncio.to_thread(self.store.list_records, query, limit, before_id)

    async def summarize(self, query: UsageQuery, group_by: Sequence[str]) -> list[UsageTotals]:
        return await asyncio.to_thread(self.store.summarize, query, group_by)

    async def today_by_tenant(self, now: datetime) -> dict[str, tuple[int, int]]:
        """(requests, tokens) per tenant since the start of `now`'s UTC day: the daily
        quotas' starting point after a restart."""
        midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        totals = await self.summarize(UsageQuery(start_time=midnight), ("tenant",))
        return {t.tenant: (t.requests, t.prompt_tokens + t.completion_tokens) for t in totals}


@dataclass(frozen=True)
class UsagePage:
    """One page of records and the token of the next ("" on the last page)."""

    records: list[UsageRecord]
    next_page_token: str


class UsageReports:
    """The read use cases of the ledger as a caller may see them: an admin sees every tenant,
    anybody else only its own tenant's records (whatever its filter says)."""

    def __init__(self, ledger: UsageLedger, page_tokens: PageTokenCodec) -> None:
        self._ledger = ledger
        self._page_tokens = page_tokens

    @staticmethod
    def _query(principal: Principal, filter_text: str, start_time: datetime | None,
               end_time: datetime | None) -> UsageQuery:
        if start_time is not None and end_time is not None and end_time <= start_time:
            raise InvalidArgument.for_field(
                "end_time", f"must be after start_time ({start_time.isoformat()}), got "
                            f"{end_time.isoformat()}", reason="TIME_RANGE_EMPTY")
        return UsageQuery(
            filter_expr=parse_filter(filter_text, USAGE_FILTER_SCHEMA),
            tenant=None if principal.role >= Role.ADMIN else tenant_of(principal),
            start_time=start_time, end_time=end_time)

    async def list_page(self, principal: Principal, filter_text: str, start_time: datetime | None,
                   end_time: datetime | None, page_size: int, page_token: str) -> UsagePage:
        query = self._query(principal, filter_text, start_time, end_time)
        limit = clamp_page_size(page_size, default=100)
        fingerprint = query_fingerprint(
            filter_text, start_time.isoformat() if start_time else "",
            end_time.isoformat() if end_time else "", query.tenant or "")
        before_id = None
        if page_token:
            cursor = self._page_tokens.decode(page_token, fingerprint)
            before_id = cursor.get("before_id")
            if not isinstance(before_id, int):
                raise InvalidArgument.for_field("page_token", "does not hold a usage cursor",
                                                reason="PAGE_TOKEN_INVALID")
        records = await self._ledger.list_records(query, limit + 1, before_id)
        if len(records) <= limit:
            return UsagePage(records, "")
        records = records[:limit]
        return UsagePage(records, self._page_tokens.encode(
            {"before_id": records[-1].record_id}, fingerprint))

    async def summarize(self, principal: Principal, filter_text: str,
                        start_time: datetime | None, end_time: datetime | None,
                        group_by: Sequence[str]) -> list[UsageTotals]:
        unknown = set(group_by) - set(GROUP_FIELDS)
        if unknown:
            raise InvalidArgument.for_field("group_by", f"cannot group by {sorted(unknown)}",
                                            reason="GROUPING_UNKNOWN")
        query = self._query(principal, filter_text, start_time, end_time)
        return await self._ledger.summarize(query, group_by)


class TenantLabels:
    """A bounded `tenant` label: the configured tenants, or else the first `max_tenants` in
    name order of those the limits file names; every other tenant is "other"."""

    def __init__(self, configured: Iterable[str], known: Callable[[], Iterable[str]],
                 max_tenants: int = 20) -> None:
        self._configured = frozenset(configured)
        self._known = known
        self._max_tenants = max_tenants
        self._labelled: tuple[object, frozenset[str]] = (None, frozenset())

    def label(self, tenant: str) -> str:
        if self._configured:
            return tenant if tenant in self._configured else OTHER_TENANTS
        known = self._known()
        if known is not self._labelled[0]:  # the limits file changed: pick the N again
            self._labelled = (known, frozenset(sorted(known)[:self._max_tenants]))
        return tenant if tenant in self._labelled[1] else OTHER_TENANTS


class UsageMetrics:
    """OpenTelemetry counters of usage per tenant (bounded label) and deployment, and of
    limit rejections per limit."""

    def __init__(self, meter: Any, labels: TenantLabels) -> None:
        self._labels = labels
        self._requests = meter.create_counter(
            "maas.inference.usage.requests", unit="{request}",
            description="requests served per tenant (bounded label), deployment and kind")
        self._rows = meter.create_counter(
            "maas.inference.usage.rows", unit="{row}",
            description="Predict rows served per tenant (bounded label) and deployment")
        self._tokens = meter.create_counter(
            "maas.inference.usage.tokens", unit="{token}",
            description="generated and prompt tokens per tenant (bounded label), deployment "
                        "and kind of token")
        self._rejections = meter.create_counter(
            "maas.inference.limit.rejections", unit="{request}",
            description="calls refused or streams stopped by a tenant limit, per limit")

    def record(self, record: UsageRecord) -> None:
        attributes = {"tenant": self._labels.label(record.tenant),
                      "deployment": record.deployment}
        self._requests.add(record.requests, {**attributes, "kind": record.kind,
                                             "outcome": record.outcome})
        if record.rows:
            self._rows.add(record.rows, attributes)
        if record.prompt_tokens:
            self._tokens.add(record.prompt_tokens, {**attributes, "token": "prompt"})
        if record.completion_tokens:
            self._tokens.add(record.completion_tokens, {**attributes, "token": "completion"})

    def rejected(self, tenant: str, limit: str) -> None:
        self._rejections.add(1, {"tenant": self._labels.label(tenant), "limit": limit})
