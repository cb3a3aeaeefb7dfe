"""The training specification: validated, with every default filled in, JSON round-trippable.

`parse_training_spec` checks everything a request can get wrong on its own (unknown
architecture, optimizer or schedule, a non-positive learning rate, zero epochs...) and
reports every violation at once, each naming its field from the request's root
(`training_job.spec.optimizer.learning_rate`). Checks that need the dataset or the pool
live in `maas_trainer.validation`.

The parsed spec is what the job table stores and what the job process reads, so a job
resumed after a restart runs with exactly the settings it was accepted with.

Field values mirror the contract, with enum values in short form: optimizer "sgd",
"momentum", "rmsprop", "adam", "adamw"; schedule "constant", "step", "cosine".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from maas_runtime.errors import InvalidArgument, ViolationCollector
from maas_runtime.names import parse_version_name, validate_alias, validate_id
from maas_zoo import resolve_hyperparameters
from maas_zoo.hyperparameters import resolve

from maas_trainer.datasets import BUILTIN_DATASETS, DATASET_VERSION_PREFIX
from maas_trainer.pretrained import PRETRAINED_ARCHITECTURES

SPEC_FIELD = "training_job.spec"
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
EARLY_STOPPING_METRICS = {"val_loss": "min", "val_accuracy": "max"}
"""Metric → which direction is better."""
MAX_EPOCHS = 10_000
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_MOMENTUM = 0.9
DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.999
DEFAULT_STEP_GAMMA = 0.1


def field_path(relative: str) -> str:
    """`optimizer.kind` → `training_job.spec.optimizer.kind`."""
    return f"{SPEC_FIELD}.{relative}"


@dataclass(frozen=True)
class ArchitectureSpec:
    kind: str
    hyperparameters: dict[str, Any]
    """Every hyperparameter of the zoo entry, defaults filled in (what the manifest records)."""


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    validation_fraction: float
    test_fraction: float

    @property
    def registry_version(self) -> str | None:
        """The dataset version's resource name when the data comes from the registry."""
        return self.dataset if self.dataset.startswith(DATASET_VERSION_PREFIX) else None


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str
    learning_rate: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = DEFAULT_BETA1
    beta2: float = DEFAULT_BETA2


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str = "constant"
    step_size: int = 0
    gamma: float = DEFAULT_STEP_GAMMA
    warmup_epochs: int = 0


@dataclass(frozen=True)
class EarlyStoppingSpec:
    metric: str
    patience: int
    min_delta: float = 0.0

    @property
    def lower_is_better(self) -> bool:
        return EARLY_STOPPING_METRICS[self.metric] == "min"


@dataclass(frozen=True)
class ResourceSpec:
    workers: int
    priority: int
    tenant: str


@dataclass(frozen=True)
class OutputSpec:
    model_id: str
    alias: str = ""
    min_test_accuracy: float = 0.0


@dataclass(frozen=True)
class TrainingSpec:
    """Everything needed to reproduce a training run."""

    architecture: ArchitectureSpec
    data: DataSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    epochs: int
    batch_size: int
    gradient_clip_norm: float
    early_stopping: EarlyStoppingSpec | None
    seed: int
    resources: ResourceSpec
    output: OutputSpec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> TrainingSpec:
        """Rebuild a spec that `to_dict` wrote (trusted: it was validated on the way in)."""
        stopping = document.get("early_stopping")
        return cls(
            architecture=ArchitectureSpec(**document["architecture"]),
            data=DataSpec(**document["data"]),
            optimizer=OptimizerSpec(**document["optimizer"]),
            schedule=ScheduleSpec(**document["schedule"]),
            epochs=document["epochs"],
            batch_size=document["batch_size"],
            gradient_clip_norm=document["gradient_clip_norm"],
            early_stopping=EarlyStoppingSpec(**stopping) if stopping else None,
            seed=document["seed"],
            resources=ResourceSpec(**document["resources"]),
            output=OutputSpec(**document["output"]),
        )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _collect(violations: ViolationCollector, error: InvalidArgument, prefix: str) -> None:
    """Take over the violations of a nested check, re-rooted under `prefix`."""
    for violation in error.field_violations:
        violations.add(f"{prefix}.{violation.field}" if prefix else violation.field,
                       violation.description)


