"""Minute windows and concurrent streams that replicas share, in their PostgreSQL database.

One replica keeps a tenant's minute windows and stream count in memory
(`maas_inference.tenancy`). Replicas on one PostgreSQL (`database_url`) would each enforce the
whole limit that way, handing a tenant N times its limit; with `SharedLimits` they count in two
tables of the usage database (`usage_migrations` 0002) instead:

- `tenant_minute_usage`: one row per (tenant, second) with the requests and tokens admitted or
  charged in that second; a tenant's window is its rows of the last 60 seconds (older rows,
  and lapsed leases, are deleted by each replica's background work every third of the lease
  time, `forget_stale`);
- `tenant_stream_leases`: one row per running stream with the replica holding it and an expiry
  (`lease_seconds` ahead) that the replica renews every third of it while the stream runs. A
  replica that dies stops renewing: its streams lapse after at most `lease_seconds` and stop
  counting against the tenant.

An admission is one statement, `maas_tenant_admit` (a function of usage migration 0003), run
under a per-tenant advisory lock (`pg_advisory_xact_lock`): it reads the tenant's window and
live streams, applies the limiter's minute and stream checks, and only when they pass adds the
request and its prompt tokens to the current second and inserts the stream's lease. It returns
what it read, from which the limiter builds the answer with its own checks (so a refusal has
the same RetryInfo and QuotaFailure as in memory). Replicas racing for a tenant's last slot are
serialised by the lock: a refused call consumes nothing, and the limit holds between all of
them. One round trip, on a small pool of connections.

Completion tokens charged while a generation streams (`Lease.charge`, synchronous) are added
to the tenant's cached window at once and written to the shared table by a background flush
(an atomic `INSERT … ON CONFLICT DO UPDATE` per tenant and second), which also reads the
tenant's window back; the decision to stop a stream therefore sees the other replicas' tokens
as of the last flush or admission.

Times are the replicas' wall clocks (epoch seconds): replicas are assumed to keep them in step
(NTP); a skew of s seconds shifts a window's edge by s. Should the database be unreachable, the
limiter falls back to this replica's own counts (see `TenantLimiter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
from maas_runtime.database import libpq_conninfo

_log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
TENANT_LOCK_NAMESPACE = 0x6D617174
"""pg_advisory_xact_lock(namespace, hashtext(tenant)), taken by maas_tenant_admit (the usage
migration 0003 writes the same number)."""
DEFAULT_LEASE_SECONDS = 15.0
DEFAULT_POOL_SIZE = 4

_SESSION = (
    # Counters that live a minute need no wait for the WAL flush at commit: a database crash
    # forgets at most the last moments' counts.
    "-c synchronous_commit=off "
    # A replica frozen (SIGSTOP, a stalled VM) inside a charge flush's transaction holds the
    # row locks of its tenants' current seconds, which admissions update: the server ends
    # that session, so the other replicas wait at most this long (an admission is a single
    # statement: its tenant lock ends with it).
    "-c idle_in_transaction_session_timeout=5s "
    "-c statement_timeout=5s")
_ADMIT = "SELECT * FROM maas_tenant_admit(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_ADD_TO_SECOND = (
    "INSERT INTO tenant_minute_usage AS u (tenant, second, requests, tokens) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant, second) DO UPDATE "
    "SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens")
_FORGET_OLD_SECONDS = "DELETE FROM tenant_minute_usage WHERE second <= %s"
_FORGET_LAPSED_LEASES = "DELETE FROM tenant_stream_leases WHERE expires_at <= %s"
_RELEASE_LEASE = "DELETE FROM tenant_stream_leases WHERE lease_id = %s"
_RENEW_LEASES = (
    "INSERT INTO tenant_stream_leases AS l (lease_id, tenant, replica, expires_at) "
    "SELECT lease_id, tenant, %s, %s FROM unnest(%s::text[], %s::text[]) AS r(lease_id, tenant) "
    "ON CONFLICT (lease_id) DO UPDATE SET expires_at = EXCLUDED.expires_at")
_WINDOWS_OF = ("SELECT tenant, second, requests, tokens FROM tenant_minute_usage "
               "WHERE tenant = ANY(%s) AND second > %s ORDER BY tenant, second")


@dataclass(frozen=True)
class SharedWindow:
    """A tenant's rows of the last minute, oldest first: (second, requests, tokens)."""

    seconds: list[tuple[int, int, int]]
    live_streams: int

    def requests(self) -> list[tuple[int, int]]:
        """(second, requests) of the window, oldest first."""
        return [(second, requests) for second, requests, _ in self.seconds]

    def tokens(self) -> list[tuple[int, int]]:
        """(second, tokens) of the window, oldest first."""
        return [(second, tokens) for second, _, tokens in self.seconds]


