"""Text classifiers as served: each artifact the trainer writes loads back with its tokenizer
and answers texts with a label and probabilities that agree with the raw network."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from maas_formats import ArchitectureSpec, ModelManifest
from maas_formats.torch_io import save_torch_package
from maas_text import minilm_directory, unzip_directory
from maas_text.encoder import SentenceEncoder
from maas_trainer.text_training import text_signature, write_minilm_classifier
from maas_zoo import (
    FixedLengthTokenizer,
    LstmTextClassifier,
    SentenceHeadClassifier,
    build_model,
    is_text_classifier,
    tokenizer_preprocessing,
)

TEXTS = ["The debugger stops at a breakpoint.", "str.upper() returns an uppercase copy.",
         "tokens " * 200]
LABELS = ["debugger", "strings", "other"]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return (minilm_directory() / "tokenizer.json").read_text(encoding="utf-8")


def test_a_text_lstm_package_classifies_texts_with_its_own_tokenizer(tmp_path, tokenizer_json):
    hyperparameters = {"max_length": 32, "embedding_dim": 8, "hidden_size": 8, "num_layers": 1,
                       "bidirectional": False, "dropout": 0.0}
    torch.manual_seed(0)
    module = build_model("text_lstm", hyperparameters, [32], 3).eval()
    manifest = ModelManifest(
        architecture=ArchitectureSpec(kind="text_lstm", hyperparameters=hyperparameters),
        signature=text_signature(3), labels=LABELS,
        preprocessing=tokenizer_preprocessing(tokenizer_json, 32, "all-MiniLM-L6-v2"))
    package = tmp_path / "model.safetensors"
    save_torch_package(package, manifest, module.state_dict())
    assert is_text_classifier(package, "maas-package")

    result = LstmTextClassifier.load(package).classify(TEXTS)

    with torch.no_grad():
        ids = FixedLengthTokenizer(tokenizer_json, 32)(TEXTS).input_ids
        expected = torch.softmax(module(torch.from_numpy(ids)), dim=1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert result.probabilities.dtype == np.float32
    assert result.labels == [LABELS[i] for i in expected.argmax(axis=1)]
    assert result.truncated.tolist() == [False, False, True]


def test_a_numeric_package_is_not_a_text_classifier(tmp_path):
    from tests.registry.helpers import mlp_package

    package = tmp_path / "mlp.safetensors"
    package.write_bytes(mlp_package())
    assert not is_text_classifier(package, "maas-package")


def test_the_minilm_classifier_zip_serves_its_head_over_the_encoder(tmp_path):
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 3)
    archive = tmp_path / "model.zip"
    write_minilm_classifier(archive, minilm_directory(), head, LABELS, "mean", tmp_path)
    assert is_text_classifier(archive, "hf-transformer")
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as opened:
        opened.writestr("config.json", "{}")
    assert not is_text_classifier(plain, "hf-transformer")

    directory = unzip_directory(archive, tmp_path / "unzipped")
    result = SentenceHeadClassifier.load(directory).classify(TEXTS)

    vectors = SentenceEncoder.load(minilm_directory()).embed(TEXTS)
    logits = vectors @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert result.labels == [LABELS[i] for i in expected.argmax(axis=1)]
    assert result.truncated.tolist() == [False, False, True]
