"""Text classifiers as served: texts in, a label and class probabilities out.

Two artifacts hold a text classifier, and each carries its own tokenizer:

- a maas-package of the zoo's `text_lstm`, whose manifest holds the tokenizer under
  `preprocessing.tokenizer` (`maas_zoo.text`) and the class names under `labels`;
- an HF_TRANSFORMER directory of all-MiniLM-L6-v2 (or any sentence encoder `maas_text` loads)
  with a linear head: `classifier/head.safetensors` (`weight` [classes, dim], `bias` [classes])
  and `classifier/classifier.json` (`kind`, `labels`, `head`, and the registry `signature`).

`load_text_classifier(path, format)` returns the one for an artifact, or None when the
artifact is not a text classifier (a numeric zoo package, a plain sentence encoder). Nothing is
unpickled: weights come from safetensors, the tokenizer from its JSON document. The MiniLM
head needs `maas-text[encoder]` (imported only when such a classifier is loaded).
"""

from __future__ import annotations

import json
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maas_zoo.text import TOKENIZER_PREPROCESSING_KEY

MINILM_CLASSIFIER = "minilm_classifier"
CLASSIFIER_FOLDER = "classifier"
CLASSIFIER_MANIFEST = f"{CLASSIFIER_FOLDER}/classifier.json"
CLASSIFIER_HEAD = f"{CLASSIFIER_FOLDER}/head.safetensors"
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"


@dataclass(frozen=True)
class Classified:
    """One answer per text, in order."""

    labels: list[str]
    probabilities: np.ndarray
    """FP32 [texts, classes], each row summing to 1."""
    truncated: np.ndarray
    """bool [texts]: the text was longer than the tokenizer's limit and was cut."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


class TextClassifier(ABC):
    """Classifies already-checked texts (UTF-8 decoded, not empty)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)

    @abstractmethod
    def logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Logits [texts, classes] and the truncation flags."""

    def classify(self, texts: Sequence[str]) -> Classified:
        logits, truncated = self.logits(texts)
        probabilities = _softmax(np.asarray(logits, dtype=np.float64))
        return Classified([self.labels[i] for i in probabilities.argmax(axis=1).tolist()],
                          probabilities, np.asarray(truncated, dtype=bool))


class LstmTextClassifier(TextClassifier):
    """A text_lstm maas-package: its tokenizer (from the manifest) and module, in eval mode."""

    def __init__(self, module: Any, tokenizer: Any, labels: Sequence[str]) -> None:
        super().__init__(labels)
        self._module = module
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, package: str | os.PathLike[str]) -> LstmTextClassifier:
        from maas_formats.torch_io import load_torch_package

        from maas_zoo.architectures import build_model
        from maas_zoo.text import tokenizer_from_preprocessing

        manifest, weights = load_torch_package(package)
        tokenizer = tokenizer_from_preprocessing(manifest.preprocessing)
        labels = manifest.labels or []
        module = build_model(manifest.architecture.kind, manifest.architecture.hyperparameters,
                             [tokenizer.max_length], len(labels))
        module.load_state_dict(weights, strict=True)
        return cls(module.eval(), tokenizer, labels)

    def logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        tokenized = self._tokenizer(texts)
        with torch.inference_mode():
            logits = self._module(torch.from_numpy(tokenized.input_ids))
        return logits.numpy(), tokenized.truncated


class SentenceHeadClassifier(TextClassifier):
    """A sentence encoder's normalized embeddings through a linear head."""

    def __init__(self, encoder: Any, weight: np.ndarray, bias: np.ndarray,
                 labels: Sequence[str]) -> None:
        super().__init__(labels)
        self._encoder = encoder
        self._weight = weight.astype(np.float32)
        self._bias = bias.astype(np.float32)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], threads: int = 1) -> SentenceHeadClassifier:
        import safetensors.numpy
        from maas_text.encoder import SentenceEncoder

        root = Path(directory)
        manifest = json.loads((root / CLASSIFIER_MANIFEST).read_text(encoding="utf-8"))
        head = safetensors.numpy.load_file(str(root / manifest["head"]))
        weight, bias, labels = head["weight"], head["bias"], list(manifest["labels"])
        if weight.shape[0] != len(labels) or bias.shape != (len(labels),):
            raise ValueError(f"the head has {weight.shape[0]} rows for {len(labels)} labels")
        return cls(SentenceEncoder.load(root, threads), weight, bias, labels)

    def logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        vectors, truncated = self._encoder.embed_with_flags(list(texts), max_batch=len(texts))
        return vectors @ self._weight.T + self._bias, np.asarray(truncated, dtype=bool)


def is_text_classifier(path: str | os.PathLike[str], artifact_format: str) -> bool:
    """Whether a maas-package or HF_TRANSFORMER zip holds a text classifier (cheap: headers)."""
    if artifact_format == "maas-package":
        from maas_formats import validate_model_package

        preprocessing = validate_model_package(path).manifest.preprocessing or {}
        return TOKENIZER_PREPROCESSING_KEY in preprocessing
    if artifact_format == "hf-transformer":
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(CLASSIFIER_MANIFEST) for name in archive.namelist())
    return False
