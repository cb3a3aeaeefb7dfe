"""The job table shared by replicas: the store on SQLite and PostgreSQL, its migrations, and
job managers that share one PostgreSQL table (claims, leases, takeover, cross-replica cancel
and watch, kill -9 of a job-holding replica)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from maas_jobs.records import EventKind, JobDraft, JobState
from maas_jobs.store import VERSION_TABLE, SqlJobStore

from tests.jobs.step_jobs import COLLECTION, completes_of, runs_of, step_job, step_manager
from tests.support.postgres import (
    backend_url_fixture,
    database_schema,
    postgres_url_fixture,
    run_together,
)

REPO = Path(__file__).resolve().parents[2]

job_table_url = backend_url_fixture("jobs.db")
postgres_url = postgres_url_fixture()


@pytest.fixture
def store(job_table_url):
    job_store = SqlJobStore.open(job_table_url, COLLECTION)
    yield job_store
    job_store.close()


# -- the store, on both backends ---------------------------------------------------------------


def test_a_queued_job_is_claimed_by_one_replica_under_a_lease(store):
    store.create(JobDraft("j", {}, "t", "alice"), "queued")
    claimed = store.claim("j", "replica-a", 30, "started by replica-a")
    assert claimed.state is JobState.RUNNING and claimed.lease_owner == "replica-a"
    assert claimed.lease_expires > claimed.start_time
    assert store.claim("j", "replica-b", 30, "started by replica-b") is None
    assert store.lapsed("replica-b") == []  # held, and not b's own
    assert [job.job_id for job in store.lapsed("replica-a")] == ["j"]  # a's own: after a restart
    assert store.renew_leases("replica-a", ["j"], 30) == {"j"}
    assert store.renew_leases("replica-b", ["j"], 30) == set()
    events = store.events_after("j", 0, 10)
    assert [e.payload["state"] for e in events] == ["QUEUED", "RUNNING"]


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_can_no_longer_end_the_job(store):
    store.create(JobDraft("j", {}, "t", "alice"), "queued")
    store.claim("j", "replica-a", 0.2, "started")
    time.sleep(0.3)
    assert [job.job_id for job in store.lapsed("replica-b")] == ["j"]
    taken = store.take_over("j", "replica-b", 30, "replica-a stopped renewing its lease")
    assert taken.lease_owner == "replica-b" and taken.resume_count == 1
    assert store.take_over("j", "replica-c", 30, "too late") is None
    assert store.renew_leases("replica-a", ["j"], 30) == set()  # a learns it lost the job
    assert store.transition("j", [JobState.RUNNING], JobState.FAILED, "a's late outcome",
                            owner="replica-a") is None
    assert store.start_publishing("j", "replica-a") is None
    done = store.transition("j", [JobState.RUNNING], JobState.SUCCEEDED, "ok", owner="replica-b")
    assert done.state is JobState.SUCCEEDED and done.lease_expires is None
    log = [e.payload["message"] for e in store.events_after("j", 0, 10) if e.kind is EventKind.LOG]
    assert log == ["replica-a stopped renewing its lease"]


def test_a_publishing_job_cannot_be_cancelled_and_a_released_lease_lapses_at_once(store):
    store.create(JobDraft("p", {}, "t", "alice"), "queued")
    store.claim("p", "replica-a", 30, "started")
    assert store.start_publishing("p", "replica-a").publishing
    assert store.transition("p", [JobState.RUNNING], JobState.CANCELLED, "stop",
                            unless_publishing=True) is None
    assert store.get("p").state is JobState.RUNNING
    store.create(JobDraft("r", {}, "t", "alice"), "queued")
    store.claim("r", "replica-a", 30, "started")
    assert store.lapsed("replica-b") == []
    store.release_leases("replica-a", ["r", "p"])
    assert {job.job_id for job in store.lapsed("replica-b")} == {"r", "p"}


# -- migrations ----------------------------------------------------------------------------------

_PRE_MIGRATION_SCHEMA = """
CREATE TABLE jobs (pk INTEGER PRIMARY KEY, job_id VARCHAR(63) NOT NULL UNIQUE, spec JSON NOT NULL,
  state VARCHAR(16) NOT NULL, tenant VARCHAR(63) NOT NULL, creator VARCHAR(256) NOT NULL,
  priority INTEGER NOT NULL, workers INTEGER NOT NULL, create_time DATETIME NOT NULL,
  start_time DATETIME, end_time DATETIME, epoch INTEGER NOT NULL, metrics JSON NOT NULL,
  error_code VARCHAR(32), error_message TEXT, result JSON NOT NULL, resume_count INTEGER NOT NULL,
  process_id INTEGER, last_sequence BIGINT NOT NULL);
