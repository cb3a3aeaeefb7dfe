"""Stopping a job manager ends everything it started, whatever else happens in the same loop
turn: a scheduling wake-up (a job submitted as the service stops), or a job task that will
not end (stop gives up on it after a bounded wait and says so in the log)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from pathlib import Path

from maas_jobs.records import JobRecord, JobState
from maas_jobs.store import SqlJobStore

from tests.jobs.step_jobs import COLLECTION, StepRunner, step_job, step_manager


async def _stopped_within(manager, seconds: float) -> bool:
    stop = asyncio.ensure_future(manager.stop())
    done, _ = await asyncio.wait({stop}, timeout=seconds)
    if done:
        stop.result()
    return bool(done)


async def test_a_job_submitted_as_the_manager_stops_leaves_no_scheduler_running(tmp_path):
    # The submit wakes the scheduler; stop() cancels it some loop turns later. Within the
    # first turns the wake-up and the cancel meet in one turn: asyncio.wait_for (Python 3.11)
    # then returned the wake-up and dropped the cancel, and stop() waited forever for a
    # scheduler that went on scheduling.
    for turns in range(4):
        store = SqlJobStore.open_sqlite(tmp_path / f"jobs-{turns}.db", COLLECTION)
        manager = step_manager(store, tmp_path / f"work-{turns}", "r",
                               schedule_interval_seconds=3600)
        await manager.start()
        await asyncio.sleep(0)  # the scheduler waits for a wake-up
        try:
            await manager.submit(step_job("j", steps=1))
            for _ in range(turns):
                await asyncio.sleep(0)
            stopped = await _stopped_within(manager, 5)
            scheduler = manager._loop_task
            assert stopped, f"stop() {turns} turn(s) after a submit did not return"
            assert scheduler is not None and scheduler.cancelled(), \
                f"the scheduler still runs after stop() {turns} turn(s) after a submit"
            assert store.get("j").state is JobState.QUEUED  # left for the next start
        finally:
            if manager._loop_task is not None:
                manager._loop_task.cancel()
            store.close()


class _StubbornRunner(StepRunner):
    """Its preparation ignores cancellation until `release` is set."""

    def __init__(self) -> None:
        super().__init__("r")
        self.preparing = asyncio.Event()
        self.release = asyncio.Event()

    async def prepare(self, job: JobRecord, workdir: Path):
        self.preparing.set()
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        return await super().prepare(job, workdir)


async def test_stop_gives_up_on_a_job_task_that_will_not_end_and_logs_it(tmp_path, caplog):
    store = SqlJobStore.open_sqlite(tmp_path / "jobs.db", COLLECTION)
    manager = step_manager(store, tmp_path / "work", "r")
    runner = manager.runner = _StubbornRunner()
    manager.config = dataclasses.replace(manager.config, stop_grace_seconds=0.2,
                                         stop_backstop_seconds=0.2)
    await manager.start()
    try:
        await manager.submit(step_job("stubborn", steps=1))
        await asyncio.wait_for(runner.preparing.wait(), 10)
        with caplog.at_level(logging.ERROR, logger="maas_jobs.manager"):
            assert await _stopped_within(manager, 10), "stop() waited for the job task forever"
        assert "job-stubborn" in caplog.text and "did not end" in caplog.text
    finally:
        runner.release.set()
        for task in asyncio.all_tasks():
            if task.get_name() == "job-stubborn":
                task.cancel()
                await asyncio.wait({task}, timeout=10)
        store.close()


def _processes_in(work_root: Path) -> list[int]:
    """Processes working under `work_root` (a job runs in its directory); zombies have no
    working directory left."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")).is_relative_to(work_root):
                    found.append(int(entry.name))
    return found


async def test_a_job_stopped_at_any_point_of_its_start_leaves_no_task_and_no_process(tmp_path):
    # From its claim to its process forwarding output, a job's start takes a few loop turns
    # (staging, spawning, connecting the pipes, storing the pid): stop the manager at each
    # of them (its process exists from turn 9 on; 11 reach into its forwarding), and also
    # cancel the job there first (a cancel acts once its state is stored: some turns later).
    for turns in range(12):
        for cancel_first in (False, True):
            name = f"{turns}-{'cancelled' if cancel_first else 'running'}"
            store = SqlJobStore.open_sqlite(tmp_path / f"jobs-{name}.db", COLLECTION)
            work_root = tmp_path / f"work-{name}"
            manager = step_manager(store, work_root, "r", schedule_interval_seconds=3600)
            await manager.start()
            try:
                await manager.submit(step_job("j", steps=1000, pause=0.05))
                while "j" not in manager._running:  # claimed: its task is created
                    await asyncio.sleep(0)
                for _ in range(turns):
                    await asyncio.sleep(0)
                entry = manager._running["j"]
                if cancel_first:
                    await asyncio.wait_for(manager.cancel("j", "cancelled by the test"), 10)
                    assert store.get("j").state is JobState.CANCELLED
                assert await _stopped_within(manager, 10), f"stop() did not return ({name})"
                assert entry.task is not None and entry.task.done(), \
                    f"the job's task still runs ({name})"
                assert "j" not in manager._running
                assert _processes_in(work_root) == [], f"a job process is left ({name})"
            finally:
                store.close()
