"""The deployment controller and predictor as domain objects, wired as the server wires them,
on real parts: a SQLite deployment table, the registry service (in this process, reached
through the real `RegistryClient`) and a real tritonserver (the session's, in the tests).

A registry here holds small digits MLPs (ONNX) under any model ids the test names, so
deployments whose models are in or out of a token's scope are real, loadable versions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx.numpy_helper
from maas.common.v1 import tensor_pb2
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
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

from tests.registry.helpers import model_upload_requests

HIDDEN = 8
ONNX_OPSET = 13


def digits_mlp_onnx(seed: int) -> tuple[bytes, Callable[[np.ndarray], np.ndarray]]:
    """A 64→8→10 ReLU MLP as an ONNX graph (`features` in, `logits` out) and the same MLP in
    numpy. ONNX keeps Triton's loads light: the model's stub imports onnxruntime, not torch."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, HIDDEN), np.float32)
    b1 = rng.standard_normal(HIDDEN, np.float32)
    w2 = rng.standard_normal((HIDDEN, 10), np.float32)
    b2 = rng.standard_normal(10, np.float32)
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["a"]),
         helper.make_node("MatMul", ["a", "w2"], ["o"]),
         helper.make_node("Add", ["o", "b2"], ["logits"])],
        "digits_mlp",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["rows", 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["rows", 10])],
        [onnx.numpy_helper.from_array(array, name) for name, array in
         (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 8

    def reference(features: np.ndarray) -> np.ndarray:
        return np.maximum(features @ w1 + b1, 0) @ w2 + b2

    return model.SerializeToString(), reference


def digits_signature() -> model_pb2.Signature:
    signature = model_pb2.Signature()
    signature.inputs.add(name="features", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[64])
    signature.outputs.add(name="logits", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[10])
    return signature


class Deployments(NamedTuple):
    """The controller and the predictor on one route table and one deployment table."""

    controller: DeploymentController
    predictor: Predictor
    routes: RouteTable
    store: SqlDeploymentStore


async def upload_mlps(target: str, token: str, versions: Iterable[tuple[str, int]]
                      ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Register a digits MLP (ONNX) as `models/{model}/versions/{n}` for each (model, n), in
    order (so n counts from 1 per model); what each version computes, by version name."""
    references: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    async with open_channel(target, token=token) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        created: set[str] = set()
        for model_id, number in versions:
            if model_id not in created:
                await stub.CreateModel(rs.CreateModelRequest(model_id=model_id))
                created.add(model_id)
            graph, reference = digits_mlp_onnx(seed=len(references) + 1)
            version = await stub.UploadModelVersion(model_upload_requests(
                f"models/{model_id}", graph, fmt=model_pb2.MODEL_FORMAT_ONNX,
                signature=digits_signature()))
            assert version.name == f"models/{model_id}/versions/{number}", version.name
            references[version.name] = reference
    return references


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
