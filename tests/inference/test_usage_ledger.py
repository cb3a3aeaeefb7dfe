"""The usage ledger on SQLite and PostgreSQL: records written, stopped, reopened and listed
(restart durability), a finished generation committed before `append_durable` returns,
filters, tenant confinement, time ranges, paging order and sums per tenant/deployment."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from maas_inference.usage import (
    GENERATION,
    PREDICT,
    USAGE_FILTER_SCHEMA,
    SqlUsageStore,
    UsageLedger,
    UsageQuery,
    UsageRecord,
)
from maas_runtime.errors import InvalidArgument
from maas_runtime.filtering import parse_filter

from tests.support.postgres import backend_url_fixture

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)

database_url = backend_url_fixture()  # "" for SQLite: the default, in the state directory


def record(tenant: str, deployment: str, minutes: int, *, kind: str = PREDICT, rows: int = 0,
           prompt: int = 0, completion: int = 0, outcome: str = "OK") -> UsageRecord:
    return UsageRecord(tenant=tenant, principal=tenant, deployment=deployment,
                       version=f"models/{deployment}/versions/1", kind=kind,
                       start_time=T0 + timedelta(minutes=minutes), duration_seconds=0.5,
                       outcome=outcome, prompt_tokens=prompt, completion_tokens=completion,
                       rows=rows)


async def open_ledger(database_url: str, state_dir: Path) -> UsageLedger:
    ledger = UsageLedger(SqlUsageStore.open(database_url, state_dir), flush_seconds=0.05)
    await ledger.start()
    return ledger


async def test_records_survive_a_restart(tmp_path, database_url):
    ledger = await open_ledger(database_url, tmp_path)
    ledger.append(record("alice", "digits", 0, rows=8))
    ledger.append(record("bob", "digits", 1, rows=2))
    await ledger.append_durable(record("alice", "chat", 2, kind=GENERATION, prompt=5,
                                       completion=9))
    ledger.append(record("alice", "digits", 3, rows=1))  # only buffered: close flushes it
    await ledger.close()

    reopened = await open_ledger(database_url, tmp_path)
    try:
        listed = await reopened.list_records(UsageQuery(), limit=10, before_id=None)
        assert [(r.tenant, r.deployment, r.rows, r.prompt_tokens, r.completion_tokens)
                for r in listed] == [("alice", "digits", 1, 0, 0), ("alice", "chat", 0, 5, 9),
                                     ("bob", "digits", 2, 0, 0), ("alice", "digits", 8, 0, 0)]
        assert listed[0].record_id > listed[1].record_id  # newest first
        assert listed[1].start_time == T0 + timedelta(minutes=2)
    finally:
        await reopened.close()


async def test_a_finished_generation_is_committed_when_append_durable_returns(tmp_path,
                                                                               database_url):
    ledger = await open_ledger(database_url, tmp_path)
    ledger.flush_seconds = 3600  # no periodic flush: only the generation's own
    try:
        await ledger.append_durable(record("alice", "chat", 0, kind=GENERATION, completion=3))
        other = SqlUsageStore.open(database_url, tmp_path)  # a second reader: what is on disk
        assert [r.completion_tokens for r in other.list_records(UsageQuery(), 10, None)] == [3]
        other.close()
    finally:
        await ledger.close()


async def test_filters_tenant_confinement_time_range_and_sums(tmp_path, database_url):
    ledger = await open_ledger(database_url, tmp_path)
    try:
        ledger.append(record("alice", "digits", 0, rows=8))
        ledger.append(record("alice", "chat", 5, kind=GENERATION, prompt=10, completion=20))
        ledger.append(record("bob", "digits", 10, rows=3))
        ledger.append(record("bob", "chat", 15, kind=GENERATION, prompt=1, completion=2,
                             outcome="CANCELLED"))
        await ledger.flush()

        def ids(records: list[UsageRecord]) -> list[tuple[str, str]]:
            return [(r.tenant, r.deployment) for r in records]

        by_filter = UsageQuery(parse_filter('deployment = "digits"', USAGE_FILTER_SCHEMA))
        assert ids(await ledger.list_records(by_filter, 10, None)) == [
            ("bob", "digits"), ("alice", "digits")]
        confined = UsageQuery(parse_filter('deployment = "digits"', USAGE_FILTER_SCHEMA),
                              tenant="alice")
        assert ids(await ledger.list_records(confined, 10, None)) == [("alice", "digits")]
        in_range = UsageQuery(start_time=T0 + timedelta(minutes=5),
                              end_time=T0 + timedelta(minutes=15))
        assert ids(await ledger.list_records(in_range, 10, None)) == [
            ("bob", "digits"), ("alice", "chat")]
        by_time_filter = UsageQuery(parse_filter(
            'start_time >= "2026-11-30T09:10:00Z" AND outcome = "CANCELLED"',
            USAGE_FILTER_SCHEMA))
        assert ids(await ledger.list_records(by_time_filter, 10, None)) == [("bob", "chat")]
        first = await ledger.list_records(UsageQuery(), 2, None)
        rest = await ledger.list_records(UsageQuery(), 10, first[-1].record_id)
        assert ids(first + rest) == [("bob", "chat"), ("bob", "digits"), ("alice", "chat"),
                                     ("alice", "digits")]

        per_tenant = await ledger.summarize(UsageQuery(), ("tenant",))
        assert [(t.tenant, t.requests, t.rows, t.prompt_tokens, t.completion_tokens)
                for t in per_tenant] == [("alice", 2, 8, 10, 20), ("bob", 2, 3, 1, 2)]
        per_both = await ledger.summarize(UsageQuery(tenant="bob"), ("tenant", "deployment"))
        assert [(t.tenant, t.deployment, t.requests) for t in per_both] == [
            ("bob", "chat", 1), ("bob", "digits", 1)]
        overall = await ledger.summarize(UsageQuery(), ())
        assert [(t.requests, t.rows) for t in overall] == [(4, 11)]
        assert await ledger.summarize(UsageQuery(tenant="nobody"), ()) == []
        today = await ledger.today_by_tenant(T0 + timedelta(hours=1))
        assert today == {"alice": (2, 30), "bob": (2, 3)}
    finally:
        await ledger.close()


@pytest.mark.parametrize("text", ['tenant = ', 'rows > 3', 'kind = "training"',
                                  'start_time > "yesterday"', "labels.a = 1"])
def test_bad_filters_are_invalid_argument_on_filter(text):
    with pytest.raises(InvalidArgument) as refused:
        parse_filter(text, USAGE_FILTER_SCHEMA)
    assert [v.field for v in refused.value.field_violations] == ["filter"]


WRITER = """
import asyncio, sys
from datetime import UTC, datetime
from pathlib import Path
from maas_inference.usage import GENERATION, PREDICT, SqlUsageStore, UsageLedger, UsageRecord

