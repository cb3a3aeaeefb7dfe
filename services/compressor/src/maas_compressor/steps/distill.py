"""Distill: train a smaller zoo student to imitate the model (Hinton et al. 2015).

The teacher is the model as it stands, in either form (its logits come from whichever
runtime runs it); the student is a zoo architecture built for the same signature. The loss
mixes the soft targets at a temperature T (KL divergence, scaled by T² so its gradients keep
their size as T changes) with cross-entropy on the hard labels:
`alpha * T² * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)`.
The student keeps the teacher's signature and preprocessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as functional
from maas_runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument
from maas_zoo import resolve_hyperparameters
from maas_zoo.hyperparameters import HYPERPARAMETERS_FIELD

from maas_compressor.measure import predict
from maas_compressor.steps.base import HfForm, ModelUnderCompression, StepContext, StepResult, TorchForm
from maas_compressor.torch_models import (
    build_zoo_module,
    classifier_shape,
    count_parameters,
    module_inputs,
)
from maas_compressor.training import DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATE, train_epochs

STUDENT_FIELD = "student_architecture"
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.7


def distill(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """Train `params["student_architecture"]` on the teacher's soft labels and the hard ones."""
    if isinstance(model.form, HfForm):
        from maas_compressor.steps.transformer import distill_hf
        return distill_hf(model, params, ctx)
    temperature = float(params.get("temperature", DEFAULT_TEMPERATURE))
    alpha = float(params.get("alpha", DEFAULT_ALPHA))
    architecture, student = _student(params[STUDENT_FIELD], model)
    teacher_logits = torch.from_numpy(predict(model, ctx.data.train_x)).float()
    _check_output_shape(student, teacher_logits, model)
    targets = torch.from_numpy(ctx.data.train_y.astype("int64"))

    def distillation_loss(student_logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        soft = (
            functional.kl_div(
                functional.log_softmax(student_logits / temperature, dim=1),
                functional.log_softmax(teacher_logits[batch] / temperature, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
        hard = functional.cross_entropy(student_logits, targets[batch])
        return alpha * soft + (1.0 - alpha) * hard

    ctx.log(f"distilling into a {architecture['kind']} student {architecture['hyperparameters']}")
    losses = train_epochs(
        student,
        module_inputs(model.preprocessing, ctx.data.train_x),
        distillation_loss,
        epochs=int(params["epochs"]),
        learning_rate=float(params.get("learning_rate", DEFAULT_LEARNING_RATE)),
        batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
        context=ctx,
        metric_prefix="distill",
    )
    student_parameters, _ = count_parameters(student)
    details: dict[str, Any] = {
        "student_architecture": architecture,
        "student_parameters": student_parameters,
        "temperature": temperature,
        "alpha": alpha,
        "final_loss": losses[-1] if losses else None,
    }
    if isinstance(model.form, TorchForm):
        details["teacher_parameters"] = count_parameters(model.form.module)[0]
    return StepResult(
        model=model.with_form(TorchForm(module=student, architecture=architecture)),
        details=details,
    )


def _student(spec: Mapping[str, Any], model: ModelUnderCompression) -> tuple[dict[str, Any], torch.nn.Module]:
    """The student's resolved zoo spec and its freshly initialised module."""
    kind = spec["kind"]
    try:
        hyperparameters = resolve_hyperparameters(kind, spec.get("hyperparameters") or {})
        architecture = {"kind": kind, "hyperparameters": hyperparameters}
        module = build_zoo_module(architecture, model.signature)
    except InvalidArgument as error:
        # The zoo names its own fields ("architecture.hyperparameters.x"); here they live
        # under the step's student_architecture.
        raise InvalidArgument(
            f"{STUDENT_FIELD}: {error.message}",
            field_violations=[
                FieldViolation(_student_field(v.field), v.description) for v in error.field_violations
            ],
            reason="STUDENT_ARCHITECTURE_INVALID",
        ) from None
    return architecture, module


def _student_field(zoo_field: str) -> str:
    if zoo_field.startswith(HYPERPARAMETERS_FIELD):
        return f"{STUDENT_FIELD}.hyperparameters{zoo_field[len(HYPERPARAMETERS_FIELD) :]}"
    if zoo_field == "architecture.kind":
        return f"{STUDENT_FIELD}.kind"
    return STUDENT_FIELD


def _check_output_shape(
    student: torch.nn.Module, teacher_logits: torch.Tensor, model: ModelUnderCompression
) -> None:
    input_shape, _ = classifier_shape(model.signature)
    with torch.inference_mode():
        student_shape = tuple(student.eval()(torch.zeros(1, *input_shape)).shape[1:])
    teacher_shape = tuple(teacher_logits.shape[1:])
    if student_shape != teacher_shape:
        description = (
            f"the student's outputs have shape {list(student_shape)}, the teacher's "
            f"{list(teacher_shape)}: it cannot learn the teacher's logits"
        )
        raise FailedPrecondition(
            f"{STUDENT_FIELD}: {description}",
            field_violations=[FieldViolation(STUDENT_FIELD, description)],
            reason="STUDENT_OUTPUT_MISMATCH",
        )
