"""The classic text pipeline as one flow on real services: a text CSV uploaded to the
registry, a text_lstm trained by the trainer, the registered version deployed by the
inference service on its supervised tritonserver, and texts answered through Predict with a
label and probabilities — the same answers the downloaded package gives in process."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from maas.common.v1 import job_pb2, tensor_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from maas_zoo import LstmTextClassifier

from tests.registry.helpers import download
from tests.trainer.helpers import create_job, expect_error, wait_until_final
from tests.trainer.text_data import (
    LSTM_HYPERPARAMETERS,
    pydoc_paragraphs,
    text_csv,
    text_spec,
    upload_text_dataset,
)

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def text_tensor(texts: list[bytes]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name="text", datatype=tensor_pb2.DATA_TYPE_BYTES,
                             shape=[len(texts), 1],
                             raw_data=b"".join(len(t).to_bytes(4, "little") + t for t in texts))


def bytes_items(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset:offset + 4], "little")
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return items


async def test_trained_text_lstm_is_deployed_and_answers_text_with_labels(
        trainer, registry, tmp_path):
    rows = pydoc_paragraphs(per_class=80)
    dataset = await upload_text_dataset(registry, "pydoc-served", text_csv(rows))
    job = await create_job(trainer.stub, text_spec(
        dataset.name, "text_lstm", "topics", epochs=4, learning_rate=0.005,
        hyperparameters=LSTM_HYPERPARAMETERS))
    job = await wait_until_final(trainer.stub, job.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error

    settings = InferenceSettings(state_dir=tmp_path / "inference", port=0,
                                 client_token_file=registry.token_file)
    server, _app = build_inference(settings, discovery=StaticDiscovery(
        {"registry": [registry.target]}))
    port = await server.start()
    token = (tmp_path / "inference" / "admin.token").read_text().strip()
    channel = open_channel(f"127.0.0.1:{port}", token=token)
    try:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        deployment = await stub.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id="topics", deployment=deployment_pb2.Deployment(model=job.model_version)))
        assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY, deployment

        texts = [text for text, _ in rows[:24]]
        reply = await stub.Predict(inf.PredictRequest(
            deployment="deployments/topics", inputs=[text_tensor([t.encode() for t in texts])]))
        outputs = {output.name: output for output in reply.outputs}
        labels = [item.decode() for item in bytes_items(outputs["label"].raw_data)]
        probabilities = np.frombuffer(outputs["probabilities"].raw_data, np.float32).reshape(
            tuple(outputs["probabilities"].shape))

        _, package = await download(registry.stub.DownloadModelVersion(
            rs.DownloadModelVersionRequest(name=job.model_version)))
        (tmp_path / "model.safetensors").write_bytes(package)
        expected = LstmTextClassifier.load(tmp_path / "model.safetensors").classify(texts)
        assert labels == expected.labels
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-5)
        accuracy = np.mean([p == label for p, (_, label) in zip(labels, rows[:24], strict=True)])
        assert accuracy >= 0.5

        await expect_error(stub.Predict(inf.PredictRequest(
            deployment="deployments/topics", inputs=[text_tensor([b"fine", b"caf\xe9 \xff"])])),
            grpc.StatusCode.INVALID_ARGUMENT, "text[1]")
    finally:
        await channel.close()
        await server.stop(0)
