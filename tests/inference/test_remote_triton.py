"""Remote mode: the inference service drives a Triton it did not start, with the same code.

The session's tritonserver (started by the fixtures, as a platform team would run it in its
own pod) plays the external server: the service gets only its gRPC address and the shared
model repository path (`MAAS_INFERENCE_TRITON_URL`, `MAAS_INFERENCE_TRITON_MODEL_REPOSITORY`),
and the key its model control is restricted to (`MAAS_INFERENCE_TRITON_CONTROL_KEY_FILE`).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.inference.test_inference_service import batch, logits, predict_request
from tests.registry.helpers import model_upload_requests

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

HYPER = {"hidden_sizes": [16]}


async def test_deployments_load_into_an_external_triton_and_outlive_the_service(
        tmp_path, triton, triton_client):
    registry_server = build_registry(RegistrySettings(state_dir=tmp_path / "registry", port=0))
    registry_port = await registry_server.start()
    registry_channel = open_channel(
        f"127.0.0.1:{registry_port}",
        token=(tmp_path / "registry" / "admin.token").read_text().strip())
    registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
    module = zoo_model("mlp", HYPER, [64], seed=11)
    package = tmp_path / "remote.safetensors"
    save_zoo_package(package, module, kind="mlp", hyperparameters=HYPER, input_shape=[64])
    await registry.CreateModel(rs.CreateModelRequest(model_id="remote"))
    await registry.UploadModelVersion(model_upload_requests("models/remote", package.read_bytes()))

    # The external Triton guards model control with a key, handed over in a file.
    key_file = tmp_path / "triton-control.key"
    key_file.write_text(triton.control_key + "\n")
    settings = InferenceSettings(
        state_dir=tmp_path / "inference", port=0, triton_url=triton.grpc_url,
        triton_model_repository=str(triton.model_repository),
        triton_control_key_file=str(key_file),
        registry_target=f"127.0.0.1:{registry_port}",
        client_token_file=tmp_path / "registry" / "admin.token")
    inference_server, app = build_inference(settings)
    port = await inference_server.start()
    channel = open_channel(f"127.0.0.1:{port}",
                           token=(tmp_path / "inference" / "admin.token").read_text().strip())
    stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
    try:
        assert app.supervisor.server.grpc_url == triton.grpc_url, "no tritonserver of its own"
        deployment = await stub.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id="remote-mode",
            deployment=deployment_pb2.Deployment(model="models/remote/versions/1")))
        assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY
        assert (triton.model_repository / "remote-mode.remote.v1" / "config.pbtxt").exists()

        data = batch(4, seed=5)
        reply = await stub.Predict(predict_request("deployments/remote-mode", data))
        with torch.inference_mode():
            expected = module(torch.from_numpy(data)).numpy()
        np.testing.assert_allclose(logits(reply), expected, rtol=1e-4, atol=1e-4)
        assert await triton_client.is_model_ready("remote-mode.remote.v1")

        await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/remote-mode"))
        for _ in range(100):
            if not await triton_client.is_model_ready("remote-mode.remote.v1"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the deleted deployment's model is still loaded in Triton")
        assert await triton_client.is_server_ready(), "an unloaded model leaves Triton ready"
    finally:
        await channel.close()
        await inference_server.stop(0)
        await registry_channel.close()
        await registry_server.stop(0)
    # Stopping the service leaves the external server running and serving.
    assert triton.is_running
    assert await triton_client.is_server_ready()
