"""Tenancy and usage ledger benchmark: what metering costs a request on the data path.

Prints one table. Measures, in one run on this machine, per request (median of interleaved
rounds):
- a bare `async with` around nothing (the reference);
- admission against a tenant's limits (requests/minute and day configured) with no ledger;
- admission plus a usage record appended to the ledger (SQLite, the default; PostgreSQL too
  when MAAS_TEST_POSTGRES_URL reaches one), the background flush running meanwhile;
- a finished generation's durable append (`append_durable`: returns once committed), with 8
  generations finishing together sharing one commit;
- with PostgreSQL: admission against limits that replicas share (`SharedLimits`: minute
  windows and stream leases in the database, a transaction per admission) beside the same
  admission in memory (one replica), for a Predict and for a stream (admitted and released);
and how fast the ledger writes a batch of records (records per second).

Run: `.venv/bin/python -m tests.bench.bench_usage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from maas_inference.shared_limits import SharedLimits
from maas_inference.tenancy import TenancyConfigSource, TenantLimiter
from maas_inference.usage import GENERATION, SqlUsageStore, UsageLedger, UsageRecord
from maas_runtime.auth import Principal, Role

from tests.support.postgres import fresh_postgres_database, postgres_unreachable_reason

CALLS = 5000
ROUNDS = 5
DURABLE_CALLS = 200
SHARED_CALLS = 300
"""Admissions per round on the shared (PostgreSQL) limits, a transaction each."""
PRINCIPAL = Principal("bench", Role.VIEWER)
LIMITS = ("default: {requests_per_minute: 100000000, requests_per_day: 100000000, "
          "tokens_per_minute: 1000000000, concurrent_streams: 1000000}\n")


async def bare() -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        async with contextlib.nullcontext():
            pass
    return (time.perf_counter() - started) / CALLS


async def admitted(limiter: TenantLimiter, calls: int = CALLS) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        async with limiter.admit_request(PRINCIPAL, "digits", rows=8) as call:
            call.version = "models/digits/versions/1"
    return (time.perf_counter() - started) / calls


async def streamed(limiter: TenantLimiter, calls: int = CALLS) -> float:
    """A generation's admission (a stream slot, a request, its prompt tokens), one charge of
    completion tokens and the slot's release."""
    started = time.perf_counter()
    for _ in range(calls):
        async with limiter.admit(PRINCIPAL, "chat", prompt_tokens=20) as lease:
            lease.charge(8)
    return (time.perf_counter() - started) / calls


async def round_trip(url: str, calls: int = SHARED_CALLS) -> float:
    """One `SELECT 1` on an open connection: the database's round trip, for scale."""
    import psycopg
    from maas_runtime.database import libpq_conninfo

    async with await psycopg.AsyncConnection.connect(libpq_conninfo(url),
                                                     autocommit=True) as connection:
        started = time.perf_counter()
        for _ in range(calls):
            await connection.execute("SELECT 1")
        return (time.perf_counter() - started) / calls


async def durable(ledger: UsageLedger, together: int) -> float:
    record = UsageRecord(tenant="bench", principal="bench", deployment="chat", version="v",
                         kind=GENERATION, start_time=datetime.now(UTC), duration_seconds=1.0,
                         outcome="OK", prompt_tokens=10, completion_tokens=100)
    started = time.perf_counter()
    for _ in range(DURABLE_CALLS // together):
        await asyncio.gather(*(ledger.append_durable(record) for _ in range(together)))
    return (time.perf_counter() - started) / (DURABLE_CALLS // together * together)


async def batch_rate(store: SqlUsageStore) -> float:
    records = [UsageRecord(tenant="bench", principal="bench", deployment="digits", version="v",
                           kind="predict", start_time=datetime.now(UTC), duration_seconds=0.001,
                           outcome="OK", rows=8) for _ in range(CALLS)]
    started = time.perf_counter()
    await asyncio.to_thread(store.insert_many, records)
    return CALLS / (time.perf_counter() - started)


async def measure(backends: dict[str, str], root: Path) -> list[list[str]]:
    limits = root / "limits.yaml"
    limits.write_text(LIMITS)
    source = TenancyConfigSource(limits)
    plain = TenantLimiter(source)
    ledgers = {}
    for name, url in backends.items():
        ledger = UsageLedger(SqlUsageStore.open(url, root / name), flush_seconds=1.0)
        await ledger.start()
        ledgers[name] = ledger
    metered = {name: TenantLimiter(source, ledger) for name, ledger in ledgers.items()}
    timings: dict[str, list[float]] = {"bare": [], "limits": [], "limits, stream": []}
    shared = None
    if "postgresql" in backends:
        shared = TenantLimiter(source, shared=SharedLimits(backends["postgresql"]))
        timings["limits shared (postgresql)"] = []
        timings["limits shared, stream (postgresql)"] = []
        timings["database round trip (postgresql)"] = []
    for name in ledgers:
        timings[f"limits + ledger ({name})"] = []
        timings[f"durable generation ({name})"] = []
        timings[f"durable, 8 together ({name})"] = []
    for _ in range(ROUNDS):  # interleaved, so background load hits every row alike
        timings["bare"].append(await bare())
        timings["limits"].append(await admitted(plain))
        timings["limits, stream"].append(await streamed(plain))
        if shared is not None:
            timings["limits shared (postgresql)"].append(await admitted(shared, SHARED_CALLS))
            timings["limits shared, stream (postgresql)"].append(
                await streamed(shared, SHARED_CALLS))
            timings["database round trip (postgresql)"].append(
                await round_trip(backends["postgresql"]))
        for name, limiter in metered.items():
            timings[f"limits + ledger ({name})"].append(await admitted(limiter))
            timings[f"durable generation ({name})"].append(await durable(ledgers[name], 1))
            timings[f"durable, 8 together ({name})"].append(await durable(ledgers[name], 8))
    rates = {name: await batch_rate(ledger.store) for name, ledger in ledgers.items()  # type: ignore[arg-type]
             }
    for ledger in ledgers.values():
        await ledger.close()
    if shared is not None:
        await shared.close()
    reference = statistics.median(timings["bare"])
    rows = [["path", "per call (µs, p50)", "× bare", "× limits"]]
    limits_only = statistics.median(timings["limits"])
    for name, values in timings.items():
        median = statistics.median(values)
        rows.append([name, f"{median * 1e6:.1f}", f"{median / reference:.1f}",
                     f"{median / limits_only:.2f}"])
    for name, rate in rates.items():
        rows.append([f"batch insert ({name})", f"{1e6 / rate:.1f}", "", f"{rate:,.0f} rec/s"])
    if shared is not None:
        for label, memory, sharing in (
                ("Predict", "limits", "limits shared (postgresql)"),
                ("stream", "limits, stream", "limits shared, stream (postgresql)")):
            local, remote = statistics.median(timings[memory]), statistics.median(timings[sharing])
            rows.append([f"shared limits add, per {label}", f"{(remote - local) * 1e6:.1f}",
                         "", f"{remote / local:.0f}x in memory"])
    return rows


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        backends = {"sqlite": ""}
        if postgres_unreachable_reason() is None:  # else the SQLite rows only
            with fresh_postgres_database() as database:
                backends["postgresql"] = database
                rows = await measure(backends, Path(directory))
        else:
            rows = await measure(backends, Path(directory))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"tenancy and usage ledger: {CALLS} calls x {ROUNDS} interleaved rounds, "
          f"{DURABLE_CALLS} durable appends per round")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    asyncio.run(main())