CREATE TABLE job_events (job_pk INTEGER NOT NULL REFERENCES jobs (pk) ON DELETE CASCADE,
  sequence BIGINT NOT NULL, time DATETIME NOT NULL, kind VARCHAR(16) NOT NULL,
  payload JSON NOT NULL, PRIMARY KEY (job_pk, sequence));
INSERT INTO jobs VALUES (1, 'old', '{}', 'RUNNING', 't', 'alice', 0, 1, '2026-01-01 00:00:00.000000',
  '2026-01-01 00:00:01.000000', NULL, 3, '{"loss": 0.5}', NULL, NULL, '{}', 0, NULL, 2);
INSERT INTO job_events VALUES (1, 1, '2026-01-01 00:00:00.000000', 'state_change',
  '{"state": "QUEUED", "reason": "queued"}');
INSERT INTO job_events VALUES (1, 2, '2026-01-01 00:00:01.000000', 'state_change',
  '{"state": "RUNNING", "reason": "go"}');
"""


def test_a_job_table_from_before_migrations_is_adopted_with_its_jobs(tmp_path):
    path = tmp_path / "trainer.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(_PRE_MIGRATION_SCHEMA)
    store = SqlJobStore.open_sqlite(path, COLLECTION)
    try:
        old = store.get("old")
        assert old.state is JobState.RUNNING and old.metrics == {"loss": 0.5} and old.epoch == 3
        assert old.lease_owner is None and not old.publishing
        assert [job.job_id for job in store.lapsed("anyone")] == ["old"]  # no lease: resumable
        assert store.take_over("old", "replica-a", 30, "resumed").resume_count == 1
        assert [e.sequence for e in store.events_after("old", 0, 10)] == [1, 2, 3]
    finally:
        store.close()
    reopened = SqlJobStore.open_sqlite(path, COLLECTION)  # migrated already: nothing to do
    try:
        assert reopened.get("old").lease_owner == "replica-a"
    finally:
        reopened.close()


def test_replicas_starting_together_migrate_the_shared_table_once(postgres_url):
    run_together(lambda _: SqlJobStore.open(postgres_url, COLLECTION).close())
    store = SqlJobStore.open(postgres_url, COLLECTION)  # and again: idempotent
    try:
        store.create(JobDraft("j", {}, "t", "alice"), "queued")
    finally:
        store.close()
    schema = database_schema(postgres_url, VERSION_TABLE)
    assert schema.versions == ["0002"]
    assert {"jobs", "job_events", VERSION_TABLE} <= schema.tables


# -- managers sharing one PostgreSQL table -------------------------------------------------------


async def _events(manager, job_id):
    return [event async for event in manager.watch(job_id)]


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_two_managers_on_one_postgresql_run_each_job_exactly_once(postgres_url, tmp_path):
    work = tmp_path / "work"  # shared, as replicas share a volume
    stores = [SqlJobStore.open(postgres_url, COLLECTION) for _ in range(2)]
    managers = [step_manager(store, work, f"replica-{n}") for n, store in enumerate(stores)]
    for manager in managers:
        await manager.start()
    try:
        job_ids = [f"j{n}" for n in range(8)]
        for n, job_id in enumerate(job_ids):
            await managers[n % 2].submit(step_job(job_id, steps=3, tenant=f"t{n % 3}"))
        await asyncio.wait_for(asyncio.gather(*(_events(managers[0], j) for j in job_ids)), 60)
        for job_id in job_ids:
            job = await managers[1].get(job_id)
            assert job.state is JobState.SUCCEEDED, (job_id, job.error)
            assert len(runs_of(work, job_id)) == 1, job_id  # one process, one replica
            assert completes_of(work, job_id) == [job.result["published_by"]]
            assert job.resume_count == 0 and job.lease_owner == job.result["published_by"]
    finally:
        for manager in managers:
            await manager.stop()
        for store in stores:
            store.close()


async def test_a_watch_on_another_replica_is_woken_by_each_event_of_the_job(postgres_url,
                                                                          tmp_path):
    """No polling: the replica watching hears of every event through NOTIFY."""
    work = tmp_path / "work"
    store_a, store_b = (SqlJobStore.open(postgres_url, COLLECTION) for _ in range(2))
    a = step_manager(store_a, work, "replica-a")
    b = step_manager(store_b, work, "replica-b", watch_poll_seconds=60)
    await a.start()
    try:
        await a.submit(step_job("j", steps=10, pause=0.3))
        await _wait_for(lambda: _reached(store_b, "j", 1), 30, "replica-a to run the job")
        await b.start()  # a holds the job: b only watches it
        received: list[tuple[int, float]] = []

        async def watch() -> None:
            async for event in b.watch("j"):
                if event.kind is EventKind.METRICS:
                    received.append((event.payload["epoch"], time.monotonic()))

        await asyncio.wait_for(watch(), 30)
        assert [epoch for epoch, _ in received] == list(range(1, 11))
        assert (await b.get("j")).lease_owner == "replica-a"
        live = [moment for _, moment in received[-5:]]
        assert max(later - earlier for earlier, later in zip(live, live[1:], strict=False)) < 1.5
    finally:
        await a.stop()
        await b.stop()
        store_a.close()
        store_b.close()


def _crash(manager) -> None:
    """What kill -9 leaves of a replica: no more renewals, scheduling or bookkeeping, its
    job processes gone (they die with their parent); the table is left as it was."""
    for task in (manager._loop_task, manager._lease_task):
        task.cancel()
    for entry in manager._running.values():
        if entry.process is not None:
            os.killpg(entry.process.pid, signal.SIGKILL)
        # The job task is abandoned mid-flight: nothing it would still write may land.
        entry.task.cancel()
    manager.store = _DeadStore()


class _DeadStore:
    """The crashed replica's database connection: every call fails."""

    def __getattr__(self, name):
        def gone(*args, **kwargs):
            raise ConnectionError("the replica is dead")
        return gone


