"""Fixtures: a real registry and real trainers (gRPC servers on port 0) in the test's loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from maas.registry.v1 import registry_service_pb2_grpc
from maas.trainer.v1 import trainer_service_pb2_grpc
from maas_registry.server import build_server as build_registry_server
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel
from maas_trainer.server import build_server as build_trainer_server
from maas_trainer.settings import TrainerSettings


@dataclass
class RegistryHandle:
    target: str
    state_dir: Path
    channel: object
    stub: registry_service_pb2_grpc.RegistryServiceStub

    @property
    def token_file(self) -> Path:
        return self.state_dir / "admin.token"


@dataclass
class TrainerHandle:
    server: object
    settings: TrainerSettings
    channel: object
    stub: trainer_service_pb2_grpc.TrainerServiceStub
    stopped: bool = field(default=False)

    @property
    def jobs_dir(self) -> Path:
        return self.settings.state_dir / "jobs"

    async def close(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.channel.close()
            await self.server.stop(0)


@pytest.fixture
async def registry(tmp_path):
    settings = RegistrySettings(state_dir=tmp_path / "registry", port=0)
    server = build_registry_server(settings)
    port = await server.start()
    token = (settings.state_dir / "admin.token").read_text().strip()
    channel = open_channel(f"127.0.0.1:{port}", token=token)
    yield RegistryHandle(f"127.0.0.1:{port}", settings.state_dir, channel,
                         registry_service_pb2_grpc.RegistryServiceStub(channel))
    await channel.close()
    await server.stop(0)


@pytest.fixture
async def start_trainer(tmp_path, registry):
    """Start trainers on demand: `await start_trainer(worker_slots=1)`."""
    started: list[TrainerHandle] = []

    async def start(worker_slots: int = 2, **overrides) -> TrainerHandle:
        settings = TrainerSettings(
            state_dir=tmp_path / f"trainer-{len(started)}", port=0,
            registry_target=registry.target, client_token_file=registry.token_file,
            worker_slots=worker_slots, schedule_interval_seconds=0.2, watch_poll_seconds=0.2,
            job_stop_grace_seconds=5, **overrides)
        server = build_trainer_server(settings)
        port = await server.start()
        token = (settings.state_dir / "admin.token").read_text().strip()
        channel = open_channel(f"127.0.0.1:{port}", token=token)
        handle = TrainerHandle(server, settings, channel,
                               trainer_service_pb2_grpc.TrainerServiceStub(channel))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        await handle.close()


@pytest.fixture
async def trainer(start_trainer):
    return await start_trainer()
