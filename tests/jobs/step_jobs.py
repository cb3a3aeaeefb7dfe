"""A job runner for replica tests: each job counts `steps` steps, checkpointing every step in
its working directory, so a job taken over by another replica visibly resumes where it was.

Every start of a job process appends `<pid> <first step>` to `runs.txt`, every publish
appends the publishing replica to `completes.txt`: a job ran exactly once when both hold one
line. Runnable as `python -m tests.jobs.step_jobs URL WORK_ROOT REPLICA_ID LEASE_SECONDS`, a
job-holding replica in its own process (for kill -9 tests).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from maas_jobs.executor import LaunchSpec
from maas_jobs.manager import JobManager, JobManagerConfig, JobRunner
from maas_jobs.records import JobCollection, JobDraft, JobRecord
from maas_jobs.store import SqlJobStore
from maas_runtime.pagination import PageTokenCodec

COLLECTION = JobCollection("testJobs", "test job")

STEP_SCRIPT = """
import os, sys, time
from pathlib import Path
from maas_jobs.progress import ProgressReporter, exit_when_parent_dies
exit_when_parent_dies()
steps, pause = int(sys.argv[1]), float(sys.argv[2])
checkpoint = Path("checkpoint.txt")
done = int(checkpoint.read_text()) if checkpoint.exists() else 0
with open("runs.txt", "a") as runs:
    runs.write(f"{os.getpid()} {done + 1}\\n")
reporter = ProgressReporter()
for step in range(done + 1, steps + 1):
    time.sleep(pause)
    Path("checkpoint.tmp").write_text(str(step))
    os.replace("checkpoint.tmp", checkpoint)
    reporter.metrics(step, "train", {"step": float(step)})
"""


def step_job(job_id: str, steps: int, pause: float = 0.05, tenant: str = "t") -> JobDraft:
    return JobDraft(job_id, {"steps": steps, "pause": pause}, tenant, "tester")


class StepRunner(JobRunner):
    """Runs STEP_SCRIPT; publishing records who published."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def prepare(self, job: JobRecord, workdir: Path) -> LaunchSpec:
        workdir.mkdir(parents=True, exist_ok=True)
        return LaunchSpec([sys.executable, "-c", STEP_SCRIPT, str(job.spec["steps"]),
                           str(job.spec["pause"])], cwd=workdir, log_path=workdir / "job.log")

    async def complete(self, job: JobRecord, workdir: Path) -> dict:
        with (workdir / "completes.txt").open("a") as completes:
            completes.write(self.replica + "\n")
        return {"checkpoint": int((workdir / "checkpoint.txt").read_text()),
                "published_by": self.replica}


def runs_of(work_root: Path, job_id: str) -> list[tuple[int, int]]:
    """(pid, first step) of every start of the job's process."""
    path = work_root / job_id / "runs.txt"
    lines = path.read_text().split() if path.exists() else []
    return [(int(pid), int(first)) for pid, first in zip(lines[::2], lines[1::2], strict=True)]


def completes_of(work_root: Path, job_id: str) -> list[str]:
    path = work_root / job_id / "completes.txt"
    return path.read_text().split() if path.exists() else []


def step_manager(store: SqlJobStore, work_root: Path, replica: str, *, pool_size: int = 2,
                 lease_seconds: float = 15.0, watch_poll_seconds: float = 0.1,
                 schedule_interval_seconds: float = 0.1) -> JobManager:
    return JobManager(store, StepRunner(replica), COLLECTION,
                      JobManagerConfig(pool_size=pool_size, work_root=work_root,
                                       schedule_interval_seconds=schedule_interval_seconds,
                                       watch_poll_seconds=watch_poll_seconds,
                                       stop_grace_seconds=2, replica_id=replica,
                                       lease_seconds=lease_seconds),
                      PageTokenCodec(b"k" * 32))


async def _serve(url: str, work_root: Path, replica: str, lease_seconds: float) -> None:
    store = SqlJobStore.open(url, COLLECTION)
    manager = step_manager(store, work_root, replica, lease_seconds=lease_seconds)
    await manager.start()
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
