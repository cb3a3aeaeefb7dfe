"""Conversions between `maas.trainer.v1` messages and the trainer's domain values.

Requests are read field by field rather than through `MessageToDict`: its JSON mapping
would turn int64 fields into strings, enums into long names and every Struct number into a
float, and each of those would need undoing here anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maas.common.v1 import job_pb2
from maas.trainer.v1 import training_job_pb2
from maas_jobs.records import JobRecord
from maas_jobs.servicer import job_message
from maas_runtime.messages import struct_value_to_python

from maas_trainer.jobs import COLLECTION
from maas_trainer.plan import TrainingPlan

_OPTIMIZER_KINDS = {
    training_job_pb2.OPTIMIZER_KIND_SGD: "sgd",
    training_job_pb2.OPTIMIZER_KIND_MOMENTUM: "momentum",
    training_job_pb2.OPTIMIZER_KIND_RMSPROP: "rmsprop",
    training_job_pb2.OPTIMIZER_KIND_ADAM: "adam",
    training_job_pb2.OPTIMIZER_KIND_ADAMW: "adamw",
}
_SCHEDULE_KINDS = {
    training_job_pb2.SCHEDULE_KIND_CONSTANT: "constant",
    training_job_pb2.SCHEDULE_KIND_STEP: "step",
    training_job_pb2.SCHEDULE_KIND_COSINE: "cosine",
}
_OPTIMIZER_ENUMS = {name: number for number, name in _OPTIMIZER_KINDS.items()}
_SCHEDULE_ENUMS = {name: number for number, name in _SCHEDULE_KINDS.items()}


def _enum_short_name(value: int, known: Mapping[Any, str]) -> str:
    # Unset is "" (the domain says "is required"); an unknown number stays visible as itself.
    if value == 0:
        return ""
    return known.get(value, str(value))


def spec_fields(spec: training_job_pb2.TrainingSpec) -> dict[str, Any]:
    """A request's TrainingSpec as the dict `parse_training_spec` validates."""
    fields: dict[str, Any] = {
        "architecture": {
            "kind": spec.architecture.kind,
            "hyperparameters": {key: struct_value_to_python(value)
                                for key, value in spec.architecture.hyperparameters.fields.items()},
        },
        "data": {"dataset": spec.data.dataset,
                 "validation_fraction": spec.data.validation_fraction,
                 "test_fraction": spec.data.test_fraction},
        "optimizer": {"kind": _enum_short_name(spec.optimizer.kind, _OPTIMIZER_KINDS),
                      "learning_rate": spec.optimizer.learning_rate,
                      "weight_decay": spec.optimizer.weight_decay,
                      "momentum": spec.optimizer.momentum, "nesterov": spec.optimizer.nesterov,
                      "beta1": spec.optimizer.beta1, "beta2": spec.optimizer.beta2},
        "schedule": {"kind": _enum_short_name(spec.schedule.kind, _SCHEDULE_KINDS),
                     "step_size": spec.schedule.step_size, "gamma": spec.schedule.gamma,
                     "warmup_epochs": spec.schedule.warmup_epochs},
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "gradient_clip_norm": spec.gradient_clip_norm,
        "seed": spec.seed,
        "resources": {"workers": spec.resources.workers, "priority": spec.resources.priority,
                      "tenant": spec.resources.tenant},
        "output": {"model_id": spec.output.model_id, "alias": spec.output.alias,
                   "min_test_accuracy": spec.output.min_test_accuracy},
    }
    if spec.HasField("early_stopping"):
        fields["early_stopping"] = {"metric": spec.early_stopping.metric,
                                    "patience": spec.early_stopping.patience,
                                    "min_delta": spec.early_stopping.min_delta}
    return fields


def _spec_message(plan: TrainingPlan) -> training_job_pb2.TrainingSpec:
    """The spec as accepted: every default filled in, tenant resolved."""
    spec = plan.spec
    message = training_job_pb2.TrainingSpec(
        architecture=training_job_pb2.ArchitectureSpec(kind=spec.architecture.kind),
        data=training_job_pb2.DataSource(
            dataset=spec.data.dataset, validation_fraction=spec.data.validation_fraction,
            test_fraction=spec.data.test_fraction),
        optimizer=training_job_pb2.OptimizerSpec(
            kind=_OPTIMIZER_ENUMS[spec.optimizer.kind], learning_rate=spec.optimizer.learning_rate,
            weight_decay=spec.optimizer.weight_decay, momentum=spec.optimizer.momentum,
            nesterov=spec.optimizer.nesterov, beta1=spec.optimizer.beta1,
            beta2=spec.optimizer.beta2),
        schedule=training_job_pb2.ScheduleSpec(
            kind=_SCHEDULE_ENUMS[spec.schedule.kind], step_size=spec.schedule.step_size,
            gamma=spec.schedule.gamma, warmup_epochs=spec.schedule.warmup_epochs),
        epochs=spec.epochs, batch_size=spec.batch_size,
        gradient_clip_norm=spec.gradient_clip_norm, seed=spec.seed,
        resources=job_pb2.JobResources(workers=spec.resources.workers,
                                       priority=spec.resources.priority,
                                       tenant=spec.resources.tenant),
        output=training_job_pb2.TrainingOutput(
            model_id=spec.output.model_id, alias=spec.output.alias,
            min_test_accuracy=spec.output.min_test_accuracy))
    message.architecture.hyperparameters.update(spec.architecture.hyperparameters)
    if spec.early_stopping is not None:
        message.early_stopping.CopyFrom(training_job_pb2.EarlyStopping(
            metric=spec.early_stopping.metric, patience=spec.early_stopping.patience,
            min_delta=spec.early_stopping.min_delta))
    return message


def training_job_message(job: JobRecord) -> training_job_pb2.TrainingJob:
    message = job_message(job, COLLECTION, training_job_pb2.TrainingJob)
    message.spec.CopyFrom(_spec_message(TrainingPlan.from_dict(job.spec)))
    message.model_version = job.result.get("model_version", "")
    return message
