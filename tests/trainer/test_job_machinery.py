"""Units of the job machinery and the training loop, without a server."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from maas_jobs.executor import LaunchSpec
from maas_jobs.manager import JobManager, JobManagerConfig, JobRunner
from maas_jobs.progress import ProgressReporter, parse_progress_line
from maas_jobs.records import EventKind, JobCollection, JobDraft, JobError, JobState, LogLevel
from maas_jobs.scheduler import FairShareScheduler, QueuedJob
from maas_jobs.store import SqlJobStore
from maas_runtime.errors import AlreadyExists, FailedPrecondition, NotFound
from maas_runtime.pagination import PageTokenCodec
from maas_trainer.checkpoints import TrainingCheckpoint, load_checkpoint, save_checkpoint
from maas_trainer.datasets import split_indices, split_sizes
from maas_trainer.spec import EarlyStoppingSpec, OptimizerSpec, ScheduleSpec
from maas_trainer.training import EarlyStopper, LearningRateSchedule, build_optimizer

COLLECTION = JobCollection("testJobs", "test job")


def _queued(job_id, tenant, *, workers=1, priority=0, position=0):
    return QueuedJob(job_id, tenant, workers, priority, position)


# -- scheduler ----------------------------------------------------------------------------------


def test_fair_share_alternates_tenants_however_long_the_flood():
    scheduler = FairShareScheduler(pool_size=1)
    queue = [_queued(f"a{i}", "a", position=i) for i in range(20)] + [_queued("b0", "b", position=20)]
    order = []
    for _ in range(4):
        started = scheduler.plan(queue, running_slots={}).start
        assert len(started) == 1
        order.append(started[0].job_id)
        queue = [job for job in queue if job.job_id != started[0].job_id]
    assert order == ["a0", "b0", "a1", "a2"]


def test_tenant_holding_fewer_slots_goes_first_and_priority_orders_within_a_tenant():
    scheduler = FairShareScheduler(pool_size=4)
    queue = [_queued("a-low", "a", position=1), _queued("a-high", "a", priority=9, position=2),
             _queued("b-1", "b", position=3), _queued("b-2", "b", position=4)]
    plan = scheduler.plan(queue, running_slots={"a": 2})
    assert [job.job_id for job in plan.start] == ["b-1", "b-2"]  # a already holds 2 of 4
    plan = FairShareScheduler(pool_size=4).plan(queue, running_slots={})
    assert [job.job_id for job in plan.start] == ["a-high", "b-1", "a-low", "b-2"]


def test_wide_job_reserves_slots_instead_of_being_overtaken():
    scheduler = FairShareScheduler(pool_size=2)
    queue = [_queued("wide", "a", workers=2, position=1), _queued("narrow", "b", position=2)]
    scheduler.remember_service({"b": datetime(2024, 1, 1, tzinfo=UTC)})  # a is owed service
    assert scheduler.plan(queue, running_slots={"c": 1}).start == []
    assert [job.job_id for job in scheduler.plan(queue, running_slots={}).start] == ["wide"]


def test_jobs_wider_than_the_pool_are_reported_unrunnable():
    plan = FairShareScheduler(pool_size=2).plan([_queued("huge", "a", workers=3)], {})
    assert [job.job_id for job in plan.unrunnable] == ["huge"] and plan.start == []


# -- store --------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    job_store = SqlJobStore.open_sqlite(tmp_path / "jobs.db", COLLECTION)
    yield job_store
    job_store.close()


def test_store_numbers_each_jobs_events_without_gaps(store):
    store.create(JobDraft("one", {"x": 1}, "t", "alice"), "queued")
    store.create(JobDraft("two", {}, "t", "alice"), "queued")
    assert store.transition("one", [JobState.QUEUED], JobState.RUNNING, "go").start_time
    store.record_metrics("one", 1, "train", {"loss": 0.5})
    store.append_log("one", LogLevel.INFO, "hello")
    store.record_metrics("one", 2, "train", {"loss": 0.25, "accuracy": 0.9})
    done = store.transition("one", [JobState.RUNNING], JobState.SUCCEEDED, "ok",
                            result={"model_version": "models/m/versions/1"})
    assert done.metrics == {"loss": 0.25, "accuracy": 0.9} and done.epoch == 2
    assert done.end_time is not None and done.result["model_version"].endswith("/1")
    events = store.events_after("one", 0, 100)
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.kind for e in events] == [EventKind.STATE_CHANGE, EventKind.STATE_CHANGE,
                                        EventKind.METRICS, EventKind.LOG, EventKind.METRICS,
                                        EventKind.STATE_CHANGE]
    assert events[-1].final_state is JobState.SUCCEEDED
    assert [e.sequence for e in store.events_after("one", 4, 100)] == [5, 6]
    assert [e.sequence for e in store.events_after("two", 0, 100)] == [1]


def test_store_keeps_the_final_state_change_as_the_last_event(store):
    """Output still in a cancelled process's pipe must not trail the final event."""
    store.create(JobDraft("j", {}, "t", "alice"), "queued")
    store.transition("j", [JobState.QUEUED], JobState.RUNNING, "go")
    store.record_metrics("j", 1, "train", {"loss": 0.5})
    store.transition("j", [JobState.RUNNING], JobState.CANCELLED, "stop")
    assert store.record_metrics("j", 2, "train", {"loss": 0.1}) is None
    assert store.append_log("j", LogLevel.INFO, "late line") is None
    events = store.events_after("j", 0, 100)
    assert events[-1].final_state is JobState.CANCELLED and len(events) == 4
    assert store.get("j").metrics == {"loss": 0.5} and store.get("j").epoch == 1


