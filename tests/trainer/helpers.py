"""Helpers for trainer tests: specs, calls through real stubs, waiting, a trainer subprocess."""

from __future__ import annotations

from pathlib import Path

import grpc
from maas.common.v1 import job_pb2
from maas.trainer.v1 import trainer_service_pb2 as ts, trainer_service_pb2_grpc, training_job_pb2 as tj
from maas_runtime.client import open_channel

from tests.support.grpc_asserts import expect_error  # noqa: F401 - re-exported for the trainer tests
from tests.support.jobs import is_final, states_of, wait_for_job  # noqa: F401 - states_of re-exported
from tests.support.processes import ServiceProcess, process_alive


def digits_spec(*, kind: str = "mlp", hyperparameters=None, epochs: int = 3, batch_size: int = 32,
                learning_rate: float = 0.01, optimizer=tj.OPTIMIZER_KIND_ADAM, seed: int = 0,
                model_id: str = "digits", alias: str = "", dataset: str = "builtin:digits",
                workers: int = 0, tenant: str = "", priority: int = 0,
                min_test_accuracy: float = 0.0) -> tj.TrainingSpec:
    """A small, fast digits job; keyword arguments change one thing at a time."""
    spec = tj.TrainingSpec(
        architecture=tj.ArchitectureSpec(kind=kind),
        data=tj.DataSource(dataset=dataset),
        optimizer=tj.OptimizerSpec(kind=optimizer, learning_rate=learning_rate),
        epochs=epochs, batch_size=batch_size, seed=seed,
        resources=job_pb2.JobResources(workers=workers, tenant=tenant, priority=priority),
        output=tj.TrainingOutput(model_id=model_id, alias=alias,
                                 min_test_accuracy=min_test_accuracy))
    spec.architecture.hyperparameters.update(
        {"hidden_sizes": [32]} if hyperparameters is None and kind == "mlp"
        else hyperparameters or {})
    return spec


async def create_job(stub, spec: tj.TrainingSpec, job_id: str = "") -> tj.TrainingJob:
    return await stub.CreateTrainingJob(ts.CreateTrainingJobRequest(
        training_job_id=job_id, training_job=tj.TrainingJob(spec=spec)))


async def get_job(stub, name: str) -> tj.TrainingJob:
    return await stub.GetTrainingJob(ts.GetTrainingJobRequest(name=name))


async def list_jobs(stub, filter_text: str = "") -> list[tj.TrainingJob]:
    jobs, token = [], ""
    while True:
        page = await stub.ListTrainingJobs(ts.ListTrainingJobsRequest(
            filter=filter_text, page_size=100, page_token=token))
        jobs.extend(page.training_jobs)
        token = page.next_page_token
        if not token:
            return jobs


async def wait_for(stub, name: str, predicate, timeout: float = 120.0) -> tj.TrainingJob:
    """Poll Get until `predicate(job)` holds; fail with the job's last state otherwise."""
    return await wait_for_job(lambda job_name: get_job(stub, job_name), name, predicate, timeout)


async def wait_until_final(stub, name: str, timeout: float = 120.0) -> tj.TrainingJob:
    return await wait_for(stub, name, is_final, timeout)


async def watch_events(stub, name: str, after_sequence: int = 0,
                       timeout: float = 120.0) -> list[job_pb2.JobEvent]:
    """Every event of a Watch until the server ends the stream (the job is final)."""
    events = []
    call = stub.WatchTrainingJob(ts.WatchTrainingJobRequest(name=name,
                                                            after_sequence=after_sequence),
                                 timeout=timeout)
    async for event in call:
        events.append(event)
    return events


def job_processes(workdir_marker: str) -> list[int]:
    """Pids whose command line mentions a job's directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if workdir_marker.encode() in command_line and process_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


class TrainerProcess(ServiceProcess):
    """The trainer as a real subprocess (`python -m maas_trainer.server`), for kill -9 tests."""

    def __init__(self, state_dir: Path, registry_target: str, registry_token_file: Path,
                 worker_slots: int = 1):
        super().__init__("trainer", state_dir, registry_target=registry_target,
                         client_token_file=str(registry_token_file),
                         worker_slots=str(worker_slots), schedule_interval_seconds="0.2",
                         watch_poll_seconds="0.2")

    def channel(self) -> grpc.aio.Channel:
        return open_channel(self.target, token=self.admin_token())

    def stub(self, channel: grpc.aio.Channel) -> trainer_service_pb2_grpc.TrainerServiceStub:
        return trainer_service_pb2_grpc.TrainerServiceStub(channel)
