"""A training job's plan, and the files that pass it to and from the job process.

The plan (the validated spec plus the facts of its dataset) is what the job table stores.
In the job's directory, the service writes `run.json` (plan + runtime settings) and the
staged dataset; the job process writes `checkpoint.safetensors` every epoch, and at the end
`model.safetensors` (the model package) — or `model.zip` (an HF_TRANSFORMER directory) for
a fine-tuned pretrained encoder — and `result.json`. A job whose `result.json` exists has
finished training: only publishing remains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas_jobs.files import JobRunConfig, write_json_atomically
from maas_runtime import contract_enums

from maas_trainer.datasets import DatasetFacts
from maas_trainer.pretrained import PRETRAINED_ARCHITECTURES
from maas_trainer.spec import TrainingSpec

RESULT_FILENAME = "result.json"
CHECKPOINT_FILENAME = "checkpoint.safetensors"
PACKAGE_FILENAME = "model.safetensors"
HF_PACKAGE_FILENAME = "model.zip"
LOG_FILENAME = "job.log"


def artifact_of(spec: TrainingSpec) -> tuple[str, str]:
    """(file name in the job's directory, registry ModelFormat) of what the job produces."""
    if spec.architecture.kind in PRETRAINED_ARCHITECTURES:
        return HF_PACKAGE_FILENAME, contract_enums.MODEL_FORMAT_HF_TRANSFORMER
    return PACKAGE_FILENAME, contract_enums.MODEL_FORMAT_MAAS_PACKAGE


@dataclass(frozen=True)
class TrainingPlan:
    """What an accepted job will do: its spec and the dataset it was validated against."""

    spec: TrainingSpec
    dataset: DatasetFacts
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C trace context of the request that created the job (empty when not traced), so
    staging and publishing continue the creator's trace."""

    def to_dict(self) -> dict[str, Any]:
        document = {"training": self.spec.to_dict(), "dataset": self.dataset.to_dict()}
        if self.trace_context:
            document["trace_context"] = dict(self.trace_context)
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> TrainingPlan:
        return cls(TrainingSpec.from_dict(document["training"]),
                   DatasetFacts.from_dict(document["dataset"]),
                   dict(document.get("trace_context", {})))


@dataclass(frozen=True)
class RunConfig(JobRunConfig[TrainingPlan]):
    """`run.json`: everything the job process reads."""

    @classmethod
    def plan_from_dict(cls, document: dict[str, Any]) -> TrainingPlan:
        return TrainingPlan.from_dict(document)


@dataclass(frozen=True)
class RunResult:
    """`result.json`: the finished run's final metrics."""

    metrics: dict[str, float]
    """test_accuracy, test_loss, val_accuracy, val_loss, accuracy, loss, epochs."""
    epochs_completed: int
    stopped_early: bool

    def write(self, workdir: Path) -> None:
        write_json_atomically(workdir / RESULT_FILENAME, {
            "metrics": self.metrics, "epochs_completed": self.epochs_completed,
            "stopped_early": self.stopped_early})

    @classmethod
    def read(cls, workdir: Path) -> RunResult | None:
        path = workdir / RESULT_FILENAME
        if not path.exists():
            return None
        document = json.loads(path.read_text(encoding="utf-8"))
        return cls({k: float(v) for k, v in document["metrics"].items()},
                   int(document["epochs_completed"]), bool(document["stopped_early"]))