def _parse_architecture(fields: dict, violations: ViolationCollector) -> ArchitectureSpec | None:
    kind = fields.get("kind", "")
    if not kind:
        violations.add(field_path("architecture.kind"), "is required")
        return None
    try:
        # The zoo names fields relative to the spec (`architecture.hyperparameters.dropout`).
        if kind in PRETRAINED_ARCHITECTURES:
            resolved = resolve(PRETRAINED_ARCHITECTURES[kind], fields.get("hyperparameters") or {})
        else:
            resolved = resolve_hyperparameters(kind, fields.get("hyperparameters") or {})
    except InvalidArgument as error:
        _collect(violations, error, SPEC_FIELD)
        return None
    return ArchitectureSpec(kind, resolved)


def _parse_data(fields: dict, violations: ViolationCollector) -> DataSpec:
    dataset = fields.get("dataset", "")
    dataset_field = field_path("data.dataset")
    if not dataset:
        violations.add(dataset_field, "is required")
    elif dataset.startswith(DATASET_VERSION_PREFIX):
        try:
            parse_version_name(dataset, "datasets", dataset_field, allow_alias=False)
        except InvalidArgument as error:
            _collect(violations, error, "")
    elif dataset not in BUILTIN_DATASETS:
        violations.add(dataset_field,
                       f"unknown dataset {dataset!r}; use {', '.join(BUILTIN_DATASETS)} or a "
                       "registry dataset version 'datasets/{dataset}/versions/{n}'")
    validation = _number(fields.get("validation_fraction", 0)) or DEFAULT_VALIDATION_FRACTION
    test = _number(fields.get("test_fraction", 0)) or DEFAULT_TEST_FRACTION
    for name, value in (("validation_fraction", validation), ("test_fraction", test)):
        violations.check(0 < value < 1, field_path(f"data.{name}"),
                         f"must be between 0 and 1 (exclusive), got {value}")
    violations.check(validation + test < 1, field_path("data.test_fraction"),
                     f"validation_fraction + test_fraction must leave data to train on, got "
                     f"{validation} + {test}")
    return DataSpec(dataset, validation, test)


def _parse_optimizer(fields: dict, violations: ViolationCollector) -> OptimizerSpec:
    kind = fields.get("kind", "")
    if not kind:
        violations.add(field_path("optimizer.kind"), f"is required: one of {', '.join(OPTIMIZERS)}")
    elif kind not in OPTIMIZERS:
        violations.add(field_path("optimizer.kind"),
                       f"unknown optimizer {kind!r}; known: {', '.join(OPTIMIZERS)}")
    learning_rate = _number(fields.get("learning_rate", 0))
    violations.check(learning_rate > 0 and math.isfinite(learning_rate),
                     field_path("optimizer.learning_rate"),
                     f"must be a finite number greater than 0, got {learning_rate}")
    weight_decay = _number(fields.get("weight_decay", 0))
    violations.check(weight_decay >= 0 and math.isfinite(weight_decay),
                     field_path("optimizer.weight_decay"), f"must be at least 0, got {weight_decay}")
    # proto3 cannot tell an unset double from 0: 0 means "the default" for these.
    momentum = _number(fields.get("momentum", 0))
    if kind == "momentum" and momentum == 0:
        momentum = DEFAULT_MOMENTUM
    violations.check(0 <= momentum < 1, field_path("optimizer.momentum"),
                     f"must be in [0, 1), got {momentum}")
    nesterov = bool(fields.get("nesterov", False))
    violations.check(not nesterov or kind == "momentum", field_path("optimizer.nesterov"),
                     "applies to the momentum optimizer only")
    beta1 = _number(fields.get("beta1", 0)) or DEFAULT_BETA1
    beta2 = _number(fields.get("beta2", 0)) or DEFAULT_BETA2
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        violations.check(0 < value < 1, field_path(f"optimizer.{name}"),
                         f"must be in (0, 1), got {value}")
    return OptimizerSpec(kind, learning_rate, weight_decay, momentum, nesterov, beta1, beta2)


