"""Text classifiers served by a real tritonserver: BYTES text in, label and probabilities out.

Both artifacts the trainer registers are written into the model repository as the inference
service writes them and answered by `runtime_model.py` inside Triton's Python-backend stub: a
text_lstm maas-package (tokenizer in its manifest) and a MiniLM HF_TRANSFORMER zip with a
linear head. The expected answers come from the same classifiers loaded in this process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from maas_formats import ArchitectureSpec, ModelManifest, signature_from_manifest
from maas_formats.torch_io import save_torch_package
from maas_inference.triton import BatchingPolicy, RawTensor, TritonModelSpec
from maas_runtime.errors import InvalidArgument
from maas_text import minilm_directory
from maas_trainer.text_training import text_signature, write_minilm_classifier
from maas_zoo import LstmTextClassifier, build_model, tokenizer_preprocessing

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

LABELS = ["debugger", "strings", "containers"]
TEXTS = ["The debugger stops at a breakpoint.", "str.upper() returns an uppercase copy.",
         "A dict maps hashable keys to values.", "tokens " * 200]
BATCHING = BatchingPolicy(max_batch_size=8, max_queue_delay_microseconds=2_000)


def text_tensor(texts: list[bytes]) -> RawTensor:
    return RawTensor("text", "BYTES", (len(texts), 1),
                     b"".join(len(t).to_bytes(4, "little") + t for t in texts))


def bytes_items(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset:offset + 4], "little")
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return items


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(triton_client, model_repository, tmp_path_factory) -> dict[str, object]:
    workdir: Path = tmp_path_factory.mktemp("text-classifiers")
    tokenizer_json = (minilm_directory() / "tokenizer.json").read_text(encoding="utf-8")
    hyperparameters = {"max_length": 32, "embedding_dim": 8, "hidden_size": 8, "num_layers": 1,
                       "bidirectional": True, "dropout": 0.0}
    torch.manual_seed(0)
    module = build_model("text_lstm", hyperparameters, [32], len(LABELS))
    manifest = ModelManifest(
        architecture=ArchitectureSpec(kind="text_lstm", hyperparameters=hyperparameters),
        signature=text_signature(len(LABELS)), labels=LABELS,
        preprocessing=tokenizer_preprocessing(tokenizer_json, 32, "all-MiniLM-L6-v2"))
    package = workdir / "lstm.safetensors"
    written = save_torch_package(package, manifest, module.state_dict())
    model_repository.write_model(TritonModelSpec.from_signature(
        "topics-lstm", "maas-package", signature_from_manifest(written), batching=BATCHING),
        package)

    head = torch.nn.Linear(384, len(LABELS))
    archive = workdir / "minilm.zip"
    write_minilm_classifier(archive, minilm_directory(), head, LABELS, "mean", workdir)
    model_repository.write_model(TritonModelSpec.from_signature(
        "topics-minilm", "hf-transformer", signature_from_manifest(written), batching=BATCHING),
        archive)

    await asyncio.gather(*(triton_client.load_model(name)
                           for name in ("topics-lstm", "topics-minilm")))
    for name in ("topics-lstm", "topics-minilm"):
        await triton_client.wait_model_ready(name, timeout=30)
    return {"package": package, "head": head}


async def _classify(triton_client, model: str, texts: list[bytes]):
    reply = await triton_client.infer(model, [text_tensor(texts)])
    labels = [item.decode() for item in bytes_items(reply.output("label").data)]
    probabilities = reply.output("probabilities")
    assert (probabilities.datatype, probabilities.shape) == ("FP32", (len(texts), len(LABELS)))
    return labels, probabilities.to_numpy()


async def test_the_text_lstm_answers_as_in_process(served, triton_client) -> None:
    labels, probabilities = await _classify(triton_client, "topics-lstm",
                                            [t.encode() for t in TEXTS])
    expected = LstmTextClassifier.load(served["package"]).classify(TEXTS)
    assert labels == expected.labels
    np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


async def test_the_minilm_head_answers_as_in_process(served, triton_client) -> None:
    from maas_text.encoder import SentenceEncoder

    labels, probabilities = await _classify(triton_client, "topics-minilm",
                                            [t.encode() for t in TEXTS])
    head = served["head"]
    logits = (SentenceEncoder.load(minilm_directory()).embed(TEXTS)
              @ head.weight.detach().numpy().T + head.bias.detach().numpy())
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert labels == [LABELS[i] for i in expected.argmax(axis=1)]


async def test_a_request_with_a_bad_text_fails_alone(served, triton_client) -> None:
    bad = triton_client.infer("topics-lstm", [text_tensor([b"ok", b"caf\xe9 \xff"])])
    good = triton_client.infer("topics-lstm", [text_tensor([b"the pdb debugger"])])
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], InvalidArgument), results[0]
    assert "text[1]" in str(results[0]) and "UTF-8" in str(results[0])
    assert bytes_items(results[1].output("label").data)[0].decode() in LABELS
