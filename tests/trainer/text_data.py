"""A labelled text set that ships offline: paragraphs of Python's own documentation.

`pydoc_data.topics` (in the standard library) holds the text of the language reference's help
topics. A paragraph is labelled by the topic family it comes from; the families read
differently enough (string methods, the debugger's commands, container types, how code runs
and fails) that a small classifier does far better than chance, and every machine has them.
"""

from __future__ import annotations

import csv
import io
import re

from maas.registry.v1 import dataset_pb2, registry_service_pb2 as rs
from maas.trainer.v1 import training_job_pb2 as tj

from tests.registry.helpers import dataset_upload_requests
from tests.trainer.helpers import digits_spec

TOPIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "strings": ("string-methods", "formatstrings"),
    "debugger": ("debugger",),
    "containers": ("typesseq", "typesmapping", "typesseq-mutable", "dict"),
    "execution": ("execmodel", "import", "try", "raise", "naming", "exceptions"),
}
MAX_CHARACTERS = 300
LSTM_HYPERPARAMETERS = {"max_length": 64, "embedding_dim": 64, "hidden_size": 64,
                        "num_layers": 1, "bidirectional": True, "dropout": 0.1}


def pydoc_paragraphs(per_class: int = 80) -> list[tuple[str, str]]:
    """(paragraph, family) pairs, `per_class` per family, in a fixed interleaved order."""
    from pydoc_data.topics import topics

    by_family: dict[str, list[str]] = {}
    for family, names in TOPIC_FAMILIES.items():
        paragraphs = []
        for name in names:
            for paragraph in topics[name].split("\n\n"):
                text = re.sub(r"\s+", " ", paragraph).strip()
                if len(text) >= 60:
                    paragraphs.append(text[:MAX_CHARACTERS])
        by_family[family] = paragraphs[:per_class]
    rows = []
    for index in range(per_class):
        for family, paragraphs in by_family.items():
            if index < len(paragraphs):
                rows.append((paragraphs[index], family))
    return rows


def text_csv(rows: list[tuple[str, str]], text_column: str = "text",
             label_column: str = "label") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([text_column, label_column])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


async def upload_text_dataset(registry, dataset_id: str, data: bytes, columns=("text",),
                              label: str = "label") -> dataset_pb2.DatasetVersion:
    """A new registry dataset holding `data` as its DATASET_FORMAT_TEXT_CSV version 1."""
    await registry.stub.CreateDataset(rs.CreateDatasetRequest(dataset_id=dataset_id))
    return await registry.stub.UploadDatasetVersion(dataset_upload_requests(
        f"datasets/{dataset_id}", data, dataset_pb2.DATASET_FORMAT_TEXT_CSV, list(columns),
        label))


def text_spec(dataset: str, kind: str, model_id: str, *, epochs: int, learning_rate: float,
              hyperparameters=None) -> tj.TrainingSpec:
    """A small text classification job (Adam, batch 16)."""
    return digits_spec(kind=kind, hyperparameters=hyperparameters or {}, dataset=dataset,
                       epochs=epochs, batch_size=16, learning_rate=learning_rate,
                       model_id=model_id)
