"""The job's data and the model's interface, in the shapes the steps expect.

The staged dataset (a builtin written as npz, or a registry version, verified when staged) is
split exactly as the trainer splits it with the same seed (10% validation, 20% test): the
evaluation split is the trainer's test split, which a model trained with that seed never saw.
Features stay what a client would send (raw): each model applies its own preprocessing, as
its served form does. Signatures convert between the registry's JSON shape and
`maas_formats.manifest.ModelSignature` here, in one place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from maas_formats import load_dataset
from maas_formats.dataset_sources import DatasetFacts, split_indices, split_sizes
from maas_formats.manifest import ModelSignature, TensorSignature
from maas_runtime.contract_enums import DATA_TYPE_PREFIX
from maas_runtime.errors import FailedPrecondition, FieldViolation

from maas_compressor.spec import field_path

VALIDATION_FRACTION = 0.1
EVALUATION_FRACTION = 0.2
"""As the trainer's default validation and test fractions."""


def signature_from_registry(signature: dict[str, Any]) -> ModelSignature:
    """A registry `Signature` (proto JSON: "DATA_TYPE_FP32", int64 dims as strings)."""

    def tensors(specs: list[dict[str, Any]]) -> tuple[TensorSignature, ...]:
        return tuple(TensorSignature(spec.get("name", ""),
                                     spec.get("datatype", "").removeprefix(DATA_TYPE_PREFIX),
                                     tuple(int(d) for d in spec.get("shape", ())))
                     for spec in specs)

    return ModelSignature(tensors(signature.get("inputs", [])),
                          tensors(signature.get("outputs", [])))


def signature_to_registry(signature: ModelSignature) -> dict[str, Any]:
    def tensors(specs: tuple[TensorSignature, ...]) -> list[dict[str, Any]]:
        return [{"name": spec.name, "datatype": DATA_TYPE_PREFIX + spec.datatype,
                 "shape": list(spec.shape)} for spec in specs]

    return {"inputs": tensors(signature.inputs), "outputs": tensors(signature.outputs)}


def check_dataset_fits(facts: DatasetFacts, signature: ModelSignature) -> None:
    """The dataset's examples must fill the model's one input, and its classes its logits.

    FAILED_PRECONDITION on `spec.evaluation_dataset` otherwise.
    """
    where = field_path("evaluation_dataset")
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        problem = (f"the model has {len(signature.inputs)} inputs and {len(signature.outputs)} "
                   "outputs; compression measures classifiers of one input and one output")
    else:
        input_shape = signature.inputs[0].shape
        outputs = signature.outputs[0].shape
        problem = ""
        if any(d < 0 for d in input_shape):
            problem = f"the model's input has a variable dimension {list(input_shape)}"
        elif math.prod(input_shape) != math.prod(facts.feature_shape):
            problem = (f"{facts.source} has examples of shape {list(facts.feature_shape)} but "
                       f"the model reads {list(input_shape)}")
        elif not outputs or outputs[-1] < facts.num_classes:
            problem = (f"{facts.source} has {facts.num_classes} classes but the model's output "
                       f"has shape {list(outputs)}")
    if problem:
        raise FailedPrecondition(f"{where}: {problem}", reason="DATASET_DOES_NOT_FIT",
                                 field_violations=[FieldViolation(where, problem)])


def load_splits(facts: DatasetFacts, path: Path, signature: ModelSignature, seed: int):
    """`DataSplits` of the staged dataset, shaped for the model's input."""
    from maas_compressor.steps.base import DataSplits

    check_dataset_fits(facts, signature)
    features, labels = load_dataset(path, facts.format, facts.feature_columns, facts.label_column)
    features = np.ascontiguousarray(
        features.reshape(len(features), *signature.inputs[0].shape).astype(np.float32))
    labels = labels.astype(np.int64)
    sizes = split_sizes(len(labels), VALIDATION_FRACTION, EVALUATION_FRACTION)
    split = split_indices(len(labels), sizes, seed)
    return DataSplits(train_x=features[split.train], train_y=labels[split.train],
                      eval_x=features[split.test], eval_y=labels[split.test])