@dataclass(frozen=True)
class Ask:
    """One admission as the database decides it: the tenant's minute and stream limits (None:
    unlimited), the call's prompt tokens, its stream lease (None: a plain request), and
    `refuse` when the caller already refuses it (a daily quota): then nothing is recorded."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    concurrent_streams: int | None
    tokens: int
    lease_id: str | None
    refuse: bool = False


def replica_name() -> str:
    """This process among the replicas (host, pid and a random part, for the leases' rows)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _Pool:
    """A few psycopg async connections, opened when first needed; a connection that failed
    is closed and replaced by a new one on a later use. Autocommit: a single statement is
    one round trip, and admissions open their transaction (`connection.transaction()`)."""

    def __init__(self, conninfo: str, size: int) -> None:
        self._conninfo = conninfo
        self._idle: asyncio.LifoQueue[psycopg.AsyncConnection | None] = asyncio.LifoQueue()
        for _ in range(size):
            self._idle.put_nowait(None)  # a free slot, connected on first use
        self._open: set[psycopg.AsyncConnection] = set()
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._closed:  # e.g. a stream ending after shutdown: its lease lapses instead
            raise ConnectionError("the shared tenant limits are closed")
        connection = await self._idle.get()
        try:
            if connection is None or connection.closed:
                connection = await psycopg.AsyncConnection.connect(
                    self._conninfo, connect_timeout=5, autocommit=True, options=_SESSION)
                self._open.add(connection)
            yield connection
        except BaseException:
            if connection is not None:
                self._open.discard(connection)
                with contextlib.suppress(Exception):
                    await connection.close()
            connection = None
            raise
        finally:
            self._idle.put_nowait(connection)

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._open):
            with contextlib.suppress(Exception):
                await connection.close()
        self._open.clear()