def test_store_transitions_are_compare_and_set(store):
    store.create(JobDraft("j", {}, "t", "alice"), "queued")
    assert store.transition("j", [JobState.QUEUED, JobState.RUNNING], JobState.CANCELLED, "stop")
    assert store.transition("j", [JobState.RUNNING], JobState.FAILED, "late",
                            error=JobError("INTERNAL", "x")) is None
    assert store.get("j").state is JobState.CANCELLED and store.get("j").error is None
    with pytest.raises(AlreadyExists):
        store.create(JobDraft("j", {}, "t", "alice"), "queued")
    with pytest.raises(NotFound):
        store.get("missing")


def test_store_remembers_resumes_and_when_tenants_were_served(store):
    store.create(JobDraft("j", {}, "vision", "alice"), "queued")
    store.transition("j", [JobState.QUEUED], JobState.RUNNING, "go")
    resumed = store.mark_resumed("j", "restarted")
    assert resumed.resume_count == 1 and resumed.state is JobState.RUNNING
    assert set(store.tenant_last_start_times()) == {"vision"}


# -- progress protocol --------------------------------------------------------------------------


def test_progress_lines_round_trip_and_other_lines_are_not_protocol():
    stream = io.StringIO()
    reporter = ProgressReporter(stream)
    reporter.metrics(3, "train", {"loss": 0.5, "bad": float("nan")})
    reporter.log("WARNING", "careful")
    reporter.error("FAILED_PRECONDITION", "no")
    messages = [parse_progress_line(line) for line in stream.getvalue().splitlines()]
    assert [m.type for m in messages] == ["metrics", "log", "error"]
    assert messages[0].payload == {"epoch": 3, "phase": "train", "values": {"loss": 0.5}}
    assert parse_progress_line("Epoch 3 done") is None
    assert parse_progress_line('@maas-job {"type": "unknown"}') is None
    silent = io.StringIO()
    ProgressReporter(silent, enabled=False).log("INFO", "rank 1 says nothing")
    assert silent.getvalue() == ""


# -- training pieces ----------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    sizes = split_sizes(1797, 0.1, 0.2)
    assert (sizes.train, sizes.validation, sizes.test) == (1258, 180, 359)
    first, again, other = (split_indices(1797, sizes, seed) for seed in (7, 7, 8))
    assert (first.test == again.test).all() and not (first.test == other.test).all()
    combined = sorted([*first.train, *first.validation, *first.test])
    assert combined == list(range(1797))


def test_learning_rate_schedules_with_warmup():
    step = LearningRateSchedule(ScheduleSpec("step", step_size=2, gamma=0.5, warmup_epochs=1), 0.1, 6)
    assert [round(step.at(e), 6) for e in range(1, 7)] == [0.05, 0.1, 0.1, 0.05, 0.05, 0.025]
    cosine = LearningRateSchedule(ScheduleSpec("cosine"), 0.1, 4)
    rates = [cosine.at(e) for e in range(1, 5)]
    assert rates[0] == pytest.approx(0.1) and rates == sorted(rates, reverse=True) and rates[-1] > 0
    assert LearningRateSchedule(ScheduleSpec(), 0.1, 3).at(3) == 0.1


def test_checkpoint_round_trips_optimizer_and_rng_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, TrainingCheckpoint(
        epoch=5, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
        rng_states=[torch.get_rng_state()], progress={"stopped_early": False},
        best_model_state=None))
    restored = load_checkpoint(path)
    assert restored.epoch == 5 and restored.progress == {"stopped_early": False}
    assert torch.equal(restored.rng_states[0], torch.get_rng_state())
    twin = torch.nn.Linear(3, 2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.5)
    twin.load_state_dict(restored.model_state)
    twin_optimizer.load_state_dict(restored.optimizer_state)
    assert twin_optimizer.param_groups[0]["lr"] == 0.01
    assert twin_optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(twin_optimizer.state_dict()["state"][0][key], value)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors framing
    assert path.read_bytes()[8:9] == b"{" and header_length < path.stat().st_size
    assert load_checkpoint(tmp_path / "absent.safetensors") is None


