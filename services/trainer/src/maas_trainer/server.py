"""Composition root of the trainer: its runner and servicer on the shared job service."""

from __future__ import annotations

from maas.trainer.v1 import trainer_service_pb2_grpc
from maas_jobs.records import JobCollection
from maas_jobs.service import JobServiceParts, build_job_server
from maas_runtime.registry_client import RegistryClient
from maas_runtime.server import ServiceBinding, ServiceServer, run_service
from maas_runtime.telemetry import Telemetry

from maas_trainer.jobs import COLLECTION, TrainingJobs
from maas_trainer.runner import RunnerConfig, TrainingJobRunner
from maas_trainer.servicer import TrainerServicer
from maas_trainer.settings import TrainerSettings

SERVICE_NAME = "maas.trainer.v1.TrainerService"
JOB_COLLECTION = JobCollection(COLLECTION, "training job")


def build_server(settings: TrainerSettings, telemetry: Telemetry | None = None,
                 discovery=None) -> ServiceServer:
    def runner_for(registry: RegistryClient) -> TrainingJobRunner:
        return TrainingJobRunner(registry, RunnerConfig(
            python_executable=settings.python_executable,
            torch_threads=settings.torch_threads_per_worker, job_collection=COLLECTION))

    def binding_for(parts: JobServiceParts[TrainingJobRunner]) -> ServiceBinding:
        servicer = TrainerServicer(TrainingJobs(parts.manager, parts.registry))
        return ServiceBinding(SERVICE_NAME, lambda grpc_server:
                              trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(
                                  servicer, grpc_server))

    return build_job_server("trainer", settings, JOB_COLLECTION, runner_for, binding_for,
                            telemetry=telemetry, discovery=discovery)


def main() -> None:
    run_service("trainer", TrainerSettings(), build_server)


if __name__ == "__main__":
    main()