async def test_a_replica_that_stops_renewing_loses_its_job_to_another_that_resumes_it(
        postgres_url, tmp_path):
    work = tmp_path / "work"
    store_a, store_b = (SqlJobStore.open(postgres_url, COLLECTION) for _ in range(2))
    a = step_manager(store_a, work, "replica-a", lease_seconds=1.5)
    b = step_manager(store_b, work, "replica-b", lease_seconds=1.5)
    await a.start()
    try:
        await a.submit(step_job("long", steps=40, pause=0.1))
        await _wait_for(lambda: _reached(store_b, "long", 5), 30, "replica-a's progress")
        await b.start()  # b starts while a holds the job: it must leave it alone
        watch_on_b = asyncio.create_task(_events(b, "long"))
        await asyncio.sleep(1.0)
        assert (await b.get("long")).lease_owner == "replica-a"
        assert "long" not in b._running

        _crash(a)
        crashed_at_step = (await b.get("long")).epoch
        events = await asyncio.wait_for(watch_on_b, 60)
        done = await b.get("long")
        assert done.state is JobState.SUCCEEDED and done.resume_count == 1
        assert done.result == {"checkpoint": 40, "published_by": "replica-b"}
        runs = runs_of(work, "long")
        assert len(runs) == 2 and runs[0][1] == 1
        assert runs[1][1] > crashed_at_step - 2 >= 3  # resumed from its checkpoint, not step 1
        assert completes_of(work, "long") == ["replica-b"]
        steps = [int(e.payload["values"]["step"]) for e in events if e.kind is EventKind.METRICS]
        assert steps[0] <= 6 and steps[-1] == 40  # b's Watch streamed a's progress, then its own
        takeover = [e.payload["message"] for e in events if e.kind is EventKind.LOG
                    and "stopped renewing its lease" in e.payload["message"]]
        assert takeover == ["replica replica-a stopped renewing its lease; replica-b resumes the "
                            "job from the last checkpoint"]
    finally:
        await b.stop()
        store_a.close()
        store_b.close()


