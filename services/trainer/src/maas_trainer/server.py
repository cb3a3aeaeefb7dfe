"""Composition root of the trainer: settings → job store, registry, manager → gRPC server."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from maas.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from maas.trainer.v1 import trainer_service_pb2_grpc
from maas_jobs.manager import JobManager, JobManagerConfig
from maas_jobs.records import JobCollection
from maas_jobs.store import SqlJobStore
from maas_runtime.client import bearer_token_interceptors, open_channel
from maas_runtime.pagination import PageTokenCodec
from maas_runtime.server import ServiceBinding, ServiceServer, run_service
from maas_runtime.telemetry import Telemetry

from maas_trainer.jobs import COLLECTION, TrainingJobs
from maas_trainer.registry_gateway import RegistryGateway
from maas_trainer.runner import RunnerConfig, TrainingJobRunner
from maas_trainer.servicer import TrainerServicer
from maas_trainer.settings import TrainerSettings

_log = logging.getLogger(__name__)
SERVICE_NAME = "maas.trainer.v1.TrainerService"
REGISTRY_SERVICE = "registry"
JOB_COLLECTION = JobCollection(COLLECTION, "training job")


class RegistryConnection:
    """The channel to the registry: a configured target, or the instances discovery knows.

    Opened when the server starts (aio channels belong to a running event loop).
    """

    def __init__(self, settings: TrainerSettings, discovery=None):
        self._settings = settings
        self._discovery = discovery
        self._channel: grpc.aio.Channel | None = None
        self._discovered = None

    def _token(self) -> str | None:
        path = self._settings.resolved_client_token_file
        if path.exists():
            return path.read_text().strip()
        _log.warning("no registry token at %s; registry calls go unauthenticated", path)
        return None

    async def open(self) -> None:
        token = self._token()
        if self._settings.registry_target:
            self._channel = open_channel(self._settings.registry_target, token=token,
                                         max_message_bytes=self._settings.max_message_bytes)
            return
        if self._discovery is None:
            raise ValueError("set MAAS_TRAINER_REGISTRY_TARGET or configure discovery")
        from maas_runtime.discovery import DiscoveredChannel

        self._discovered = DiscoveredChannel(
            self._discovery, REGISTRY_SERVICE,
            options=self._settings.grpc_message_options(),
            interceptors=bearer_token_interceptors(token) if token else ())
        await self._discovered.start()

    def stub(self) -> RegistryServiceStub:
        if self._discovered is not None:
            return self._discovered.stub(RegistryServiceStub)
        if self._channel is None:
            raise RuntimeError("the registry connection is not open")
        return RegistryServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._discovered is not None:
            await self._discovered.close()


def build_server(settings: TrainerSettings, telemetry: Telemetry | None = None,
                 discovery=None) -> ServiceServer:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqlJobStore.open_sqlite(settings.state_dir / "trainer.db", JOB_COLLECTION)
    registry_connection = RegistryConnection(settings, discovery)
    registry = RegistryGateway(registry_connection.stub,
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

    server.on_start.extend([registry_connection.open, manager.start])
    server.on_stop.extend([manager.stop, registry_connection.close, close_store])
    return server


def main() -> None:
    run_service("trainer", TrainerSettings(), build_server)


if __name__ == "__main__":
    main()
