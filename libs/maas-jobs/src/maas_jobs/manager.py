"""The job manager: queue, schedule, run, cancel, watch, and recover after a restart.

A service (trainer, compressor) supplies a `JobRunner` that knows its kind of work: how to
stage a job's inputs and start its process, and what to do with the process's output (e.g.
register a model). The manager owns everything else:

- Submit stores a QUEUED job; a scheduling pass (on every change, and periodically) starts
  what the fair-share scheduler picks, one OS process per job.
- Progress lines from the process become the job's metrics and log events; watchers get
  the stored history first, then live events, until the job reaches a final state.
- Cancel of a queued job is immediate; a running job's process group is stopped first.
  Once a job publishes its result it can no longer be cancelled (FAILED_PRECONDITION): a
  half-stopped publish could leave, say, a registered model behind a CANCELLED job.
- At start-up, jobs still RUNNING belonged to a service that died: their leftover
  processes are killed and they are started again, counted in `resume_count`; the runner
  resumes them from their last checkpoint.

Several replicas may share one job table (PostgreSQL). Each runs a job only under its lease
(`replica_id`, renewed every third of `lease_seconds` while the job runs); a replica that
stops renewing (killed, cut off) loses its jobs to the others, which take them over in their
scheduling pass and resume them from the checkpoint in the shared work root, exactly as after
a restart. A replica that finds it no longer holds a job (taken over, or cancelled through
another replica) stops the job's process. Watchers on any replica read the shared event log,
woken by the store's change feed (PostgreSQL NOTIFY) at each event wherever it was written.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import io
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from maas_runtime.errors import FailedPrecondition, MaasError
from maas_runtime.filtering import parse_filter
from maas_runtime.pagination import PageTokenCodec, clamp_page_size, query_fingerprint

from maas_jobs.executor import (
    JobLauncher,
    LaunchSpec,
    ProcessLauncher,
    StartedJob,
    reap_stale_process,
)
from maas_jobs.records import (
    JobCollection,
    JobDraft,
    JobError,
    JobEvent,
    JobRecord,
    JobState,
    LogLevel,
)
from maas_jobs.scheduler import FairShareScheduler, QueuedJob, slots_by_tenant
from maas_jobs.store import JOB_FILTER_SCHEMA, JobStore

_log = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
_EVENT_PAGE = 500


class JobFailedWithResult(Exception):
    """Raised by `JobRunner.complete` to fail a job while keeping what it produced in the
    job's `result` (e.g. a compression report that missed its accuracy gate)."""

    def __init__(self, error: MaasError, result: dict[str, Any]):
        super().__init__(error.message)
        self.error = error
        self.result = result


class JobRunner(abc.ABC):
    """The part of running a job that depends on what the job does."""

    @abc.abstractmethod
    async def prepare(self, job: JobRecord, workdir: Path) -> LaunchSpec | None:
        """Stage the job's inputs in `workdir` and say how to start its process.

        Called again for a job resumed after a restart, with the same `workdir`. Returns None
        when the work is already done and only `complete` remains. Raising a `MaasError`
        fails the job with that error.
        """

    @abc.abstractmethod
    async def complete(self, job: JobRecord, workdir: Path) -> dict[str, Any]:
        """Publish what a successful process produced; returns the job's `result`.

        Must be idempotent: after a crash it may run again for the same job.
        """

    async def discard_work(self, job: JobRecord, workdir: Path) -> None:  # noqa: B027
        """Free what a finished job no longer needs (checkpoints, staged inputs); optional."""


