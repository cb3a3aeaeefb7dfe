"""How the tests lay out a tritonserver's state directory, and start a registry + inference
pair as subprocesses with one digits MLP registered."""

from __future__ import annotations

from pathlib import Path

import torch
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.triton import TritonProcessConfig

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.registry.helpers import model_upload_requests
from tests.support.processes import ServiceProcess, free_port


def triton_process_config(state_dir: Path) -> TritonProcessConfig:
    return TritonProcessConfig(state_dir=state_dir, model_repository=state_dir / "model-repository")


def inference_process(root: Path, registry: ServiceProcess, **settings: str) -> ServiceProcess:
    """An inference service (not started) on `registry`, its Triton on a fixed free port."""
    return ServiceProcess(
        "inference", root / "inference", registry_target=registry.target,
        client_token_file=str(root / "registry" / "admin.token"),
        triton_grpc_port=str(free_port()), **settings)


async def register_digits_mlp(root: Path, registry: ServiceProcess, *, hidden: int, seed: int,
                              alias: str = "") -> torch.nn.Module:
    """models/digits/versions/1 (an MLP on 64 features), optionally under `alias`; returns it."""
    hyperparameters = {"hidden_sizes": [hidden]}
    module = zoo_model("mlp", hyperparameters, [64], seed=seed)
    package = root / "digits.safetensors"
    save_zoo_package(package, module, kind="mlp", hyperparameters=hyperparameters,
                     input_shape=[64])
    async with registry.stub() as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
        await stub.UploadModelVersion(model_upload_requests("models/digits", package.read_bytes()))
        if alias:
            await stub.SetModelAlias(rs.SetModelAliasRequest(
                name=f"models/digits/aliases/{alias}", version="models/digits/versions/1"))
    return module
