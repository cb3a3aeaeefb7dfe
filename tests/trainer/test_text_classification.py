"""Text classification through the trainer's gRPC API, on a real registry.

A labelled text set that ships offline (paragraphs of `pydoc_data.topics`, labelled by topic
family: 4 classes, so chance is 25%) is uploaded as a DATASET_FORMAT_TEXT_CSV version and
trained on twice: the zoo's text_lstm (tokenizer carried in the package's manifest) and the
frozen MiniLM encoder with a trained head (an HF_TRANSFORMER zip). Each result is rebuilt from
what the registry hands back, tokenizer included, and classifies above chance again.
"""

from __future__ import annotations

import json
import zipfile

import grpc
import numpy as np
import pytest
import torch
from maas.common.v1 import job_pb2
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs
from maas_formats import validate_hf_transformer
from maas_formats.torch_io import load_torch_package
from maas_zoo import build_model, tokenizer_from_preprocessing

from tests.registry.helpers import download
from tests.trainer.helpers import create_job, expect_error, wait_until_final
from tests.trainer.text_data import (
    LSTM_HYPERPARAMETERS,
    pydoc_paragraphs,
    text_csv,
    text_spec,
    upload_text_dataset,
)

CHANCE = 0.25


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str]]:
    return pydoc_paragraphs(per_class=80)


async def test_text_lstm_learns_pydoc_topics_and_carries_its_tokenizer(
        trainer, registry, rows, tmp_path):
    dataset = await upload_text_dataset(registry, "pydoc-topics", text_csv(rows))
    assert dataset.row_count == len(rows) and list(dataset.schema.feature_shape) == []
    assert dataset.schema.num_classes == 4

    job = await create_job(trainer.stub, text_spec(
        dataset.name, "text_lstm", "topics-lstm", epochs=4, learning_rate=0.005,
        hyperparameters=LSTM_HYPERPARAMETERS))
    job = await wait_until_final(trainer.stub, job.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.metrics["test_accuracy"] >= CHANCE + 0.35, job.metrics

    version = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=job.model_version))
    assert version.format == model_pb2.MODEL_FORMAT_MAAS_PACKAGE
    assert version.metrics["test_accuracy"] == job.metrics["test_accuracy"]
    assert list(version.lineage.parents) == [dataset.name]
    assert [(i.name, i.shape) for i in version.signature.inputs] == [("text", [1])]
    assert [(o.name, o.shape) for o in version.signature.outputs] == [
        ("label", [1]), ("probabilities", [4])]

    # The package alone (no maas_text, no dataset) rebuilds the classifier and its tokenizer.
    _, package = await download(registry.stub.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=job.model_version)))
    (tmp_path / "model.safetensors").write_bytes(package)
    manifest, weights = load_torch_package(tmp_path / "model.safetensors")
    assert manifest.labels == ["containers", "debugger", "execution", "strings"]
    tokenizer = tokenizer_from_preprocessing(manifest.preprocessing)
    assert tokenizer.max_length == 64
    module = build_model("text_lstm", manifest.architecture.hyperparameters, [64], 4)
    module.load_state_dict(weights)
    module.eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(tokenizer([text for text, _ in rows]).input_ids))
    predicted = [manifest.labels[index] for index in logits.argmax(dim=1).tolist()]
    accuracy = float(np.mean([p == label for p, (_, label) in zip(predicted, rows, strict=True)]))
    assert accuracy >= CHANCE + 0.35


async def test_minilm_head_is_fine_tuned_and_registered_as_hf_transformer(
        trainer, registry, rows, tmp_path):
    # The frozen encoder costs ~50 ms a paragraph on one thread: rows are interleaved by
    # family, so the first half keeps 40 of each, plenty for a linear head.
    dataset = await upload_text_dataset(registry, "pydoc-topics-minilm",
                                         text_csv(rows[:len(rows) // 2]))
    job = await create_job(trainer.stub, text_spec(
        dataset.name, "minilm_classifier", "topics-minilm", epochs=30, learning_rate=0.05))
    job = await wait_until_final(trainer.stub, job.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.metrics["test_accuracy"] >= CHANCE + 0.45, job.metrics

    version = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=job.model_version))
    assert version.format == model_pb2.MODEL_FORMAT_HF_TRANSFORMER
    assert version.metrics["test_accuracy"] == job.metrics["test_accuracy"]
    assert list(version.lineage.parents) == [dataset.name]
    assert [(o.name, list(o.shape)) for o in version.signature.outputs] == [
        ("label", [1]), ("probabilities", [4])]

    # The zip is a Hugging Face directory (config, safetensors, tokenizer) plus the head.
    _, archive = await download(registry.stub.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=job.model_version)))
    path = tmp_path / "classifier.zip"
    path.write_bytes(archive)
    info = validate_hf_transformer(path)
    assert "tokenizer.json" in info.tokenizer_files
    with zipfile.ZipFile(path) as opened:
        classifier = json.loads(opened.read("classifier/classifier.json"))
    assert classifier["labels"] == ["containers", "debugger", "execution", "strings"]
    assert "classifier/head.safetensors" in info.weights


@pytest.mark.parametrize(("data", "columns", "field", "words"), [
    (b"body,label\nhello there,a\n", ("text",), "feature_columns", "'text' is not in the CSV"),
    (b"text,label\nhello there,a\n  ,b\n", ("text",), "artifact", "text column 'text' is empty"),
    (b"text,label\nhello,a\ncaf\xe9,b\n", ("text",), "artifact",
     "line 3, column 'text': not UTF-8"),
    (b"text,label\n" + b"w,a\n" * 100_001, ("text",), "artifact", "more than 100000 rows"),
])
async def test_bad_text_datasets_are_invalid_argument_naming_the_field(
        registry, data, columns, field, words):
    error = await expect_error(
        upload_text_dataset(registry, "bad-texts", data, columns), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in error.details() and words in error.details(), error.details()


async def test_architecture_and_dataset_must_agree_on_text(trainer, registry, rows):
    dataset = await upload_text_dataset(registry, "few-topics", text_csv(rows[:40]))
    await expect_error(create_job(trainer.stub, text_spec(
        "builtin:digits", "text_lstm", "lstm-on-digits", epochs=1, learning_rate=0.01)),
        grpc.StatusCode.FAILED_PRECONDITION, "training_job.spec.architecture")
    await expect_error(create_job(trainer.stub, text_spec(
        dataset.name, "mlp", "mlp-on-text", epochs=1, learning_rate=0.01)),
        grpc.StatusCode.FAILED_PRECONDITION, "training_job.spec.architecture")
    await expect_error(create_job(trainer.stub, text_spec(
        dataset.name, "minilm_classifier", "minilm-bad", epochs=1, learning_rate=0.01,
        hyperparameters={"layers": 2})),
        grpc.StatusCode.INVALID_ARGUMENT, "training_job.spec.architecture.hyperparameters.layers")
    spread = text_spec(dataset.name, "minilm_classifier", "minilm-spread", epochs=1,
                       learning_rate=0.01)
    spread.resources.workers = 2
    await expect_error(create_job(trainer.stub, spread), grpc.StatusCode.INVALID_ARGUMENT,
                       "training_job.spec.resources.workers")
