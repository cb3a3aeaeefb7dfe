"""MiniLM served end to end: `maas up` (real registry, inference and Triton), the SDK's
import_hf → deploy → embed, Predict and KServe-v2 ModelInfer through the gateway.

One deployment for the module. Served embeddings must equal the in-process SentenceEncoder's
(cosine ≥ 0.9999), similarities must be sane, and every bad input must fail with its code:
empty text, non-UTF-8 bytes (naming the input item), a batch over the limit, an over-long text
(served, truncated and flagged), a directory without tokenizer (refused at import).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest
from maas.registry.v1 import model_pb2
from maas_runtime.errors import InvalidArgument
from maas_text import SentenceEncoder, minilm_directory
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.cli_suite import MAAS, running_suite_fixture, suite_client_fixture

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SENTENCES = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today.",
             "Une phrase en français, avec des accents: déjà vu."]
MAX_BATCH = 8


suite = running_suite_fixture("text")
client = suite_client_fixture()


@pytest.fixture(scope="module")
def deployed(client):
    version = client.import_hf(minilm_directory(), model="minilm")
    client.deploy("minilm-embed", version.name, max_batch_size=MAX_BATCH)
    return version


@pytest.fixture(scope="module")
def local() -> SentenceEncoder:
    return SentenceEncoder.load(minilm_directory(), threads=1)


def kserve_request(texts: list[bytes]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="minilm-embed")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts), 1])
    request.raw_input_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
    return request


def kserve(client, suite, request):
    channel = grpc.insecure_channel(suite.endpoints["inference"])
    try:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=client._metadata, timeout=60)
    finally:
        channel.close()


def test_import_records_the_format_signature_and_tokenizer(deployed):
    assert deployed.format == model_pb2.MODEL_FORMAT_HF_TRANSFORMER
    assert [(t.name, list(t.shape)) for t in deployed.signature.inputs] == [("text", [1])]
    assert [(t.name, list(t.shape)) for t in deployed.signature.outputs] == [
        ("embedding", [384]), ("truncated", [1])]
    assert deployed.labels["text.tokenizer_class"] == "BertTokenizer"
    assert deployed.labels["text.max_length"] == "256"


def test_the_safetensors_encoder_is_reported_as_served_by_torch(client, deployed):
    served = client.get_deployment("minilm-embed").served_versions
    assert [s.model_version for s in served] == [deployed.name]
    assert served[0].runtime == "maas_text tokenizer + torch in Triton's Python backend"


def test_served_embeddings_equal_the_in_process_encoder(client, deployed, local):
    served = client.embed("minilm-embed", SENTENCES)
    expected = local.embed(SENTENCES)

    assert served.shape == (4, 384) and served.dtype == np.float32
    assert np.sum(served * expected, axis=1).min() >= 0.9999
    similarity = served @ served.T
    assert similarity[0, 1] > similarity[0, 2] + 0.5  # paraphrase ≫ unrelated


def test_kserve_model_infer_gives_the_same_embeddings(client, suite, deployed, local):
    reply = kserve(client, suite, kserve_request([s.encode() for s in SENTENCES[:2]]))

    outputs = {o.name: (o, raw) for o, raw in zip(reply.outputs, reply.raw_output_contents,
                                                   strict=True)}
    vectors = np.frombuffer(outputs["embedding"][1], np.float32).reshape(2, 384)
    assert np.sum(vectors * local.embed(SENTENCES[:2]), axis=1).min() >= 0.9999
    assert np.frombuffer(outputs["truncated"][1], np.bool_).tolist() == [False, False]


def test_a_long_text_is_truncated_and_flagged(client, deployed, local):
    long_text = "tokens " * 1000
    vectors, truncated = client.embed("minilm-embed", ["short text", long_text],
                                      with_truncation=True)
    assert truncated.tolist() == [False, True]
    assert float(vectors[1] @ local.embed([long_text])[0]) >= 0.9999


def test_bad_texts_are_invalid_argument_naming_the_item(client, suite, deployed):
    with pytest.raises(InvalidArgument) as error:
        client.embed("minilm-embed", ["fine", ""])
    assert "text[1]" in str(error.value) and "empty" in str(error.value)

    with pytest.raises(grpc.RpcError) as rpc_error:
        kserve(client, suite, kserve_request([b"ok", b"caf\xe9 \xff"]))
    assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text[1]" in rpc_error.value.details() and "UTF-8" in rpc_error.value.details()


def test_a_batch_over_the_limit_is_invalid_argument(client, deployed):
    with pytest.raises(InvalidArgument) as error:
        client.embed("minilm-embed", ["text"] * (MAX_BATCH + 1))
    assert f"max_batch_size {MAX_BATCH}" in str(error.value)


def test_a_directory_without_tokenizer_is_refused_at_import(client, tmp_path):
    directory = tmp_path / "no-tokenizer"
    shutil.copytree(minilm_directory(), directory)
    for name in ("tokenizer.json", "vocab.txt"):
        (directory / name).unlink()
    with pytest.raises(InvalidArgument) as error:
        client.import_hf(directory, model="broken")
    assert "no tokenizer" in str(error.value)
    assert not [m for m in client.list_models() if m.name == "models/broken"]


def test_cli_imports_a_directory_and_names_a_missing_tokenizer(suite, tmp_path):
    done = subprocess.run([*MAAS, "--json", "import", "hf", str(minilm_directory()),
                           "--model", "minilm-cli"], env=suite.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"].startswith("models/minilm-cli/versions/")

    broken = tmp_path / "broken"
    shutil.copytree(minilm_directory(), broken)
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.txt").unlink()
    refused = subprocess.run([*MAAS, "import", "hf", str(broken), "--model", "minilm-cli"],
                             env=suite.env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "no tokenizer" in refused.stderr