def _parse_schedule(fields: dict, epochs: int, violations: ViolationCollector) -> ScheduleSpec:
    kind = fields.get("kind") or "constant"
    violations.check(kind in SCHEDULES, field_path("schedule.kind"),
                     f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    step_size = int(fields.get("step_size", 0))
    violations.check(kind != "step" or step_size >= 1, field_path("schedule.step_size"),
                     f"must be at least 1 for the step schedule, got {step_size}")
    gamma = _number(fields.get("gamma", 0)) or DEFAULT_STEP_GAMMA
    violations.check(0 < gamma <= 1, field_path("schedule.gamma"), f"must be in (0, 1], got {gamma}")
    warmup = int(fields.get("warmup_epochs", 0))
    violations.check(0 <= warmup < max(epochs, 1), field_path("schedule.warmup_epochs"),
                     f"must be at least 0 and fewer than the epochs ({epochs}), got {warmup}")
    return ScheduleSpec(kind, step_size, gamma, warmup)


def _parse_early_stopping(fields: dict | None,
                          violations: ViolationCollector) -> EarlyStoppingSpec | None:
    if not fields:
        return None
    metric = fields.get("metric", "")
    violations.check(metric in EARLY_STOPPING_METRICS, field_path("early_stopping.metric"),
                     f"must be one of {', '.join(EARLY_STOPPING_METRICS)}, got {metric!r}")
    patience = int(fields.get("patience", 0))
    violations.check(patience >= 1, field_path("early_stopping.patience"),
                     f"must be at least 1, got {patience}")
    min_delta = _number(fields.get("min_delta", 0))
    violations.check(min_delta >= 0 and math.isfinite(min_delta),
                     field_path("early_stopping.min_delta"), f"must be at least 0, got {min_delta}")
    return EarlyStoppingSpec(metric, patience, min_delta)


def _parse_resources(fields: dict, default_tenant: str,
                     violations: ViolationCollector) -> ResourceSpec:
    workers = int(fields.get("workers", 0)) or 1
    violations.check(workers >= 1, field_path("resources.workers"),
                     f"must be at least 1, got {workers}")
    tenant = fields.get("tenant", "") or default_tenant
    try:
        validate_id(tenant, field_path("resources.tenant"))
    except InvalidArgument as error:
        _collect(violations, error, "")
    return ResourceSpec(workers, int(fields.get("priority", 0)), tenant)


def _parse_output(fields: dict, violations: ViolationCollector) -> OutputSpec:
    model_id = fields.get("model_id", "")
    alias = fields.get("alias", "")
    try:
        validate_id(model_id, field_path("output.model_id"))
        if alias:
            validate_alias(alias, field_path("output.alias"))
    except InvalidArgument as error:
        _collect(violations, error, "")
    threshold = _number(fields.get("min_test_accuracy", 0))
    violations.check(0 <= threshold <= 1, field_path("output.min_test_accuracy"),
                     f"must be in [0, 1], got {threshold}")
    return OutputSpec(model_id, alias, threshold)


def parse_training_spec(fields: dict[str, Any], default_tenant: str) -> TrainingSpec:
    """Validate a spec given in the contract's shape; INVALID_ARGUMENT lists every mistake."""
    violations = ViolationCollector()
    epochs = int(fields.get("epochs", 0))
    violations.check(1 <= epochs <= MAX_EPOCHS, field_path("epochs"),
                     f"must be between 1 and {MAX_EPOCHS}, got {epochs}")
    batch_size = int(fields.get("batch_size", 0))
    violations.check(batch_size >= 1, field_path("batch_size"), f"must be at least 1, got {batch_size}")
    clip = _number(fields.get("gradient_clip_norm", 0))
    violations.check(clip >= 0 and math.isfinite(clip), field_path("gradient_clip_norm"),
                     f"must be at least 0 (0 disables clipping), got {clip}")
    seed = int(fields.get("seed", 0))
    violations.check(0 <= seed < 2**63, field_path("seed"), f"must not be negative, got {seed}")
    # Every part is parsed before raising, so one answer lists every mistake.
    architecture = _parse_architecture(fields.get("architecture") or {}, violations)
    data = _parse_data(fields.get("data") or {}, violations)
    optimizer = _parse_optimizer(fields.get("optimizer") or {}, violations)
    schedule = _parse_schedule(fields.get("schedule") or {}, epochs, violations)
    early_stopping = _parse_early_stopping(fields.get("early_stopping"), violations)
    resources = _parse_resources(fields.get("resources") or {}, default_tenant, violations)
    output = _parse_output(fields.get("output") or {}, violations)
    violations.raise_if_any("invalid training job")
    if architecture is None:  # never: a missing architecture always added a violation above
        raise InvalidArgument.for_field(field_path("architecture"), "is required")
    return TrainingSpec(architecture=architecture, data=data, optimizer=optimizer,
                        schedule=schedule, epochs=epochs, batch_size=batch_size,
                        gradient_clip_norm=clip, early_stopping=early_stopping, seed=seed,
                        resources=resources, output=output)