@pytest.mark.parametrize("kind", ["sgd", "momentum", "rmsprop", "adam", "adamw"])
def test_every_optimizer_trains(kind):
    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    targets = (inputs.sum(dim=1) > 0).long()
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(OptimizerSpec(kind, learning_rate=0.05, weight_decay=1e-4,
                                              momentum=0.9 if kind == "momentum" else 0.0,
                                              nesterov=kind == "momentum"), model.parameters())

    def loss():
        return torch.nn.functional.cross_entropy(model(inputs), targets)

    before = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before * 0.8


def test_early_stopping_waits_patience_epochs_and_keeps_the_best_weights():
    model = torch.nn.Linear(2, 2)
    stopper = EarlyStopper(EarlyStoppingSpec("val_loss", patience=2, min_delta=0.01))
    assert not stopper.observe(1, {"val_loss": 1.0}, model)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not stopper.observe(2, {"val_loss": 0.995}, model)  # within min_delta: no gain
    assert stopper.observe(3, {"val_loss": 1.2}, model)
    assert stopper.best_epoch == 1
    assert torch.equal(stopper.best_model_state["weight"], best["weight"])
    accuracy = EarlyStopper(EarlyStoppingSpec("val_accuracy", patience=1))
    assert not accuracy.observe(1, {"val_accuracy": 0.5}, model)
    assert not accuracy.observe(2, {"val_accuracy": 0.6}, model)
    assert accuracy.observe(3, {"val_accuracy": 0.6}, model)
    assert EarlyStopper(None).observe(1, {"val_loss": 9.0}, model) is False


# -- manager with real (tiny) processes ---------------------------------------------------------


class ScriptRunner(JobRunner):
    """Runs each job's `script` with the interpreter: processes without torch, fast."""

    async def prepare(self, job, workdir: Path) -> LaunchSpec:
        workdir.mkdir(parents=True, exist_ok=True)
        return LaunchSpec([sys.executable, "-c", job.spec["script"]], cwd=workdir,
                          log_path=workdir / "job.log")

    async def complete(self, job, workdir: Path) -> dict:
        return {"finished": job.job_id}


REPORTING_SCRIPT = """
from maas_jobs.progress import ProgressReporter
reporter = ProgressReporter()
reporter.metrics(1, "train", {"loss": 0.5})
reporter.log("WARNING", "careful")
print("plain output", flush=True)
reporter.metrics(2, "train", {"loss": 0.25})
"""
CRASHING_SCRIPT = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
FAILING_SCRIPT = """
import sys
from maas_jobs.progress import ProgressReporter
ProgressReporter().error("FAILED_PRECONDITION", "the data ran out")
sys.exit(2)
"""


async def test_manager_runs_jobs_as_processes_and_outlives_crashing_ones(tmp_path):
    store = SqlJobStore.open_sqlite(tmp_path / "jobs.db", COLLECTION)
    manager = JobManager(store, ScriptRunner(), COLLECTION,
                         JobManagerConfig(pool_size=2, work_root=tmp_path / "work",
                                          schedule_interval_seconds=0.1, watch_poll_seconds=0.1),
                         PageTokenCodec(b"k" * 32))
    await manager.start()
    try:
        for job_id, script in (("reports", REPORTING_SCRIPT), ("crashes", CRASHING_SCRIPT),
                               ("fails", FAILING_SCRIPT)):
            await manager.submit(JobDraft(job_id, {"script": script}, "t", "tester"))

        async def history(job_id):
            return [event async for event in manager.watch(job_id)]

        reports, crashes, fails = await asyncio.wait_for(
            asyncio.gather(history("reports"), history("crashes"), history("fails")), 60)
        done = await manager.get("reports")
        assert done.state is JobState.SUCCEEDED and done.result == {"finished": "reports"}
        assert done.metrics == {"loss": 0.25} and done.epoch == 2
        logs = [(e.payload["level"], e.payload["message"]) for e in reports
                if e.kind is EventKind.LOG]
        assert logs == [("WARNING", "careful"), ("INFO", "plain output"),
                        ("INFO", "the work is done; publishing the result")]
        crashed = await manager.get("crashes")
        assert crashed.state is JobState.FAILED and crashed.error.code == "INTERNAL"
        assert "SIGKILL" in crashed.error.message
        failed = await manager.get("fails")
        assert failed.error == JobError("FAILED_PRECONDITION", "the data ran out")
        assert [e.final_state for e in (reports[-1], crashes[-1], fails[-1])] == [
            JobState.SUCCEEDED, JobState.FAILED, JobState.FAILED]
    finally:
        await manager.stop()
        store.close()


