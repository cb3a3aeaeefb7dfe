"""The whole suite in process for the hostile-request tests: registry, trainer, compressor and
inference (with its real tritonserver), seeded with a model, two versions, an alias, a dataset and a
READY deployment so hostile requests also reach the code behind the name checks. Every log
record the services write while it runs is captured, to be searched for unhandled errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest_asyncio
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import dataset_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_compressor.server import build_server as build_compressor
from maas_compressor.settings import CompressorSettings
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from maas_trainer.server import build_server as build_trainer
from maas_trainer.settings import TrainerSettings

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.registry.helpers import dataset_upload_requests, digits_csv, model_upload_requests

HYPER = {"hidden_sizes": [8]}


class CapturedLogs(logging.Handler):
    """Every record at WARNING or above, from any logger, while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unhandled(self) -> list[logging.LogRecord]:
        """Records of errors nobody handled: an exception logged, or anything at ERROR."""
        return [r for r in self.records if r.exc_info or r.levelno >= logging.ERROR]


@dataclass
class Service:
    """One running service: where it listens, an admin token, its gRPC service names."""

    name: str
    target: str
    token: str
    services: tuple[str, ...]
    server: object = None


@dataclass
class FuzzSuite:
    root: Path
    services: dict[str, Service] = field(default_factory=dict)
    logs: CapturedLogs = field(default_factory=CapturedLogs)

    def channel(self, service: str, token: str | None = None) -> grpc.aio.Channel:
        """A channel that sends `token` (the admin's by default) on every call."""
        chosen = self.services[service]
        return open_channel(chosen.target, token=chosen.token if token is None else token,
                            max_message_bytes=64 * 1024 * 1024)


async def _seed_registry(root: Path, channel) -> None:
    registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
    await registry.CreateModel(rs.CreateModelRequest(model_id="digits"))
    for version in (1, 2):
        module = zoo_model("mlp", HYPER, [64], seed=version)
        path = root / f"v{version}.safetensors"
        save_zoo_package(path, module, kind="mlp", hyperparameters=HYPER, input_shape=[64])
        await registry.UploadModelVersion(model_upload_requests("models/digits",
                                                                path.read_bytes()))
    await registry.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/prod", version="models/digits/versions/1"))
    await registry.CreateDataset(rs.CreateDatasetRequest(dataset_id="digits"))
    await registry.UploadDatasetVersion(dataset_upload_requests(
        "datasets/digits", digits_csv(), dataset_pb2.DATASET_FORMAT_CSV, ["f0", "f1", "f2"],
        "label"))


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def fuzz_suite(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("fuzz")
    suite = FuzzSuite(root)
    logging.getLogger().addHandler(suite.logs)
    started = []
    try:
        registry = build_registry(RegistrySettings(state_dir=root / "registry", port=0,
                                                   event_poll_seconds=0.1))
        port = await registry.start()
        started.append(registry)
        token_file = root / "registry" / "admin.token"
        suite.services["registry"] = Service(
            "registry", f"127.0.0.1:{port}", token_file.read_text().strip(),
            ("maas.registry.v1.RegistryService",), registry)
        async with suite.channel("registry") as channel:
            await _seed_registry(root, channel)

        trainer = build_trainer(TrainerSettings(
            state_dir=root / "trainer", port=0, registry_target=f"127.0.0.1:{port}",
            client_token_file=token_file, worker_slots=1, schedule_interval_seconds=0.2,
            watch_poll_seconds=0.2, job_stop_grace_seconds=5))
        trainer_port = await trainer.start()
        started.append(trainer)
        suite.services["trainer"] = Service(
            "trainer", f"127.0.0.1:{trainer_port}",
            (root / "trainer" / "admin.token").read_text().strip(),
            ("maas.trainer.v1.TrainerService",), trainer)

        compressor = build_compressor(CompressorSettings(
            state_dir=root / "compressor", port=0, registry_target=f"127.0.0.1:{port}",
            client_token_file=token_file, worker_slots=1, schedule_interval_seconds=0.2,
            watch_poll_seconds=0.2, job_stop_grace_seconds=5))
        compressor_port = await compressor.start()
        started.append(compressor)
        suite.services["compressor"] = Service(
            "compressor", f"127.0.0.1:{compressor_port}",
            (root / "compressor" / "admin.token").read_text().strip(),
            ("maas.compressor.v1.CompressorService",), compressor)

        inference, _ = build_inference(
            InferenceSettings(state_dir=root / "inference", port=0, rollout_drain_seconds=1,
                              client_token_file=token_file),
            discovery=StaticDiscovery({"registry": [f"127.0.0.1:{port}"]}))
        inference_port = await inference.start()
        started.append(inference)
        suite.services["inference"] = Service(
            "inference", f"127.0.0.1:{inference_port}",
            (root / "inference" / "admin.token").read_text().strip(),
            ("maas.inference.v1.InferenceService", "inference.GRPCInferenceService",
             "maas.inference.v1.UsageService"), inference)
        async with suite.channel("inference") as channel:
            deployment = await inference_service_pb2_grpc.InferenceServiceStub(
                channel).CreateDeployment(inf.CreateDeploymentRequest(
                    deployment_id="digits",
                    deployment=deployment_pb2.Deployment(model="models/digits@prod")))
            assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY, deployment
        yield suite
    finally:
        for server in reversed(started):
            await server.stop(0)
        logging.getLogger().removeHandler(suite.logs)
