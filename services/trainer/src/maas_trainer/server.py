"""Composition root of the trainer: settings → job store, registry, manager → gRPC server."""

from __future__ import annotations

from pathlib import Path

from maas.trainer.v1 import trainer_service_pb2_grpc
from maas_jobs.manager import JobManager, JobManagerConfig
from maas_jobs.metrics import JobMetrics
from maas_jobs.records import JobCollection
from maas_jobs.store import SqlJobStore
from maas_runtime.pagination import PageTokenCodec
from maas_runtime.peers import PeerChannel
from maas_runtime.registry_client import RegistryClient
from maas_runtime.server import ServiceBinding, ServiceServer, run_service
from maas_runtime.telemetry import Telemetry

from maas_trainer.jobs import COLLECTION, TrainingJobs
from maas_trainer.runner import RunnerConfig, TrainingJobRunner
from maas_trainer.servicer import TrainerServicer
from maas_trainer.settings import TrainerSettings

SERVICE_NAME = "maas.trainer.v1.TrainerService"
REGISTRY_SERVICE = "registry"
JOB_COLLECTION = JobCollection(COLLECTION, "training job")


def build_server(settings: TrainerSettings, telemetry: Telemetry | None = None,
                 discovery=None) -> ServiceServer:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqlJobStore.open_sqlite(settings.state_dir / "trainer.db", JOB_COLLECTION)
    if not settings.registry_target and discovery is None:
        raise ValueError("set MAAS_TRAINER_REGISTRY_TARGET or configure discovery")
    registry = RegistryClient(
        PeerChannel.from_settings(settings, REGISTRY_SERVICE, target=settings.registry_target,
                                  discovery=discovery, telemetry=telemetry),
        timeout_seconds=settings.registry_timeout_seconds)
    runner = TrainingJobRunner(registry, RunnerConfig(
        python_executable=settings.python_executable,
        torch_threads=settings.torch_threads_per_worker, job_collection=COLLECTION))
    secret_file = (Path(settings.page_token_secret_file) if settings.page_token_secret_file
                   else settings.state_dir / "page-token.key")
    manager = JobManager(
        store=store, runner=runner, collection=JOB_COLLECTION,
        config=JobManagerConfig(
            pool_size=settings.worker_slots, work_root=settings.state_dir / "jobs",
            stop_grace_seconds=settings.job_stop_grace_seconds,
            schedule_interval_seconds=settings.schedule_interval_seconds,
            watch_poll_seconds=settings.watch_poll_seconds,
            max_plain_log_lines=settings.max_logged_output_lines),
        page_tokens=PageTokenCodec.from_secret_file(secret_file))
    servicer = TrainerServicer(TrainingJobs(manager, registry))
    server = ServiceServer(
        "trainer", settings,
        [ServiceBinding(SERVICE_NAME, lambda grpc_server:
                        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(
                            servicer, grpc_server))],
        telemetry=telemetry, discovery=discovery)

    async def close_store() -> None:
        store.close()

    server.on_start.extend([registry.open, manager.start])
    server.on_stop.extend([manager.stop, registry.close, close_store])
    if telemetry is not None:
        job_metrics = JobMetrics(store, JOB_COLLECTION, telemetry.meter("maas.jobs"))
        server.on_start.append(job_metrics.start)
        server.on_stop.insert(0, job_metrics.stop)
    return server


def main() -> None:
    run_service("trainer", TrainerSettings(), build_server)


if __name__ == "__main__":
    main()