async def _reached(store, job_id: str, step: int) -> bool:
    return (await asyncio.to_thread(store.get, job_id)).epoch >= step


async def test_a_cancel_through_another_replica_stops_the_job_where_it_runs(postgres_url,
                                                                          tmp_path):
    work = tmp_path / "work"
    store_a, store_b = (SqlJobStore.open(postgres_url, COLLECTION) for _ in range(2))
    a = step_manager(store_a, work, "replica-a", lease_seconds=1.5)
    b = step_manager(store_b, work, "replica-b", lease_seconds=1.5)
    await a.start()
    await b.start()
    try:
        await a.submit(step_job("long", steps=400, pause=0.05))
        await _wait_for(lambda: _reached(store_b, "long", 2), 30, "the job to run")
        holder, other = (a, b) if "long" in a._running else (b, a)
        process = holder._running["long"].process
        cancelled = await other.cancel("long", "changed my mind")
        assert cancelled.state is JobState.CANCELLED
        await _wait_for(lambda: _gone(holder, "long"), 10, "the holder to stop the job")
        assert process.exited
        assert len(runs_of(work, "long")) == 1
        final = await other.get("long")
        assert final.state is JobState.CANCELLED and final.epoch < 400
    finally:
        await a.stop()
        await b.stop()
        store_a.close()
        store_b.close()


async def _gone(manager, job_id: str) -> bool:
    return job_id not in manager._running


async def _runs_here(manager, job_id: str) -> bool:
    return job_id in manager._running


