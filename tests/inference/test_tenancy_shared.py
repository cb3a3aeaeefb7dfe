"""Tenant limits shared by replicas on one PostgreSQL (real database, limiters as replicas):
requests and tokens per minute and concurrent streams hold between replicas together, also
when many admissions race; a refused call consumes nothing; the answers (RetryInfo,
QuotaFailure) are those of the in-memory limiter; a replica that dies frees its streams after
the lease time while a live one keeps them by renewing; a limits file change applies without a
restart; an unreachable database leaves each replica to its own counts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from maas_inference.shared_limits import SharedLimits
from maas_inference.tenancy import LimitKind, QuotaExceeded, TenancyConfigSource, TenantLimiter
from maas_inference.usage import VERSION_TABLE, SqlUsageStore
from maas_runtime.auth import Principal

from tests.inference.test_tenancy import ALICE, BOB, Clock, assert_refusal, write_limits
from tests.support.postgres import database_schema, postgres_url_fixture

postgres_url = postgres_url_fixture()
pytestmark = pytest.mark.postgres

LEASE_SECONDS = 15.0


@contextlib.asynccontextmanager
async def replicas(url: str, tmp_path: Path, limits: str, clock: Clock, count: int = 2,
                   pool_size: int = 4) -> AsyncIterator[tuple[list[TenantLimiter], Path]]:
    """`count` limiters on the database at `url` (migrated as the service does), as separate
    replicas would run them: each with its own connections and the same limits file."""
    SqlUsageStore.open(url, tmp_path).close()
    path = tmp_path / "limits.yaml"
    write_limits(path, limits)
    limiters = [TenantLimiter(TenancyConfigSource(path, recheck_seconds=0, monotonic=clock),
                              clock=clock, monotonic=clock,
                              shared=SharedLimits(url, LEASE_SECONDS, pool_size=pool_size,
                                                  replica=f"replica-{number}"))
                for number in range(count)]
    try:
        yield limiters, path
    finally:
        for limiter in limiters:
            await limiter.close()


async def request(limiter: TenantLimiter, principal: Principal = ALICE) -> bool:
    """One Predict admission: True when admitted, False when refused by a tenant limit."""
    try:
        async with limiter.admit_request(principal, "digits", rows=1):
            return True
    except QuotaExceeded:
        return False


def test_migrations_add_the_shared_tables(postgres_url, tmp_path):
    SqlUsageStore.open(postgres_url, tmp_path).close()
    schema = database_schema(postgres_url, VERSION_TABLE)
    assert schema.versions == ["0003"]
    assert {"usage_records", "tenant_minute_usage", "tenant_stream_leases"} <= schema.tables


async def test_two_replicas_enforce_one_requests_per_minute_limit_between_them(
        postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {requests_per_minute: 5}",
                        clock) as ([a, b], _):
        admitted = []
        for number in range(5):
            admitted.append(await request(a if number % 2 else b))
            clock.now += 10
        assert admitted == [True] * 5
        for replica in (a, b):
            with pytest.raises(QuotaExceeded) as refused:
                async with replica.admit_request(ALICE, "digits", rows=1):
                    pass
            # The same answer the in-memory limiter gives: the first request (t0) leaves the
            # window at t0 + 60; it is t0 + 50 now.
            assert_refusal(refused.value, LimitKind.REQUESTS_PER_MINUTE, 5, 10.0)
        assert await request(a, BOB) and await request(b, BOB)  # bob has his own window
        clock.now += 11
        assert await request(b)
        assert not await request(a)


async def test_racing_admissions_on_two_replicas_never_exceed_the_limit(postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {requests_per_minute: 7}",
                        clock) as ([a, b], _):
        outcomes = await asyncio.gather(*(request(a if n % 2 else b) for n in range(60)))
        assert outcomes.count(True) == 7
        clock.now += 61
        outcomes = await asyncio.gather(*(request(a if n % 2 else b) for n in range(60)))
        assert outcomes.count(True) == 7


async def test_racing_streams_on_two_replicas_never_exceed_the_concurrent_limit(
        postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {concurrent_streams: 3}",
                        clock) as ([a, b], _):
        admissions = [(a if n % 2 else b).admit(ALICE, "chat", prompt_tokens=1)
                      for n in range(30)]
        entered = await asyncio.gather(*(admission.__aenter__() for admission in admissions),
                                       return_exceptions=True)
        running = [admission for admission, lease in zip(admissions, entered, strict=True)
                   if not isinstance(lease, BaseException)]
        refusals = [lease for lease in entered if isinstance(lease, BaseException)]
        assert len(running) == 3
        assert all(isinstance(refusal, QuotaExceeded) for refusal in refusals)
        assert_refusal(refusals[0], LimitKind.CONCURRENT_STREAMS, 3, 1.0)  # type: ignore[arg-type]
        for admission in running:
            await admission.__aexit__(None, None, None)
        # Every slot is free again, on both replicas.
        again = [(a if n % 2 else b).admit(ALICE, "chat", prompt_tokens=1) for n in range(3)]
        for admission in again:
            await admission.__aenter__()
        for admission in again:
            await admission.__aexit__(None, None, None)


async def test_a_refused_admission_consumes_nothing(postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {tokens_per_minute: 100}",
                        clock) as ([a, b], _):
        async with a.admit(ALICE, "chat", prompt_tokens=89):
            pass
        for _ in range(5):
            with pytest.raises(QuotaExceeded) as refused:
                async with b.admit(ALICE, "chat", prompt_tokens=20):
                    pass
        assert_refusal(refused.value, LimitKind.TOKENS_PER_MINUTE, 100, 60.0)
        async with b.admit(ALICE, "chat", prompt_tokens=10):  # 99: the refusals took nothing
            pass
        with pytest.raises(QuotaExceeded):
            async with a.admit(ALICE, "chat", prompt_tokens=2):  # 101 with its first token
                pass


async def test_tokens_streamed_on_one_replica_count_on_the_other(postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {tokens_per_minute: 100}",
                        clock) as ([a, b], _):
        async with a.admit(ALICE, "chat", prompt_tokens=10) as lease:
            assert lease.charge(50)
        await a.flush_charges()
        async with b.admit(ALICE, "chat", prompt_tokens=10) as lease:
            assert lease.charge(20)
            assert not lease.charge(20)  # 10 + 50 + 10 + 40 = 110 over both replicas
            assert lease.exceeded is not None
            assert_refusal(lease.exceeded, LimitKind.TOKENS_PER_MINUTE, 100, 60.0)
        await b.flush_charges()
        with pytest.raises(QuotaExceeded):
            async with a.admit(ALICE, "chat", prompt_tokens=1):
                pass
        clock.now += 61
        async with a.admit(ALICE, "chat", prompt_tokens=1):
            pass


async def test_a_stream_ending_frees_its_slot_on_every_replica(postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {concurrent_streams: 1}",
                        clock) as ([a, b], _):
        async with a.admit(ALICE, "chat", prompt_tokens=1):
            with pytest.raises(QuotaExceeded):
                async with b.admit(ALICE, "chat", prompt_tokens=1):
                    pass
            async with b.admit(BOB, "chat", prompt_tokens=1):
                pass  # another tenant's slot
            assert await request(b)  # Predict holds no stream
        async with b.admit(ALICE, "chat", prompt_tokens=1):
            pass


async def test_a_dead_replicas_streams_lapse_after_the_lease_and_a_live_ones_do_not(
        postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {concurrent_streams: 2}",
                        clock, count=3) as ([a, b, c], _):
        held = [a.admit(ALICE, "chat", prompt_tokens=1), c.admit(ALICE, "chat", prompt_tokens=1)]
        for admission in held:
            await admission.__aenter__()
        # Both replicas live and renewing: their streams hold the slots past the lease time.
        for _ in range(3):
            clock.now += LEASE_SECONDS * 2 / 3
            await a.renew_leases()
            await c.renew_leases()
        with pytest.raises(QuotaExceeded) as refused:
            async with b.admit(ALICE, "chat", prompt_tokens=1):
                pass
        assert_refusal(refused.value, LimitKind.CONCURRENT_STREAMS, 2, 1.0)
        # Replica a dies: its limiter is dropped without its streams being released.
        await a.close()
        clock.now += LEASE_SECONDS / 2
        await c.renew_leases()
        with pytest.raises(QuotaExceeded):  # a's lease has not lapsed yet
            async with b.admit(ALICE, "chat", prompt_tokens=1):
                pass
        clock.now += LEASE_SECONDS / 2 + 1
        await c.renew_leases()
        async with b.admit(ALICE, "chat", prompt_tokens=1):  # a's slot, c's still held
            with pytest.raises(QuotaExceeded):
                async with b.admit(ALICE, "chat", prompt_tokens=1):
                    pass
        await held[1].__aexit__(None, None, None)


async def test_a_limits_file_change_applies_on_every_replica_without_restart(
        postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {requests_per_minute: 1}",
                        clock) as ([a, b], path):
        assert await request(a)
        assert not await request(b)
        write_limits(path, "default: {requests_per_minute: 1}\n"
                           "tenants: {alice: {requests_per_minute: 3}}", bump=1)
        assert [await request(b), await request(a), await request(b)] == [True, True, False]
        write_limits(path, "default: {requests_per_minute: 1}\n"
                           "tenants: {alice: {requests_per_minute: null}}", bump=2)
        assert all([await request(a), await request(b)])


def limiter_on_unreachable_database(tmp_path, limits: str) -> TenantLimiter:
    """A limiter with `limits`, told to share them through a database nothing answers for."""
    clock = Clock()
    path = tmp_path / "limits.yaml"
    write_limits(path, limits)
    return TenantLimiter(
        TenancyConfigSource(path, recheck_seconds=0, monotonic=clock), clock=clock,
        monotonic=clock, shared=SharedLimits("postgresql://postgres@127.0.0.1:1/nowhere"))


async def test_an_unreachable_database_leaves_each_replica_to_its_own_counts(tmp_path, caplog):
    limiter = limiter_on_unreachable_database(tmp_path, "default: {requests_per_minute: 2}")
    try:
        with caplog.at_level(logging.WARNING, logger="maas_inference.tenancy"):
            assert [await request(limiter) for _ in range(3)] == [True, True, False]
        assert "admits on its own counts" in caplog.text
    finally:
        await limiter.close()


async def test_calls_no_minute_or_stream_limit_concerns_never_reach_the_database(
        tmp_path, caplog):
    limiter = limiter_on_unreachable_database(
        tmp_path, "default: {requests_per_day: 2, tokens_per_minute: 5}")
    try:
        with caplog.at_level(logging.WARNING, logger="maas_inference.tenancy"):
            # Predict spends no tokens: only the (ledger-shared) daily quota concerns it.
            assert [await request(limiter) for _ in range(3)] == [True, True, False]
        assert caplog.text == ""
    finally:
        await limiter.close()


async def test_rows_nobody_counts_any_more_are_forgotten(postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {requests_per_minute: 10, "
                                                "concurrent_streams: 5}", clock) as ([a, _], _):
        assert await request(a)
        abandoned = a.admit(ALICE, "chat", prompt_tokens=1)
        await abandoned.__aenter__()  # its replica "dies": never released, never renewed
        clock.now += 30
        assert await request(a, BOB)
        shared = SharedLimits(postgres_url)
        try:
            await shared.forget_stale(clock.now + 31)  # alice's second is 61 s old, bob's 31
            assert await table_rows(postgres_url) == ([("bob",)], [])
        finally:
            await shared.close()


async def table_rows(url: str) -> tuple[list[tuple], list[tuple]]:
    """(tenants of tenant_minute_usage rows, tenants of tenant_stream_leases rows)."""
    import psycopg
    from maas_runtime.database import libpq_conninfo

    async with await psycopg.AsyncConnection.connect(libpq_conninfo(url)) as connection:
        seconds = await (await connection.execute(
            "SELECT tenant FROM tenant_minute_usage ORDER BY tenant")).fetchall()
        leases = await (await connection.execute(
            "SELECT tenant FROM tenant_stream_leases ORDER BY tenant")).fetchall()
    return seconds, leases


async def test_streamed_tokens_reach_the_other_replicas_without_being_asked(
        postgres_url, tmp_path):
    clock = Clock()
    async with replicas(postgres_url, tmp_path, "default: {tokens_per_minute: 100}",
                        clock) as ([a, b], _):
        async with a.admit(ALICE, "chat", prompt_tokens=5) as lease:
            assert lease.charge(94)  # written by a's background flush, nobody calls it

        # b's probes take a token each: at most 40 of them stay far below the limit, so a
        # refusal can only come from a's 99 tokens reaching the shared window.
        for _ in range(40):
            try:
                async with b.admit(ALICE, "chat", prompt_tokens=1):
                    pass  # a's tokens not written yet
            except QuotaExceeded as refusal:
                assert refusal.kind is LimitKind.TOKENS_PER_MINUTE
                break
            await asyncio.sleep(0.25)
        else:
            pytest.fail("a's streamed tokens never reached the shared window")
