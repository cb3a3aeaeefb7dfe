"""MiniLM compressed to int8 by the compressor's steps, in both formats, then served end to end.

The compressor's quantize step makes an int8 encoder directory: with format "onnx" an int8
`model.onnx` (the torch encoder converted to ONNX with pooling and normalization in the graph
first), with format "torch" the int8 torch encoder (`maas_text.int8`: int8 rows and scales in
model.safetensors and `maas_quantization.json`). The SDK imports each as an HF_TRANSFORMER
version and deploys it on the real suite (`maas up`: registry, inference and Triton, one suite
for both). Its embeddings through Predict, KServe-v2 ModelInfer and `client.embed` must equal
the in-process `SentenceEncoder` on the same directory (cosine ≥ 0.9999), and the deployment
must say which engine runs it: onnxruntime, or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from maas.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from maas_compressor.hf_models import RUNTIME_ONNXRUNTIME, RUNTIME_TORCH, load_hf
from maas_compressor.steps.base import DataSplits, HfForm
from maas_compressor.steps.quantize import quantize
from maas_sdk.text import text_tensor
from maas_text import SentenceEncoder, minilm_directory, zip_directory
from maas_text.int8 import QUANTIZATION_FILE, SCHEME
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.compressor.torch_helpers import RecordingContext
from tests.support.cli_suite import running_suite_fixture, suite_client_fixture

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SENTENCES = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today.",
             "Une phrase en français, avec des accents: déjà vu."]
DIMENSION = 384
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Int8Format:
    """What one quantize format makes and how the suite must say it serves it."""

    name: str
    step_runtime: str
    """The runtime of the step's result (`HfForm.runtime`) and of the in-process encoder."""
    weights_format: str
    """The `text.weights_format` label of the import."""
    served_by: str
    """The deployment's runtime string."""

    @property
    def deployment(self) -> str:
        return f"minilm-int8-{self.name}"


FORMATS = {
    "onnx": Int8Format("onnx", RUNTIME_ONNXRUNTIME, "onnx",
                       "maas_text tokenizer + onnxruntime in Triton's Python backend"),
    "torch": Int8Format("torch", RUNTIME_TORCH, "safetensors",
                        "maas_text tokenizer + torch in Triton's Python backend"),
}

suite = running_suite_fixture("compressed-text")
client = suite_client_fixture()


@pytest.fixture(scope="module", params=list(FORMATS))
def int8_format(request) -> Int8Format:
    return FORMATS[request.param]


@pytest.fixture(scope="module")
def int8_directory(tmp_path_factory, int8_format) -> Path:
    """Every layer int8 in one quantization (the cosine search is not what is tested)."""
    root = tmp_path_factory.mktemp(f"compress-{int8_format.name}")
    source = load_hf(zip_directory(minilm_directory(), root / "minilm.zip"), root / "source")
    context = RecordingContext(data=DataSplits(*(np.zeros((0, 1), np.float32) for _ in range(4))),
                               workdir=root)
    result = quantize(source, {"dtype": "int8", "format": int8_format.name, "accuracy_aware": False,
                               "min_mean_cosine": 0.9}, context)
    form = result.model.form
    assert isinstance(form, HfForm) and form.runtime == int8_format.step_runtime
    files = {path.name for path in form.directory.iterdir()}
    if int8_format.name == "onnx":
        assert "model.onnx" in files and "model.safetensors" not in files
    else:
        assert {"model.safetensors", QUANTIZATION_FILE} <= files and "model.onnx" not in files
    return form.directory


@pytest.fixture(scope="module")
def local(int8_directory, int8_format) -> SentenceEncoder:
    encoder = SentenceEncoder.load(int8_directory, threads=1)
    assert encoder.backend == int8_format.step_runtime
    return encoder


@pytest.fixture(scope="module")
def deployed(client, int8_directory, int8_format):
    version = client.import_hf(int8_directory, model=f"minilm-int8-{int8_format.name}")
    deployment = client.deploy(int8_format.deployment, version.name, max_batch_size=8)
    return version, deployment


def _cosines(served: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.sum(served * expected, axis=1)


def test_the_int8_directory_is_registered_and_served_by_its_engine(client, deployed, int8_format):
    version, _ = deployed
    assert version.labels["text.weights_format"] == int8_format.weights_format
    assert version.labels.get("text.quantization") == (SCHEME if int8_format.name == "torch" else None)
    served = client.get_deployment(int8_format.deployment).served_versions
    assert [s.model_version for s in served] == [version.name]
    assert served[0].runtime == int8_format.served_by


def test_embed_equals_the_in_process_encoder_on_the_same_directory(client, deployed, local,
                                                                   int8_format):
    served = client.embed(int8_format.deployment, SENTENCES)
    expected = local.embed(SENTENCES)

    assert served.shape == (len(SENTENCES), DIMENSION) and served.dtype == np.float32
    assert _cosines(served, expected).min() >= MIN_COSINE
    similarity = served @ served.T
    assert similarity[0, 1] > similarity[0, 2] + 0.4  # int8 still ranks the paraphrase first


def test_predict_gives_the_same_embeddings(client, suite, deployed, local, int8_format):
    request = inference_service_pb2.PredictRequest(deployment=f"deployments/{int8_format.deployment}",
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


def test_kserve_model_infer_gives_the_same_embeddings(client, suite, deployed, local, int8_format):
    texts = [s.encode() for s in SENTENCES[1:]]
    request = service_pb2.ModelInferRequest(model_name=int8_format.deployment)
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
