"""End to end with the real Triton: the compressor quantizes a registered CNN to int8 ONNX and
registers it; the inference service deploys that version; what Predict returns through the
gateway is what the compressor measured — the same logits as onnxruntime on the registered
graph, and on the job's evaluation split the accuracy of the job's report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from maas.common.v1 import job_pb2, tensor_pb2
from maas.compressor.v1 import compressor_service_pb2_grpc
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from maas_runtime.messages import to_dict

from tests.compressor.conftest import _package_bytes
from tests.compressor.service_helpers import create_job, quantize, spec, upload, wait_until_final
from tests.registry.helpers import download

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served_suite(tmp_path_factory):
    """Registry, compressor and inference (with its Triton) in this process."""
    from maas_compressor.server import build_server as build_compressor
    from maas_compressor.settings import CompressorSettings
    from maas_inference.server import build_server as build_inference
    from maas_inference.settings import InferenceSettings
    from maas_registry.server import build_server as build_registry
    from maas_registry.settings import RegistrySettings

    root: Path = tmp_path_factory.mktemp("compressor-served")
    servers, channels = [], []
    try:
        registry = build_registry(RegistrySettings(state_dir=root / "registry", port=0))
        registry_port = await registry.start()
        servers.append(registry)
        token_file = root / "registry" / "admin.token"
        compressor = build_compressor(CompressorSettings(
            state_dir=root / "compressor", port=0, registry_target=f"127.0.0.1:{registry_port}",
            client_token_file=token_file, schedule_interval_seconds=0.2, watch_poll_seconds=0.2))
        compressor_port = await compressor.start()
        servers.append(compressor)
        inference, _ = build_inference(
            InferenceSettings(state_dir=root / "inference", port=0, client_token_file=token_file),
            discovery=StaticDiscovery({"registry": [f"127.0.0.1:{registry_port}"]}))
        inference_port = await inference.start()
        servers.append(inference)
        stubs = {}
        for name, port, stub in (
                ("registry", registry_port, registry_service_pb2_grpc.RegistryServiceStub),
                ("compressor", compressor_port, compressor_service_pb2_grpc.CompressorServiceStub),
                ("inference", inference_port, inference_service_pb2_grpc.InferenceServiceStub)):
            channel = open_channel(f"127.0.0.1:{port}",
                                   token=(root / name / "admin.token").read_text().strip())
            channels.append(channel)
            stubs[name] = stub(channel)
        yield root, stubs
    finally:
        for channel in channels:
            await channel.close()
        for server in reversed(servers):
            await server.stop(0)


async def test_served_int8_outputs_equal_what_the_compressor_measured(served_suite):
    from maas_compressor.data import load_splits, signature_from_registry
    from maas_compressor.onnx_models import predict_onnx
    from maas_compressor.steps.base import OnnxForm
    from maas_formats.dataset_sources import BUILTIN_DATASETS, DIGITS, write_builtin_dataset

    from tests.compressor.torch_helpers import RecordingContext, digits_splits, train_in_place, zoo_model

    root, stubs = served_suite
    cnn = train_in_place(zoo_model("cnn", {"channels": [16, 32]}),
                         RecordingContext(digits_splits(), root), epochs=4)
    source = await upload(stubs["registry"], "digits-cnn",
                          _package_bytes(cnn, root / "cnn.safetensors"))
    job = await create_job(stubs["compressor"], spec(source.name, quantize(), model_id="cnn-int8",
                                                     alias="production", gate=2.0))
    job = await wait_until_final(stubs["compressor"], job.name, timeout=240)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error

    deployment = await stubs["inference"].CreateDeployment(inf.CreateDeploymentRequest(
        deployment_id="cnn-int8",
        deployment=deployment_pb2.Deployment(model="models/cnn-int8@production")))
    assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY, deployment

    # The evaluation split exactly as the job built it (builtin digits, seed 0).
    staged = root / "digits.npz"
    write_builtin_dataset(DIGITS, staged)
    signature_version = await stubs["registry"].GetModelVersion(rs.GetModelVersionRequest(
        name=job.model_version))
    signature = signature_from_registry(to_dict(signature_version.signature))
    data = load_splits(BUILTIN_DATASETS[DIGITS], staged, signature, seed=0)
    rows = data.eval_x.reshape(len(data.eval_x), -1).astype(np.float32)
    parts = []
    for begin in range(0, len(rows), 32):  # the deployment's max_batch_size
        batch = rows[begin:begin + 32]
        reply = await stubs["inference"].Predict(inf.PredictRequest(
            deployment=deployment.name, inputs=[tensor_pb2.Tensor(
                name=signature.inputs[0].name, datatype=tensor_pb2.DATA_TYPE_FP32,
                shape=list(batch.shape), raw_data=batch.tobytes())]))
        assert reply.model_version == job.model_version
        parts.append(np.frombuffer(reply.outputs[0].raw_data, np.float32).reshape(
            tuple(reply.outputs[0].shape)))
    served = np.concatenate(parts)

    _, artifact = await download(stubs["registry"].DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=job.model_version)))
    graph = root / "registered.onnx"
    graph.write_bytes(artifact)
    measured = predict_onnx(OnnxForm(graph, 18), data.eval_x)
    np.testing.assert_allclose(served, measured, rtol=0, atol=1e-5)
    served_accuracy = float((served.argmax(axis=1) == data.eval_y).mean())
    assert served_accuracy == pytest.approx(job.report.after.accuracy, abs=1e-9)