def record(kind, n):
    return UsageRecord(tenant="alice", principal="alice", deployment="chat", version="v",
                       kind=kind, start_time=datetime.now(UTC), duration_seconds=0.0,
                       outcome="OK", completion_tokens=n, rows=n)

async def main():
    ledger = UsageLedger(SqlUsageStore.open(sys.argv[1], Path(sys.argv[2])),
                         flush_seconds=3600)  # only generations make it flush
    await ledger.start()
    n = 0
    while True:
        n += 1
        ledger.append(record(PREDICT, n))
        await ledger.append_durable(record(GENERATION, n))
        print(n, flush=True)  # the generation's final response would go out now

asyncio.run(main())
"""


async def test_every_finished_generation_survives_a_kill_9(tmp_path, database_url):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, database_url, str(tmp_path),
        stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    finished = 0
    try:
        while finished < 30:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "the writer died"
            finished = int(line)
    finally:
        process.kill()  # SIGKILL: no flush, no close
        await process.wait()
    store = SqlUsageStore.open(database_url, tmp_path)
    try:
        generations = store.list_records(
            UsageQuery(parse_filter('kind = "generation"', USAGE_FILTER_SCHEMA)), 10_000, None)
    finally:
        store.close()
    kept = {r.completion_tokens for r in generations}
    assert set(range(1, finished + 1)) <= kept  # every generation the caller saw finish


class FlakyStore(SqlUsageStore):
    """A store whose database is down until `healed`."""

    healed = False

    def insert_many(self, records):
        if not self.healed:
            raise OSError("database unreachable")
        super().insert_many(records)


async def test_a_database_outage_never_holds_a_generation_and_loses_no_record(tmp_path,
                                                                             caplog):
    store = FlakyStore.open("", tmp_path)
    ledger = UsageLedger(store, flush_seconds=0.05, durable_wait_seconds=0.3)
    await ledger.start()
    try:
        started = asyncio.get_running_loop().time()
        await ledger.append_durable(record("alice", "chat", 0, kind=GENERATION, completion=4))
        assert asyncio.get_running_loop().time() - started < 2
        assert "stays buffered" in caplog.text
        ledger.append(record("alice", "digits", 1, rows=2))
        store.healed = True
        await asyncio.sleep(0.3)  # the next flushes write both
        listed = await ledger.list_records(UsageQuery(), 10, None)
        assert sorted((r.completion_tokens, r.rows) for r in listed) == [(0, 2), (4, 0)]
    finally:
        await ledger.close()


async def test_replicas_sharing_the_ledger_share_the_daily_quotas(tmp_path, database_url):
    """Two limiters (two replicas), each with its own ledger on one database: what one admits
    counts against the other's daily quota once it has read the shared totals back."""
    from maas_inference.tenancy import QuotaExceeded, TenancyConfigSource, TenantLimiter
    from maas_runtime.auth import Principal, Role

    limits = tmp_path / "limits.yaml"
    limits.write_text("default: {requests_per_day: 5}\n")
    replicas = []
    for _ in range(2):
        ledger = UsageLedger(SqlUsageStore.open(database_url, tmp_path), flush_seconds=0.05)
        await ledger.start()
        limiter = TenantLimiter(TenancyConfigSource(limits), ledger)
        ledger.on_written.append(limiter.written)
        replicas.append((ledger, limiter))
    (first_ledger, first), (second_ledger, second) = replicas
    alice = Principal("alice", Role.VIEWER)

    async def predict(limiter: TenantLimiter) -> None:
        async with limiter.admit_request(alice, "digits", rows=1):
            pass

    async def share() -> None:
        for ledger, _ in replicas:
            await ledger.flush()
        for ledger, limiter in replicas:
            limiter.share_today(await ledger.today_by_tenant(datetime.now(UTC)))

    try:
        for _ in range(3):
            await predict(first)
        await predict(second)
        await share()
        await predict(second)  # 3 + 2 = 5: the quota
        await share()
        for limiter in (first, second):
            with pytest.raises(QuotaExceeded):
                await predict(limiter)
        await share()  # reading back again counts nothing twice
        with pytest.raises(QuotaExceeded):
            await predict(first)
        bob = Principal("bob", Role.VIEWER)
        async with second.admit_request(bob, "digits", rows=1):
            pass  # another tenant: untouched
    finally:
        for ledger, _ in replicas:
            await ledger.close()
