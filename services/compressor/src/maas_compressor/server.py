"""Composition root of the compressor: its runner and servicer on the shared job service."""

from __future__ import annotations

from maas.compressor.v1 import compressor_service_pb2_grpc
from maas_jobs.records import JobCollection
from maas_jobs.service import JobServiceParts, build_job_server
from maas_runtime.registry_client import RegistryClient
from maas_runtime.server import ServiceBinding, ServiceServer, run_service
from maas_runtime.telemetry import Telemetry

from maas_compressor.jobs import COLLECTION, CompressionJobs
from maas_compressor.runner import CompressionJobRunner, RunnerConfig
from maas_compressor.servicer import CompressorServicer
from maas_compressor.settings import CompressorSettings

SERVICE_NAME = "maas.compressor.v1.CompressorService"
JOB_COLLECTION = JobCollection(COLLECTION, "compression job")


def build_server(settings: CompressorSettings, telemetry: Telemetry | None = None,
                 discovery=None) -> ServiceServer:
    def runner_for(registry: RegistryClient) -> CompressionJobRunner:
        return CompressionJobRunner(registry, RunnerConfig(
            python_executable=settings.python_executable,
            torch_threads=settings.torch_threads_per_worker, job_collection=COLLECTION))

    def binding_for(parts: JobServiceParts[CompressionJobRunner]) -> ServiceBinding:
        servicer = CompressorServicer(CompressionJobs(parts.manager, parts.runner, parts.registry,
                                                      parts.work_root))
        return ServiceBinding(SERVICE_NAME, lambda grpc_server:
                              compressor_service_pb2_grpc.add_CompressorServiceServicer_to_server(
                                  servicer, grpc_server))

    return build_job_server("compressor", settings, JOB_COLLECTION, runner_for, binding_for,
                            telemetry=telemetry, discovery=discovery)


def main() -> None:
    run_service("compressor", CompressorSettings(), build_server)


if __name__ == "__main__":
    main()