class SharedLimits:
    """The shared tables of one database, as one replica uses them.

    `admit` runs the caller's decision inside the tenant's lock; `charge` (synchronous) queues
    completion tokens for the background flush; `release` ends a stream's lease; `renew`
    (called periodically by `run`) keeps this replica's running streams' leases alive.
    """

    def __init__(self, database_url: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 pool_size: int = DEFAULT_POOL_SIZE, replica: str | None = None) -> None:
        self.lease_seconds = lease_seconds
        self.replica = replica or replica_name()
        self._pool = _Pool(libpq_conninfo(database_url), pool_size)
        self._running: dict[str, str] = {}
        """lease id → tenant, of the streams this replica runs."""
        self._pending: dict[tuple[str, int], int] = defaultdict(int)
        """(tenant, second) → completion tokens charged and not yet written."""
        self._flush_wanted = asyncio.Event()
        self._flushing = asyncio.Lock()

    async def admit(self, tenant: str, now: float, ask: Ask) -> tuple[bool, SharedWindow]:
        """(admitted, the tenant's window and live streams as they were before): one statement
        (`maas_tenant_admit`, usage migration 0003) that, under the tenant's lock, reads them,
        decides as the limiter's checks do and records the call only when admitted."""
        lease_id = ask.lease_id
        async with self._pool.connection() as connection:
            cursor = await connection.execute(_ADMIT, (
                tenant, now, lease_id is not None, ask.tokens, ask.requests_per_minute,
                ask.tokens_per_minute, ask.concurrent_streams, ask.refuse, lease_id,
                self.replica, self.lease_seconds))
            row = await cursor.fetchone()
        if row is None:
            raise RuntimeError("maas_tenant_admit returned no row")
        admitted, seconds, requests, tokens, live = row
        window = SharedWindow(list(zip(seconds, requests, tokens, strict=True)), int(live))
        if admitted and lease_id is not None:
            self._running[lease_id] = tenant
        return bool(admitted), window

    def charge(self, tenant: str, now: float, tokens: int) -> None:
        """Queue completion tokens for the shared window (written by `flush`)."""
        if tokens > 0:
            self._pending[(tenant, int(now))] += tokens
            self._flush_wanted.set()

    def unwritten(self, tenant: str) -> list[tuple[int, int]]:
        """(second, tokens) charged for `tenant` and not written yet."""
        return sorted((second, tokens) for (name, second), tokens in self._pending.items()
                      if name == tenant)

    async def release(self, lease_id: str) -> None:
        """The stream ended: its slot frees for every replica at once."""
        self._running.pop(lease_id, None)
        async with self._pool.connection() as connection:
            await connection.execute(_RELEASE_LEASE, (lease_id,))

    async def renew(self, now: float) -> None:
        """Push the expiry of this replica's running streams `lease_seconds` ahead (and put
        back any lease another replica dropped as lapsed while this one could not renew)."""
        if not self._running:
            return
        ids, tenants = list(self._running), list(self._running.values())
        async with self._pool.connection() as connection:
            await connection.execute(_RENEW_LEASES, (
                self.replica, now + self.lease_seconds, ids, tenants))

    async def forget_stale(self, now: float) -> None:
        """Delete every tenant's seconds older than a minute and lapsed leases (rows no
        admission counts any more; any replica may do it)."""
        async with self._pool.connection() as connection, connection.pipeline():
            await connection.execute(_FORGET_OLD_SECONDS, (int(now) - WINDOW_SECONDS,))
            await connection.execute(_FORGET_LAPSED_LEASES, (now,))

    async def flush(self, now: float) -> dict[str, SharedWindow]:
        """Write the queued completion tokens; returns the windows of the tenants written, as
        the table has them now (the stream counts left 0: not read here). Returns once
        everything charged before the call is committed (a flush under way is waited for)."""
        async with self._flushing:
            return await self._flush(now)

    async def _flush(self, now: float) -> dict[str, SharedWindow]:
        pending, self._pending = self._pending, defaultdict(int)
        if not pending:
            return {}
        tenants = sorted({tenant for tenant, _ in pending})
        try:
            async with self._pool.connection() as connection:
                async with connection.transaction():
                    async with connection.pipeline():
                        for (tenant, second), tokens in sorted(pending.items()):
                            await connection.execute(_ADD_TO_SECOND, (tenant, second, 0, tokens))
                        cursor = await connection.execute(
                            _WINDOWS_OF, (tenants, int(now) - WINDOW_SECONDS))
                        rows = await cursor.fetchall()
        except BaseException:
            for key, tokens in pending.items():  # kept for the next flush
                self._pending[key] += tokens
            raise
        windows: dict[str, list[tuple[int, int, int]]] = {tenant: [] for tenant in tenants}
        for tenant, second, requests, tokens in rows:
            windows[tenant].append((int(second), int(requests), int(tokens)))
        return {tenant: SharedWindow(seconds, 0) for tenant, seconds in windows.items()}

    async def wait_for_charges(self, timeout: float) -> None:
        """Return when tokens were charged since the last call, or after `timeout`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._flush_wanted.wait()
        self._flush_wanted.clear()

    @property
    def running_streams(self) -> int:
        return len(self._running)

    async def close(self) -> None:
        """Close the connections; this replica's leases are left to lapse (not released)."""
        await self._pool.close()