class SlowPublishRunner(ScriptRunner):
    """Publishing waits until the test lets it go."""

    def __init__(self) -> None:
        self.publishing = asyncio.Event()
        self.release = asyncio.Event()

    async def complete(self, job, workdir: Path) -> dict:
        self.publishing.set()
        await self.release.wait()
        return {"published": job.job_id}


async def test_a_job_publishing_its_result_can_no_longer_be_cancelled(tmp_path):
    store = SqlJobStore.open_sqlite(tmp_path / "jobs.db", COLLECTION)
    runner = SlowPublishRunner()
    manager = JobManager(store, runner, COLLECTION,
                         JobManagerConfig(pool_size=1, work_root=tmp_path / "work",
                                          schedule_interval_seconds=0.1, watch_poll_seconds=0.1),
                         PageTokenCodec(b"k" * 32))
    await manager.start()
    try:
        await manager.submit(JobDraft("j", {"script": "print('trained')"}, "t", "tester"))
        await asyncio.wait_for(runner.publishing.wait(), 30)
        with pytest.raises(FailedPrecondition) as refused:
            await manager.cancel("j", "changed my mind")
        assert refused.value.reason == "JOB_PUBLISHING"
        assert (await manager.get("j")).state is JobState.RUNNING

        runner.release.set()
        events = await asyncio.wait_for(_all_events(manager, "j"), 30)
        done = await manager.get("j")
        assert done.state is JobState.SUCCEEDED and done.result == {"published": "j"}
        messages = [e.payload["message"] for e in events if e.kind is EventKind.LOG]
        assert "the work is done; publishing the result" in messages
    finally:
        await manager.stop()
        store.close()


async def _all_events(manager, job_id):
    return [event async for event in manager.watch(job_id)]


# -- process group selection --------------------------------------------------------------------


class _RecordingDistributed:
    """Stands in for torch.distributed's process-group calls and records them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def init_process_group(self, backend: str) -> None:
        self.calls.append(("init_process_group", backend))

    def new_group(self, backend: str) -> str:
        self.calls.append(("new_group", backend))
        return f"{backend}-side-group"


@pytest.mark.parametrize("gpus", [False, True])
def test_workers_pick_gloo_on_cpu_and_nccl_on_their_own_gpu(monkeypatch, gpus):
    """The selection only: NCCL itself needs GPUs, which these machines do not have."""
    import torch.distributed
    from maas_trainer.job_process import _world

    recorder, devices = _RecordingDistributed(), []
    monkeypatch.setattr(torch.distributed, "init_process_group", recorder.init_process_group)
    monkeypatch.setattr(torch.distributed, "new_group", recorder.new_group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)

    world = _world(rank=3, world_size=4)
    assert (world.rank, world.size, world.distributed) == (3, 4, True)
    if gpus:
        assert recorder.calls == [("init_process_group", "nccl"), ("new_group", "gloo")]
        assert world.device == "cuda:1" and devices == [1]
        assert world.cpu_group == "gloo-side-group"  # CPU-side collectives cannot use NCCL
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # deterministic cuBLAS
    else:
        assert recorder.calls == [("init_process_group", "gloo")]
        assert world.device == "cpu" and devices == [] and world.cpu_group is None

    single = _world(rank=0, world_size=1)
    assert not single.distributed and len(recorder.calls) == (2 if gpus else 1)


class JobEndingStore(SqlJobStore):
    """Ends the job (a last log line, then SUCCEEDED) right after a read that found nothing."""

    end_after_empty_read = False

    def events_after(self, job_id, after_sequence, limit):
        events = super().events_after(job_id, after_sequence, limit)
        if self.end_after_empty_read and not events:
            self.end_after_empty_read = False
            self.append_log(job_id, LogLevel.INFO, "last words")
            self.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED, "done")
        return events


async def test_a_watcher_sees_the_events_of_a_job_that_ends_between_two_reads(tmp_path):
    store = JobEndingStore.open_sqlite(tmp_path / "jobs.db", COLLECTION)
    manager = JobManager(store, ScriptRunner(), COLLECTION,
                         JobManagerConfig(pool_size=1, work_root=tmp_path / "work"),
                         PageTokenCodec(b"k" * 32))
    try:
        store.create(JobDraft("j", {}, "t", "tester"), "queued")
        store.transition("j", [JobState.QUEUED], JobState.RUNNING, "go")
        seen = store.events_after("j", 0, 100)[-1].sequence
        store.end_after_empty_read = True
        events = await asyncio.wait_for(_all_events_after(manager, "j", seen), 10)
        assert [e.payload.get("message") for e in events if e.kind is EventKind.LOG] == ["last words"]
        assert events[-1].final_state is JobState.SUCCEEDED
    finally:
        store.close()


async def _all_events_after(manager, job_id, after_sequence):
    return [event async for event in manager.watch(job_id, after_sequence)]
