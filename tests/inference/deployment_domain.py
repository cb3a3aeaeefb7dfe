"""The deployment controller and predictor as domain objects, wired as the server wires them,
on real parts: a SQLite deployment table, the registry service (in this process, reached
through the real `RegistryClient`) and a real tritonserver (the session's, in the tests).

A registry here holds small digits MLPs under any model ids the test names, so deployments
whose models are in or out of a token's scope are real, loadable versions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.controller import DeploymentController, ServingDefaults
from maas_inference.predictor import Predictor
from maas_inference.routing import RouteTable
from maas_inference.store import SqlDeploymentStore
from maas_inference.triton import TritonClient
from maas_inference.triton.model_repository import ModelRepository
from maas_runtime.auth import ANONYMOUS_ADMIN
from maas_runtime.client import open_channel
from maas_runtime.pagination import PageTokenCodec
from maas_runtime.peers import PeerChannel
from maas_runtime.registry_client import RegistryClient

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.registry.helpers import model_upload_requests

HYPER = {"hidden_sizes": [8]}


class Deployments(NamedTuple):
    """The controller and the predictor on one route table and one deployment table."""

    controller: DeploymentController
    predictor: Predictor
    routes: RouteTable
    store: SqlDeploymentStore


async def upload_mlps(root: Path, target: str, token: str,
                      versions: Iterable[tuple[str, int]]) -> dict[str, torch.nn.Module]:
    """Register a digits MLP as `models/{model}/versions/{n}` for each (model, n), in order
    (so n counts from 1 per model); the reference modules by version name."""
    modules: dict[str, torch.nn.Module] = {}
    async with open_channel(target, token=token) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        created: set[str] = set()
        for model_id, number in versions:
            if model_id not in created:
                await stub.CreateModel(rs.CreateModelRequest(model_id=model_id))
                created.add(model_id)
            module = zoo_model("mlp", HYPER, [64], seed=len(modules) + 1)
            package = root / f"{model_id}-{number}.safetensors"
            save_zoo_package(package, module, kind="mlp", hyperparameters=HYPER,
                             input_shape=[64])
            version = await stub.UploadModelVersion(model_upload_requests(
                f"models/{model_id}", package.read_bytes()))
            assert version.name == f"models/{model_id}/versions/{number}", version.name
            modules[version.name] = module
    return modules


@contextlib.asynccontextmanager
async def deployments_on(root: Path, registry_target: str, registry_token: str,
                         triton: TritonClient, repository: ModelRepository
                         ) -> AsyncIterator[Deployments]:
    """A controller and predictor with their table under `root`; on exit the predictor and
    controller are closed (the table and what is loaded in Triton are left as they are, as
    a stopped service leaves them)."""
    registry = RegistryClient(PeerChannel("registry", target=registry_target,
                                          token=registry_token), timeout_seconds=30)
    await registry.open()
    store = SqlDeploymentStore.open_sqlite(root / "deployments.db")
    routes = RouteTable(store.get, lambda: True)
    controller = DeploymentController(
        store, registry, triton, repository, root / "artifacts", ServingDefaults(drain_seconds=1),
        routes, PageTokenCodec(b"k" * 32))
    predictor = Predictor(routes, triton)
    try:
        yield Deployments(controller, predictor, routes, store)
    finally:
        await predictor.close()
        await controller.close()
        store.close()
        await registry.close()


async def delete_every_deployment(deployments: Deployments) -> None:
    """Delete every deployment of the table, unloading its models from Triton (the session's
    Triton is shared by other tests)."""
    for deployment_id, _ in deployments.store.list("", 1000):
        await deployments.controller.delete(f"deployments/{deployment_id}", ANONYMOUS_ADMIN)