@dataclass(frozen=True)
class JobManagerConfig:
    """Pool size, where jobs work, and pacing (built from a service's settings)."""

    pool_size: int
    work_root: Path
    stop_grace_seconds: float = 10.0
    """How long a stopped job may take to exit after SIGTERM before SIGKILL."""
    schedule_interval_seconds: float = 1.0
    """Scheduling also runs on every change; this is the safety net."""
    watch_poll_seconds: float = 1.0
    """Watchers are woken on every event; this is the safety net."""
    max_plain_log_lines: int = 200
    """Lines a job prints outside the protocol that become log events (the rest: log file)."""
    replica_id: str = ""
    """This replica's name on the leases it holds; empty: `<host>:<work_root>`. It must
    stay the same across restarts of one replica (it resumes its own jobs at once) and
    differ between replicas sharing a job table."""
    lease_seconds: float = 15.0
    """How long a job stays with a replica that stopped renewing its lease."""
    stop_backstop_seconds: float = 5.0
    """How long `JobManager.stop` waits for a cancelled task beyond `stop_grace_seconds`
    before it gives up on the task, with an error in the log: a task that ignores its
    cancellation must not hold the service's shutdown forever."""
    launcher: JobLauncher | None = None
    """How a prepared job starts (`maas_jobs.kubernetes_executor.launcher_for` picks it from
    the settings); None: as a local process (`ProcessLauncher`)."""

    @property
    def owner(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{self.work_root.resolve()}"


@dataclass
class _RunningJob:
    tenant: str
    workers: int
    task: asyncio.Task | None = None
    process: StartedJob | None = None
    cancel_requested: bool = False
    lease_lost: bool = False
    publishing: bool = False
    phase_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while cancel decides, and while the job decides to publish: one of them wins."""


@dataclass
class JobListing:
    """One page of jobs and the token of the next page (empty on the last)."""

    items: list[JobRecord]
    next_page_token: str


class _JobSignals:
    """Per-job wake-ups for watchers: set on every new event of the job."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        signal = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(signal)
        try:
            yield signal
        finally:
            waiters = self._waiters.get(job_id, set())
            waiters.discard(signal)
            if not waiters:
                self._waiters.pop(job_id, None)

    def notify(self, job_id: str) -> None:
        for signal in self._waiters.get(job_id, ()):
            signal.set()

    def notify_all(self) -> None:
        for waiters in self._waiters.values():
            for signal in waiters:
                signal.set()


async def _cancel_and_wait(tasks: list[asyncio.Task], seconds: float) -> None:
    """Cancel `tasks` and wait until they have ended, at most `seconds`; log the ones that
    have not, with where they are, and go on without them.

    Their waits use `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11 `wait_for`
    drops a cancellation that arrives in the loop turn its awaitable completes (say a
    scheduling wake-up and `stop` at once), and the task goes on as if never cancelled.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            _log.error("task %s failed while stopping", task.get_name(),
                       exc_info=task.exception())
    for task in pending:
        where = io.StringIO()
        task.print_stack(limit=8, file=where)
        _log.error("task %s did not end within %.1f s of being cancelled; stopping without "
                   "it. %s", task.get_name(), seconds, where.getvalue().strip())


@dataclass
class _EventSink:
    """Writes one job's progress to the store and wakes its watchers."""

    manager: JobManager
    job_id: str

    async def metrics(self, epoch: int, phase: str, values: dict[str, float]) -> None:
        await self.manager._store_call(self.manager.store.record_metrics, self.job_id, epoch,
                                       phase, values)
        self.manager._signals.notify(self.job_id)

    async def log(self, level: LogLevel, message: str) -> None:
        await self.manager._store_call(self.manager.store.append_log, self.job_id, level,
                                       message)
        self.manager._signals.notify(self.job_id)


@dataclass
class JobManager:
    """Use cases over jobs: submit, get, list, cancel, watch; plus the background runner."""

    store: JobStore
    runner: JobRunner
    collection: JobCollection
    config: JobManagerConfig
    page_tokens: PageTokenCodec

    _scheduler: FairShareScheduler = field(init=False)
    _running: dict[str, _RunningJob] = field(init=False, default_factory=dict)
    _signals: _JobSignals = field(init=False, default_factory=_JobSignals)
    _wake: asyncio.Event | None = field(init=False, default=None)
    _loop_task: asyncio.Task | None = field(init=False, default=None)
    _lease_task: asyncio.Task | None = field(init=False, default=None)
    _changes_task: asyncio.Task | None = field(init=False, default=None)
    _stopping: bool = field(init=False, default=False)
    _owner: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self._scheduler = FairShareScheduler(self.config.pool_size)
        self._owner = self.config.owner

    @property
    def replica_id(self) -> str:
        """The name this manager holds its jobs' leases under."""
        return self._owner

    @property
    def pool_size(self) -> int:
        return self.config.pool_size

    async def _store_call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Store calls block on disk I/O: keep them off the event loop."""
        return await asyncio.to_thread(function, *args, **kwargs)

    def _workdir(self, job_id: str) -> Path:
        # Absolute: job processes run inside their directory, where a relative path breaks.
        return self.config.work_root.resolve() / job_id

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover jobs a previous instance left RUNNING, then start scheduling."""
        self._wake = asyncio.Event()
        self.config.work_root.mkdir(parents=True, exist_ok=True)
        self._scheduler.remember_service(
            await self._store_call(self.store.tenant_last_start_times))
        await self._take_over_lapsed(after_restart=True)
        self._loop_task = asyncio.create_task(self._schedule_forever(), name="job-scheduler")
        self._lease_task = asyncio.create_task(self._renew_forever(), name="job-leases")
        changes = self.store.changes()
        if changes is not None:
            self._changes_task = asyncio.create_task(self._wake_watchers(changes),
                                                     name="job-changes")

    async def stop(self) -> None:
        """Stop scheduling and end running processes; their jobs stay RUNNING, to resume
        (here after a restart, or at once on another replica: the leases are released).

        Every wait is bounded: a task still there after its bound is left behind with an
        error in the log (naming it, with its stack) rather than holding the shutdown."""
        self._stopping = True
        background = [task for task in (self._loop_task, self._lease_task, self._changes_task)
                      if task is not None]
        await _cancel_and_wait(background, self.config.stop_backstop_seconds)
        running = list(self._running.values())
        held = list(self._running)
        await asyncio.gather(*(entry.process.stop(self.config.stop_grace_seconds)
                               for entry in running if entry.process is not None))
        # A cancelled job task still stops its process and tidies up in its `finally`.
        await _cancel_and_wait([entry.task for entry in running if entry.task is not None],
                               self.config.stop_grace_seconds + self.config.stop_backstop_seconds)
        with contextlib.suppress(Exception):  # the database may be what is going away
            await self._store_call(self.store.release_leases, self._owner, held)

    async def _take_over_lapsed(self, *, after_restart: bool = False) -> None:
        """Run the RUNNING jobs nobody holds: any whose lease lapsed, and right after a
        restart this replica's own at once (a previous run of it held them). Then, own jobs too
        wide for the free slots go back to the queue (as before replicas); others' wait for a
        replica with room."""
        free = self.pool_size - sum(entry.workers for entry in self._running.values())
        lapsed = await self._store_call(self.store.lapsed, self._owner, own_too=after_restart)
        for job in lapsed:
            if job.job_id in self._running:
                continue  # ours, running here: the lease is renewed by `_renew_forever`
            own = job.lease_owner in (None, self._owner)
            if job.workers > free:
                if after_restart and own:
                    await self._store_call(
                        self.store.transition, job.job_id, [JobState.RUNNING], JobState.QUEUED,
                        "waiting for worker slots after a restart")
                continue
            restarted = after_restart and own
            reason = ("the service restarted; resuming from the last checkpoint" if restarted else
                      f"replica {job.lease_owner} stopped renewing its lease; {self._owner} "
                      "resumes the job from the last checkpoint")
            taken = await self._store_call(self.store.take_over, job.job_id, self._owner,
                                           self.config.lease_seconds, reason)
            if taken is None:
                continue  # another replica was quicker, or the holder renewed meanwhile
            if own:
                # A process only ever outlives its service on the same host and work root.
                reap_stale_process(taken.process_id, str(self._workdir(job.job_id)))
            _log.info("%s: %s", self.collection.name(job.job_id), reason,
                      extra={"job": self.collection.name(job.job_id)})
            free -= job.workers
            self._signals.notify(job.job_id)
            self._launch(taken)

    async def _wake_watchers(self, changes: AsyncIterator[str | None]) -> None:
        """Wake this replica's watchers of jobs other replicas run, at each of their events."""
        async for job_id in changes:
            if job_id is None:
                self._signals.notify_all()
            else:
                self._signals.notify(job_id)

    async def _renew_forever(self) -> None:
        interval = self.config.lease_seconds / 3
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew_leases(timeout=interval)
                last_renewed = asyncio.get_running_loop().time()
            except Exception:
                _log.exception("renewing job leases failed; retrying")
                if asyncio.get_running_loop().time() - last_renewed >= 2 * interval:
                    # The lease lapses a third of it from now and another replica may take
                    # the jobs over: stop them first, never run a job twice.
                    await self._give_up(dict(self._running), "its leases could not be renewed")

    async def _renew_leases(self, timeout: float) -> None:
        """Extend the leases of the jobs running here; stop those this replica lost."""
        running = dict(self._running)
        async with asyncio.timeout(timeout):  # not wait_for: see `_cancel_and_wait`
            held = await self._store_call(self.store.renew_leases, self._owner, list(running),
                                          self.config.lease_seconds)
        await self._give_up({job_id: entry for job_id, entry in running.items()
                             if job_id not in held}, "cancelled or taken over")

    async def _give_up(self, entries: dict[str, _RunningJob], why: str) -> None:
        """Stop the processes of jobs this replica no longer holds (their state is not ours
        to write any more: `_finish` only ends a job under this replica's lease)."""
        for job_id, entry in entries.items():
            if entry.publishing or entry.lease_lost or self._running.get(job_id) is not entry:
                continue  # publishing cannot be undone; or finished meanwhile
            entry.lease_lost = True
            _log.warning("%s is no longer held by %s (%s); stopping its process",
                         self.collection.name(job_id), self._owner, why)
            if entry.process is None:
                if entry.task is not None:
                    entry.task.cancel()  # still staging its inputs
            elif not entry.process.exited:
                await entry.process.stop(min(self.config.stop_grace_seconds,
                                             self.config.lease_seconds / 6))
            # An exited process: its task is recording the outcome, under the owner guard.

    # -- use cases ----------------------------------------------------------------------------

    async def submit(self, draft: JobDraft) -> JobRecord:
        if draft.workers > self.pool_size:
            raise FailedPrecondition(
                f"the job needs {draft.workers} worker slots but the pool has {self.pool_size}",
                reason="POOL_TOO_SMALL")
        record = await self._store_call(self.store.create, draft,
                                        f"queued for tenant {draft.tenant}")
        self._poke()
        return record

    async def get(self, job_id: str) -> JobRecord:
        return await self._store_call(self.store.get, job_id)

    async def list(self, filter_text: str, page_size: int, page_token: str) -> JobListing:
        size = clamp_page_size(page_size)
        fingerprint = query_fingerprint(self.collection.collection, filter_text)
        cursor = self.page_tokens.decode(page_token, fingerprint) if page_token else None
        expression = parse_filter(filter_text, JOB_FILTER_SCHEMA)
        page = await self._store_call(self.store.list, expression, size, cursor)
        token = self.page_tokens.encode(page.next_cursor, fingerprint) if page.next_cursor else ""
        return JobListing(page.items, token)

    async def cancel(self, job_id: str, reason: str) -> JobRecord:
        """Cancel a queued or running job; a running one's processes are gone on return when
        it runs here (on another replica they stop at its next lease renewal)."""
        entry = self._running.get(job_id)
        async with entry.phase_lock if entry is not None else contextlib.nullcontext():
            if entry is not None and entry.publishing:
                raise FailedPrecondition(
                    f"{self.collection.name(job_id)} has finished its work and is publishing "
                    "the result; it can no longer be cancelled", reason="JOB_PUBLISHING",
                    metadata={"state": JobState.RUNNING.value})
            record = await self._store_call(self.store.transition, job_id, ACTIVE_STATES,
                                            JobState.CANCELLED, reason, unless_publishing=True)
        if record is None:
            current = await self.get(job_id)
            if current.state is JobState.RUNNING and current.publishing:
                raise FailedPrecondition(
                    f"{self.collection.name(job_id)} has finished its work and is publishing "
                    "the result; it can no longer be cancelled", reason="JOB_PUBLISHING",
                    metadata={"state": JobState.RUNNING.value})
            raise FailedPrecondition(
                f"{self.collection.name(job_id)} is {current.state.value}; only queued or "
                "running jobs can be cancelled", reason="JOB_FINISHED",
                metadata={"state": current.state.value})
        self._signals.notify(job_id)
        entry = self._running.get(job_id)
        if entry is not None:
            entry.cancel_requested = True
            if entry.process is not None and not entry.process.exited:
                await entry.process.stop(self.config.stop_grace_seconds)
            elif entry.task is not None:
                # Staging inputs: stopping the task is the cancel.
                entry.task.cancel()
            if entry.task is not None:
                await asyncio.wait({entry.task}, timeout=self.config.stop_grace_seconds + 5)
        return record

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events after `after_sequence`: stored history, then live, until final."""
        await self.get(job_id)  # NOT_FOUND before the stream starts
        last = max(after_sequence, 0)
        with self._signals.subscribe(job_id) as signal:
            while True:
                signal.clear()  # before reading, so an event committed after it re-arms us
                events = await self._store_call(self.store.events_after, job_id, last,
                                                _EVENT_PAGE)
                for event in events:
                    yield event
                    last = event.sequence
                    if event.final_state is not None:
                        return
                if len(events) == _EVENT_PAGE:
                    continue
                if not events and (await self.get(job_id)).state.is_final:
                    # Final now, but it may have become final just after the read above: the
                    # final event (committed with the state) is visible to a read from now on.
                    if not await self._store_call(self.store.events_after, job_id, last, 1):
                        return  # the caller asked to skip past the final event
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.watch_poll_seconds):
                        await signal.wait()  # not wait_for: see `_cancel_and_wait`

    # -- scheduling and running ---------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _schedule_forever(self) -> None:
        wake = self._wake
        if wake is None:
            raise RuntimeError("the scheduler runs only after start()")
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.schedule_interval_seconds):
                    await wake.wait()  # not wait_for: see `_cancel_and_wait`
            wake.clear()
            try:
                await self._schedule_once()
            except Exception:
                _log.exception("scheduling pass failed; retrying")

    async def _schedule_once(self) -> None:
        await self._take_over_lapsed()
        queued = await self._store_call(self.store.in_states, [JobState.QUEUED])
        held = slots_by_tenant([(entry.tenant, entry.workers) for entry in self._running.values()])
        plan = self._scheduler.plan(
            [QueuedJob(job.job_id, job.tenant, job.workers, job.priority, job.queue_position)
             for job in queued], held)
        for job in plan.unrunnable:
            await self._finish(job.job_id, [JobState.QUEUED], JobState.FAILED,
                               error=JobError("FAILED_PRECONDITION",
                                              f"the job needs {job.workers} worker slots but the "
                                              f"pool has {self.pool_size}"))
        for job in plan.start:
            record = await self._store_call(
                self.store.claim, job.job_id, self._owner, self.config.lease_seconds,
                f"started on {job.workers} worker slot(s) by {self._owner}")
            if record is None:  # cancelled, or claimed by another replica, since the read
                self._poke()
                continue
            self._signals.notify(job.job_id)
            _log.info("%s started for tenant %s on %d slot(s)", self.collection.name(job.job_id),
                      job.tenant, job.workers, extra={"job": self.collection.name(job.job_id)})
            self._launch(record)

    def _launch(self, job: JobRecord) -> None:
        entry = _RunningJob(job.tenant, job.workers)
        self._running[job.job_id] = entry
        entry.task = asyncio.create_task(self._run(job, entry), name=f"job-{job.job_id}")
        # A task cancelled before its first step never runs `_run`'s finally: release the
        # slots here too, or they would stay taken until a restart.
        entry.task.add_done_callback(lambda _: self._release(job.job_id, entry))

    def _release(self, job_id: str, entry: _RunningJob) -> None:
        if self._running.get(job_id) is entry:
            del self._running[job_id]
            self._poke()

    async def _run(self, job: JobRecord, entry: _RunningJob) -> None:
        workdir = self._workdir(job.job_id)
        try:
            launch = await self.runner.prepare(job, workdir)
            if launch is not None:
                launcher = self.config.launcher or ProcessLauncher(self.config.max_plain_log_lines)
                entry.process = await launcher.start(job, launch)
                if entry.cancel_requested or self._stopping:
                    await entry.process.stop(self.config.stop_grace_seconds)
                await self._store_call(self.store.set_process, job.job_id, entry.process.pid)
                outcome = await entry.process.wait_and_forward(_EventSink(self, job.job_id))
                if outcome.stopped:
                    return  # whoever stopped it (cancel, shutdown, takeover) decided its state
                if not outcome.succeeded:
                    error = outcome.reported_error or JobError(
                        "INTERNAL", f"the job process {outcome.describe_exit()}; see "
                        f"{launch.log_path.name} in the job's directory")
                    await self._finish(job.job_id, [JobState.RUNNING], JobState.FAILED, error=error)
                    return
            async with entry.phase_lock:
                publishing = await self._store_call(self.store.start_publishing, job.job_id,
                                                    self._owner)
                if publishing is None:  # cancelled, or no longer this replica's
                    return
                current = publishing
                entry.publishing = True
            await self._store_call(self.store.append_log, job.job_id, LogLevel.INFO,
                                   "the work is done; publishing the result")
            self._signals.notify(job.job_id)
            result = await self.runner.complete(current, workdir)
            await self._finish(job.job_id, [JobState.RUNNING], JobState.SUCCEEDED, result=result)
        except asyncio.CancelledError:
            raise
        except JobFailedWithResult as failure:
            await self._finish(job.job_id, [JobState.RUNNING], JobState.FAILED,
                               error=JobError(failure.error.code, failure.error.message),
                               result=failure.result)
        except MaasError as error:
            await self._finish(job.job_id, [JobState.RUNNING], JobState.FAILED,
                               error=JobError(error.code, error.message))
        except Exception:
            _log.exception("job %s failed unexpectedly", job.job_id)
            await self._finish(job.job_id, [JobState.RUNNING], JobState.FAILED,
                               error=JobError("INTERNAL", "the job failed unexpectedly; see the "
                                              "service log"))
        finally:
            if entry.process is not None and not entry.process.exited:
                # An error on our side (store, disk) must not leave the job's processes
                # running on slots the scheduler is about to hand out again.
                with contextlib.suppress(Exception):
                    await entry.process.stop(self.config.stop_grace_seconds)
            self._release(job.job_id, entry)
            await self._discard_if_final(job.job_id, workdir)

    async def _discard_if_final(self, job_id: str, workdir: Path) -> None:
        try:
            job = await self.get(job_id)
            if job.state.is_final:
                await self.runner.discard_work(job, workdir)
        except Exception:  # disk hygiene must never disturb the job's outcome
            _log.warning("could not discard the work of %s", job_id, exc_info=True)

    async def _finish(self, job_id: str, from_states: Iterable[JobState], to_state: JobState, *,
                      error: JobError | None = None,
                      result: dict[str, Any] | None = None) -> None:
        reason = error.message if error is not None else to_state.value.lower()
        # A running job ends only under this replica's lease: one it lost is another's now.
        owner = self._owner if JobState.RUNNING in from_states else None
        record = await self._store_call(self.store.transition, job_id, from_states, to_state,
                                        reason, error=error, result=result, owner=owner)
        if record is not None:
            _log.info("%s %s: %s", self.collection.name(job_id), to_state.value, reason,
                      extra={"job": self.collection.name(job_id), "state": to_state.value})
        self._signals.notify(job_id)
