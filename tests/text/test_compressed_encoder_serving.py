"""MiniLM compressed to int8 ONNX by the compressor's steps, then served end to end.

The compressor's quantize step (which converts the torch encoder to ONNX with pooling and
normalization in the graph first) makes an int8 `model.onnx` directory; the SDK imports it as
an HF_TRANSFORMER version and deploys it on the real suite (`maas up`: registry, inference and
Triton). Its embeddings through Predict, KServe-v2 ModelInfer and `client.embed` must equal
the in-process `SentenceEncoder` on the same directory (cosine ≥ 0.9999), and the deployment
must say onnxruntime runs it.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from maas.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from maas_compressor.hf_models import RUNTIME_ONNXRUNTIME, load_hf
from maas_compressor.steps.base import DataSplits, HfForm
from maas_compressor.steps.quantize import quantize
from maas_sdk.text import text_tensor
from maas_text import SentenceEncoder, minilm_directory, zip_directory
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.compressor.torch_helpers import RecordingContext
from tests.support.cli_suite import running_suite_fixture, suite_client_fixture

pytestmark = [pytest.mark.triton, pytest.mark.slow]

DEPLOYMENT = "minilm-int8-embed"
SENTENCES = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today.",
             "Une phrase en français, avec des accents: déjà vu."]
DIMENSION = 384
MIN_COSINE = 0.9999

suite = running_suite_fixture("compressed-text")
client = suite_client_fixture()


@pytest.fixture(scope="module")
def int8_directory(tmp_path_factory) -> Path:
    """convert + per-channel int8 (one quantization: the cosine search is not what is tested)."""
    root = tmp_path_factory.mktemp("compress")
    source = load_hf(zip_directory(minilm_directory(), root / "minilm.zip"), root / "source")
    context = RecordingContext(data=DataSplits(*(np.zeros((0, 1), np.float32) for _ in range(4))),
                               workdir=root)
    result = quantize(source, {"dtype": "int8", "accuracy_aware": False, "min_mean_cosine": 0.9},
                      context)
    form = result.model.form
    assert isinstance(form, HfForm) and form.runtime == RUNTIME_ONNXRUNTIME
    assert (form.directory / "model.onnx").is_file() and not (form.directory / "model.safetensors").exists()
    return form.directory


@pytest.fixture(scope="module")
def local(int8_directory) -> SentenceEncoder:
    encoder = SentenceEncoder.load(int8_directory, threads=1)
    assert encoder.backend == "onnxruntime"
    return encoder


@pytest.fixture(scope="module")
def deployed(client, int8_directory):
    version = client.import_hf(int8_directory, model="minilm-int8")
    deployment = client.deploy(DEPLOYMENT, version.name, max_batch_size=8)
    return version, deployment


def _cosines(served: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.sum(served * expected, axis=1)


def test_the_int8_onnx_directory_is_registered_and_served_by_onnxruntime(client, deployed):
    version, _ = deployed
    assert version.labels["text.weights_format"] == "onnx"
    served = client.get_deployment(DEPLOYMENT).served_versions
    assert [s.model_version for s in served] == [version.name]
    assert served[0].runtime == "maas_text tokenizer + onnxruntime in Triton's Python backend"


def test_embed_equals_the_in_process_encoder_on_the_same_directory(client, deployed, local):
    served = client.embed(DEPLOYMENT, SENTENCES)
    expected = local.embed(SENTENCES)

    assert served.shape == (len(SENTENCES), DIMENSION) and served.dtype == np.float32
    assert _cosines(served, expected).min() >= MIN_COSINE
    similarity = served @ served.T
    assert similarity[0, 1] > similarity[0, 2] + 0.4  # int8 still ranks the paraphrase first


def test_predict_gives_the_same_embeddings(client, suite, deployed, local):
    request = inference_service_pb2.PredictRequest(deployment=f"deployments/{DEPLOYMENT}",
                                                   inputs=[text_tensor(SENTENCES[:3])])
    channel = grpc.insecure_channel(suite.endpoints["inference"])
    try:
        reply = inference_service_pb2_grpc.InferenceServiceStub(channel).Predict(
            request, metadata=client._metadata, timeout=60)
    finally:
        channel.close()

    outputs = {tensor.name: tensor for tensor in reply.outputs}
    vectors = np.frombuffer(outputs["embedding"].raw_data, np.float32).reshape(3, DIMENSION)
    assert reply.model_version == deployed[0].name
    assert _cosines(vectors, local.embed(SENTENCES[:3])).min() >= MIN_COSINE


def test_kserve_model_infer_gives_the_same_embeddings(client, suite, deployed, local):
    texts = [s.encode() for s in SENTENCES[1:]]
    request = service_pb2.ModelInferRequest(model_name=DEPLOYMENT)
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts), 1])
    request.raw_input_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
    channel = grpc.insecure_channel(suite.endpoints["inference"])
    try:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=client._metadata, timeout=60)
    finally:
        channel.close()

    raw = dict(zip((o.name for o in reply.outputs), reply.raw_output_contents, strict=True))
    vectors = np.frombuffer(raw["embedding"], np.float32).reshape(len(texts), DIMENSION)
    assert _cosines(vectors, local.embed(SENTENCES[1:])).min() >= MIN_COSINE
