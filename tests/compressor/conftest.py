"""Fixtures: a real registry and a real compressor (gRPC servers on port 0), and digits
source models trained for seconds and registered once per test module."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
from maas.compressor.v1 import compressor_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_registry.server import build_server as build_registry_server
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel


@dataclass
class Sources:
    """Registered source versions, by role."""

    mlp: str = ""
    """models/digits-mlp/versions/1 (alias production): an MLP [64]."""
    mlp_siblings: list[str] = field(default_factory=list)
    """Two fine-tuned copies of `mlp` (same architecture): fuse members."""
    cnn: str = ""
    """A small CNN [32, 64]."""
    small_mlp: str = ""
    """An MLP [32]: another architecture than `mlp`."""


@dataclass
class CompressorSuite:
    registry_target: str
    registry_token_file: Path
    registry: registry_service_pb2_grpc.RegistryServiceStub
    compressor: compressor_service_pb2_grpc.CompressorServiceStub
    compressor_state: Path
    sources: Sources
    compressor_target: str
    tokens_file: Path


def _package_bytes(model, path: Path) -> bytes:
    from maas_compressor.torch_models import write_package

    write_package(model, path)
    return path.read_bytes()


def train_sources(directory: Path) -> dict[str, bytes]:
    """Digits classifiers trained for seconds, as maas-package bytes."""
    from tests.compressor.torch_helpers import (
        RecordingContext,
        copy_of,
        digits_splits,
        train_in_place,
        zoo_model,
    )

    directory.mkdir(parents=True, exist_ok=True)
    context = RecordingContext(digits_splits(), directory)
    mlp = train_in_place(zoo_model("mlp", {"hidden_sizes": [64]}), context, epochs=8)
    packages = {"mlp": _package_bytes(mlp, directory / "mlp.safetensors")}
    for seed in (1, 2):
        sibling = copy_of(mlp)
        train_in_place(sibling, RecordingContext(context.data, directory, seed=seed), epochs=1,
                       learning_rate=1e-3)
        packages[f"mlp-{seed}"] = _package_bytes(sibling, directory / f"mlp-{seed}.safetensors")
    cnn = train_in_place(zoo_model("cnn", {"channels": [32, 64]}), context, epochs=5)
    packages["cnn"] = _package_bytes(cnn, directory / "cnn.safetensors")
    small = train_in_place(zoo_model("mlp", {"hidden_sizes": [32]}), context, epochs=4)
    packages["small-mlp"] = _package_bytes(small, directory / "small.safetensors")
    return packages


async def register_sources(registry, packages: dict[str, bytes]) -> Sources:
    from tests.compressor.service_helpers import upload

    sources = Sources()
    sources.mlp = (await upload(registry, "digits-mlp", packages["mlp"])).name
    await registry.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits-mlp/aliases/production", version=sources.mlp))
    for seed in (1, 2):
        sources.mlp_siblings.append((await upload(registry, "digits-mlp",
                                                  packages[f"mlp-{seed}"])).name)
    sources.cnn = (await upload(registry, "digits-cnn", packages["cnn"])).name
    sources.small_mlp = (await upload(registry, "digits-small", packages["small-mlp"])).name
    return sources


@asynccontextmanager
async def compressor_servers(root: Path, sources: Callable[[Any, str], Awaitable[Sources]]):
    """A registry and a compressor in this process (gRPC on port 0); `sources(registry stub,
    registry target)` registers the suite's source versions."""
    from maas_compressor.server import build_server as build_compressor_server
    from maas_compressor.settings import CompressorSettings

    registry_settings = RegistrySettings(state_dir=root / "registry", port=0)
    registry_server = build_registry_server(registry_settings)
    registry_port = await registry_server.start()
    registry_token_file = registry_settings.state_dir / "admin.token"
    registry_channel = open_channel(f"127.0.0.1:{registry_port}",
                                    token=registry_token_file.read_text().strip())
    registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)

    settings = CompressorSettings(
        state_dir=root / "compressor", port=0, registry_target=f"127.0.0.1:{registry_port}",
        client_token_file=registry_token_file, worker_slots=2, schedule_interval_seconds=0.2,
        watch_poll_seconds=0.2, job_stop_grace_seconds=5)
    compressor_server = build_compressor_server(settings)
    compressor_port = await compressor_server.start()
    channel = open_channel(f"127.0.0.1:{compressor_port}",
                           token=(settings.state_dir / "admin.token").read_text().strip())
    try:
        yield CompressorSuite(f"127.0.0.1:{registry_port}", registry_token_file, registry,
                              compressor_service_pb2_grpc.CompressorServiceStub(channel),
                              settings.state_dir,
                              await sources(registry, f"127.0.0.1:{registry_port}"),
                              f"127.0.0.1:{compressor_port}", settings.resolved_tokens_file)
    finally:
        await channel.close()
        await compressor_server.stop(0)
        await registry_channel.close()
        await registry_server.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def compressor_suite(tmp_path_factory):
    """Registry and compressor in this process, sources registered; one per test module."""
    root = tmp_path_factory.mktemp("compressor-suite")

    async def digits_sources(registry, _target: str) -> Sources:
        return await register_sources(registry, train_sources(root / "sources"))

    async with compressor_servers(root, digits_sources) as suite:
        yield suite
