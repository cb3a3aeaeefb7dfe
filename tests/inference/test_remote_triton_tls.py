"""A remote Triton serving mTLS is dialled with the peer TLS settings, for control and inference.

A `tritonserver` started with `--grpc-use-ssl-mutual` plays the external Triton; the inference
service reaches it through the one peer transport (`MAAS_INFERENCE_TRITON_TLS` with the
`peer_tls_*` CA, client certificate and key), the registry over TLS with the same settings.
A plaintext client gets nothing from that Triton.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2_grpc
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_inference.triton import TritonServerProcess
from maas_inference.triton.client import control_client
from maas_inference.triton.launcher import TritonProcessConfig
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel
from maas_runtime.peers import PeerTransport
from maas_runtime.tls import channel_credentials
from tritonclient.utils import InferenceServerException

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.inference.test_inference_service import batch, logits, predict_request
from tests.registry.helpers import model_upload_requests
from tests.support.tls import make_certificates

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

HYPER = {"hidden_sizes": [16]}


def _mutual_tls_triton(state_dir: Path, certs: Path) -> TritonServerProcess:
    return TritonServerProcess(TritonProcessConfig(
        state_dir=state_dir, model_repository=state_dir / "model-repository",
        extra_args=("--grpc-use-ssl-mutual=true", f"--grpc-server-cert={certs / 'server.pem'}",
                    f"--grpc-server-key={certs / 'server.key'}",
                    f"--grpc-root-cert={certs / 'ca.pem'}"),
        client_transport=PeerTransport(
            channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key"),
            mutual=True)))


async def test_a_remote_triton_behind_mtls_is_driven_through_the_peer_transport(tmp_path):
    (tmp_path / "certs").mkdir()
    certs = make_certificates(tmp_path / "certs")
    triton = _mutual_tls_triton(tmp_path / "triton", certs)
    await triton.start()
    try:
        # Plaintext, or TLS without the client certificate, gets no answer from it.
        for transport in (PeerTransport(),
                          PeerTransport(channel_credentials(certs / "ca.pem"))):
            async with control_client(triton.grpc_url, transport, ()) as intruder:
                with pytest.raises(InferenceServerException):
                    await intruder.is_server_ready(client_timeout=2.0)

        registry_server = build_registry(RegistrySettings(
            state_dir=tmp_path / "registry", port=0, tls_cert_file=certs / "server.pem",
            tls_key_file=certs / "server.key"))
        registry_port = await registry_server.start()
        admin = (tmp_path / "registry" / "admin.token").read_text().strip()
        registry_channel = open_channel(f"localhost:{registry_port}", token=admin,
                                        credentials=channel_credentials(certs / "ca.pem"))
        registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
        module = zoo_model("mlp", HYPER, [64], seed=12)
        package = tmp_path / "tls.safetensors"
        save_zoo_package(package, module, kind="mlp", hyperparameters=HYPER, input_shape=[64])
        await registry.UploadModelVersion(model_upload_requests("models/tls", package.read_bytes()))

        key_file = tmp_path / "triton-control.key"
        key_file.write_text(triton.control_key + "\n")
        inference_server, app = build_inference(InferenceSettings(
            state_dir=tmp_path / "inference", port=0, triton_url=triton.grpc_url,
            triton_model_repository=str(triton.model_repository),
            triton_control_key_file=str(key_file), triton_tls=True,
            peer_tls_ca_file=certs / "ca.pem", peer_tls_cert_file=certs / "client.pem",
            peer_tls_key_file=certs / "client.key",
            registry_target=f"localhost:{registry_port}",
            client_token_file=tmp_path / "registry" / "admin.token"))
        port = await inference_server.start()
        channel = open_channel(f"127.0.0.1:{port}",
                               token=(tmp_path / "inference" / "admin.token").read_text().strip())
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        try:
            assert app.supervisor.server.transport.name == "mTLS"
            deployment = await stub.CreateDeployment(inf.CreateDeploymentRequest(
                deployment_id="over-mtls",
                deployment=deployment_pb2.Deployment(model="models/tls/versions/1")))
            assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY

            data = batch(3, seed=8)
            reply = await stub.Predict(predict_request("deployments/over-mtls", data))
            with torch.inference_mode():
                expected = module(torch.from_numpy(data)).numpy()
            np.testing.assert_allclose(logits(reply), expected, rtol=1e-4, atol=1e-4)
            await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/over-mtls"))
        finally:
            await channel.close()
            await inference_server.stop(0)
            await registry_channel.close()
            await registry_server.stop(0)
    finally:
        await triton.stop()


async def test_triton_tls_uses_the_peer_settings_and_forces_tls_without_them(tmp_path):
    settings = InferenceSettings(state_dir=tmp_path, triton_tls=True)
    assert PeerTransport.from_settings(settings, tls=True).name == "TLS"
    assert PeerTransport.from_settings(settings).name == "plaintext"