async def test_a_job_holding_replica_killed_with_sigkill_is_taken_over(postgres_url, tmp_path):
    work = tmp_path / "work"
    replica = subprocess.Popen(
        [sys.executable, "-m", "tests.jobs.step_jobs", postgres_url, str(work), "replica-a", "1.5"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    store = SqlJobStore.open(postgres_url, COLLECTION)
    b = step_manager(store, work, "replica-b", lease_seconds=1.5, pool_size=1)
    try:
        assert replica.stdout.readline().strip() == "ready"
        store.create(step_job("long", steps=40, pause=0.1), "queued")
        await _wait_for(lambda: _reached(store, "long", 4), 30, "replica-a to run the job")
        await b.start()
        assert (await b.get("long")).lease_owner == "replica-a"
        first_pid = runs_of(work, "long")[0][0]
        os.kill(replica.pid, signal.SIGKILL)
        replica.wait(10)
        events = await asyncio.wait_for(_events(b, "long"), 60)
        done = await b.get("long")
        assert done.state is JobState.SUCCEEDED and done.resume_count == 1, done.error
        assert done.result["published_by"] == "replica-b"
        runs = runs_of(work, "long")
        assert len(runs) == 2 and runs[1][1] > 4  # from the checkpoint
        assert not Path(f"/proc/{first_pid}").exists()  # a's job process died with a
        assert events[-1].final_state is JobState.SUCCEEDED
    finally:
        if replica.poll() is None:
            replica.kill()
            replica.wait()
        await b.stop()
        store.close()


class CutOffStore(SqlJobStore):
    """Lease renewals fail while `cut_off` is set, as when the database is unreachable."""

    cut_off = False

    def renew_leases(self, owner, job_ids, lease_seconds):
        if self.cut_off:
            raise ConnectionError("the database is unreachable")
        return super().renew_leases(owner, job_ids, lease_seconds)


async def test_a_replica_that_cannot_renew_stops_its_job_before_the_lease_lapses(tmp_path):
    """Fencing: no second replica may find the job lapsed while this one still runs it."""
    store = CutOffStore.open_sqlite(tmp_path / "jobs.db", COLLECTION)
    manager = step_manager(store, tmp_path / "work", "replica-a", lease_seconds=3)
    await manager.start()
    try:
        await manager.submit(step_job("j", steps=60, pause=0.1))
        await _wait_for(lambda: _reached(store, "j", 2), 30, "the job to run")
        process = manager._running["j"].process
        store.cut_off = True
        cut_at = time.monotonic()
        await _wait_for(lambda: _exited(process), 10, "the job's process to stop")
        lease_expires = (await manager.get("j")).lease_expires
        assert time.monotonic() - cut_at < 3
        assert datetime.now(UTC) < lease_expires  # stopped while the lease still held
        assert (await manager.get("j")).state is JobState.RUNNING  # nothing decided for it

        store.cut_off = False  # back: the lapsed job is this replica's own to resume
        await asyncio.wait_for(_events(manager, "j"), 60)
        done = await manager.get("j")
        assert done.state is JobState.SUCCEEDED and done.resume_count == 1
        runs = runs_of(tmp_path / "work", "j")
        assert len(runs) == 2 and runs[1][1] > 2
    finally:
        await manager.stop()
        store.close()


async def _exited(process) -> bool:
    return process.exited


async def test_a_replica_shutting_down_hands_its_jobs_over_at_once(postgres_url, tmp_path):
    """A graceful stop releases the leases: no waiting for them to lapse (30 s here)."""
    work = tmp_path / "work"
    store_a, store_b = (SqlJobStore.open(postgres_url, COLLECTION) for _ in range(2))
    a = step_manager(store_a, work, "replica-a", lease_seconds=30)
    b = step_manager(store_b, work, "replica-b", lease_seconds=30)
    await a.start()
    try:
        await a.submit(step_job("j", steps=40, pause=0.1))
        await _wait_for(lambda: _reached(store_b, "j", 3), 30, "replica-a to run the job")
        await b.start()
        await a.stop()
        stopped_at = time.monotonic()
        await _wait_for(lambda: _runs_here(b, "j"), 10, "replica-b to take the job")
        assert time.monotonic() - stopped_at < 5
        events = await asyncio.wait_for(_events(b, "j"), 60)
        done = await b.get("j")
        assert done.state is JobState.SUCCEEDED and done.result["published_by"] == "replica-b"
        assert events[-1].final_state is JobState.SUCCEEDED
        assert len(runs_of(work, "j")) == 2 and runs_of(work, "j")[1][1] > 3
    finally:
        await b.stop()
        store_a.close()
        store_b.close()


def test_a_replica_whose_clock_runs_ahead_takes_over_no_live_lease(postgres_url, monkeypatch):
    """Leases are granted, renewed and judged by PostgreSQL's clock, not the replicas' own."""
    a = SqlJobStore.open(postgres_url, COLLECTION)
    b = SqlJobStore.open(postgres_url, COLLECTION)
    try:
        a.create(JobDraft("j", {}, "t", "alice"), "queued")
        a.claim("j", "replica-a", 30, "started by replica-a")
        monkeypatch.setattr("maas_jobs.store.utc_now",
                            lambda: datetime.now(UTC) + timedelta(hours=1))  # b's clock
        assert b.lapsed("replica-b") == []
        assert b.take_over("j", "replica-b", 30, "b believes a's lease lapsed") is None
        assert a.renew_leases("replica-a", ["j"], 30) == {"j"}
        a.release_leases("replica-a", ["j"])  # a stops gracefully: lapsed at once
        assert [job.job_id for job in b.lapsed("replica-b")] == ["j"]
        assert b.take_over("j", "replica-b", 30, "a released it").lease_owner == "replica-b"
    finally:
        a.close()
        b.close()
