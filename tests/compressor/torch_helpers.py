"""Small real models for compressor tests and benchmarks: digits splits, zoo models trained
for seconds, and a recording `StepContext` double.

The step tests share their fixtures from here (`one_torch_thread`, `data`, `context`, and
`trained_model_fixture` for a module's trained zoo models): a test module binds those it
uses to names of its own, which is how pytest finds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from maas_compressor.steps.base import DataSplits, ModelUnderCompression, TorchForm
from maas_compressor.torch_models import build_zoo_module, module_inputs
from maas_compressor.training import label_loss, train_epochs
from maas_formats.manifest import ModelSignature, TensorSignature
from maas_zoo import resolve_hyperparameters

DIGITS_PREPROCESSING = {"scale": 1 / 16}
"""As the trainer records it for builtin:digits: raw pixels 0-16 in, scaled in the model."""
DIGITS_SIGNATURE = ModelSignature(
    inputs=(TensorSignature("input", "FP32", (64,)),),
    outputs=(TensorSignature("logits", "FP32", (10,)),),
)


def digits_splits(eval_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """scikit-learn's digits as clients send them (flat [64] raw pixels), split by `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    eval_count = round(len(order) * eval_fraction)
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    held_out, train = order[:eval_count], order[eval_count:]
    return DataSplits(train_x=x[train], train_y=y[train], eval_x=x[held_out], eval_y=y[held_out])


@dataclass
class RecordingContext:
    """A `StepContext` that keeps what the step reports and serves other versions from a dict."""

    data: DataSplits
    workdir: Path
    seed: int = 0
    versions: dict[str, ModelUnderCompression] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    reported: list[dict[str, float]] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.logs.append(message)

    def metrics(self, values: Mapping[str, float]) -> None:
        self.reported.append(dict(values))

    def load_version(self, name: str) -> ModelUnderCompression:
        return self.versions[name]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread while the module runs: the step tests' numbers are single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data() -> DataSplits:
    return digits_splits()


@pytest.fixture
def context(data, tmp_path) -> RecordingContext:
    return RecordingContext(data=data, workdir=tmp_path)


def trained_model_fixture(kind: str, hyperparameters: Mapping[str, Any], epochs: int,
                          learning_rate: float = 3e-3):
    """A module-scoped fixture: the zoo model `kind` trained for `epochs` on the digits `data`."""

    @pytest.fixture(scope="module")
    def trained(data, tmp_path_factory) -> ModelUnderCompression:
        context = RecordingContext(data=data, workdir=tmp_path_factory.mktemp(kind))
        return train_in_place(zoo_model(kind, hyperparameters), context, epochs=epochs,
                              learning_rate=learning_rate)

    return trained


def zoo_model(kind: str, hyperparameters: Mapping[str, Any], seed: int = 0) -> ModelUnderCompression:
    """An untrained digits classifier of the zoo, initialised from `seed`."""
    architecture = {"kind": kind, "hyperparameters": resolve_hyperparameters(kind, hyperparameters)}
    torch.manual_seed(seed)
    module = build_zoo_module(architecture, DIGITS_SIGNATURE).eval()
    return ModelUnderCompression(
        TorchForm(module=module, architecture=architecture), DIGITS_SIGNATURE, dict(DIGITS_PREPROCESSING)
    )


def train_in_place(model: ModelUnderCompression, context: RecordingContext, epochs: int,
                   learning_rate: float = 2e-3) -> ModelUnderCompression:
    """Train the model's torch module on the context's training split; returns the model."""
    assert isinstance(model.form, TorchForm)
    targets = torch.from_numpy(context.data.train_y)
    train_epochs(model.form.module, module_inputs(model.preprocessing, context.data.train_x),
                 label_loss(targets), epochs=epochs, learning_rate=learning_rate, context=context)
    return model


def copy_of(model: ModelUnderCompression) -> ModelUnderCompression:
    """An independent copy (same weights) of a torch-form model."""
    assert isinstance(model.form, TorchForm)
    module = build_zoo_module(model.form.architecture, model.signature)
    module.load_state_dict(model.form.module.state_dict())
    return ModelUnderCompression(TorchForm(module.eval(), model.form.architecture),
                                 model.signature, model.preprocessing)
