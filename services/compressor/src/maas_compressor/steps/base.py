"""What every compression step sees and returns; the contract between the pipeline and its steps.

A pipeline holds one `ModelUnderCompression` at a time, in exactly one form: a torch module
built from a zoo architecture (`TorchForm`: prune, distill and fuse work here), an ONNX file
(`OnnxForm`: quantization works here; `convert` turns the first into the second), or a
Hugging Face sentence-encoder directory (`HfForm`: config, tokenizer and either safetensors for
torch or model.onnx for onnxruntime; convert, quantize and distill have encoder variants). A step is a
plain function `(model, parameters, context) -> StepResult`; it never imports grpc, reports
progress through the context, and raises `maas_runtime.errors` exceptions (InvalidArgument
naming the step's field, FailedPrecondition when the model cannot take the step) for the job
to fail with a reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from maas_formats.manifest import ModelSignature

if TYPE_CHECKING:
    import torch


@dataclass
class DataSplits:
    """The job's data in the model's input shape: float32 features, int64 class labels.

    `train_*` feeds fine-tuning, distillation and calibration; `eval_*` is held out for the
    measurements and the accuracy gate (never trained or calibrated on).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray


@dataclass
class TorchForm:
    """A float torch module (CPU, eval mode) and the zoo architecture it was built from."""

    module: torch.nn.Module
    architecture: dict[str, Any]
    """Zoo spec `{"kind": ..., "hyperparameters": {...}}`; structured pruning shrinks it."""


@dataclass
class OnnxForm:
    """An ONNX model file in the job's work directory."""

    path: Path
    opset: int


@dataclass
class HfForm:
    """A Hugging Face sentence-encoder directory in the job's work directory: config.json, the
    tokenizer files, sentence-transformers' pooling config, and the weights of one runtime."""

    directory: Path
    runtime: str
    """"torch" (model.safetensors) or "onnxruntime" (model.onnx, pooling in the graph)."""


Form = TorchForm | OnnxForm | HfForm


@dataclass
class ModelUnderCompression:
    """The model a pipeline is working on, with the interface it must keep serving."""

    form: Form
    signature: ModelSignature
    preprocessing: dict[str, Any] | None = None
    """The source manifest's preprocessing, carried into every result unchanged."""
    labels: list[str] | None = None
    """The source manifest's class names, carried into every result unchanged."""

    def with_form(self, form: Form) -> ModelUnderCompression:
        """The same model (signature, preprocessing, labels) in another form: what a step returns."""
        return dataclasses.replace(self, form=form)


@dataclass
class StepResult:
    """A step's output model and what it reports (e.g. `{"sparsity": 0.9}`, the layers an
    accuracy-aware quantization kept in float, the exporter's opset and max abs difference)."""

    model: ModelUnderCompression
    details: dict[str, Any] = field(default_factory=dict)


class StepContext(Protocol):
    """What the pipeline lends a step."""

    data: DataSplits
    workdir: Path
    """A directory of the job's own; files written here live until the job ends."""
    seed: int

    def log(self, message: str) -> None:
        """A line in the job's event stream."""

    def metrics(self, values: Mapping[str, float]) -> None:
        """Intermediate numbers (e.g. a fine-tuning epoch's loss) in the event stream."""

    def load_version(self, name: str) -> ModelUnderCompression:
        """Another registry model version the job was given (fuse's members, a teacher);
        already downloaded and verified by the job before it started."""


Step = Callable[[ModelUnderCompression, Mapping[str, Any], StepContext], StepResult]
"""A compression step: `(model, parameters as in the contract's step message, context)`."""
