"""Checks of a parsed spec against the worker pool and the dataset it names.

These run after `parse_training_spec` succeeded and before anything is queued:

- more workers than the pool has → FAILED_PRECONDITION on `resources.workers` (the request
  is fine; this deployment cannot run it);
- a batch larger than the training split, or smaller than the number of workers, or a split
  that leaves a part empty → INVALID_ARGUMENT naming the field;
- a dataset the architecture cannot read (a CNN over 20 flat features, an MLP over a text
  dataset, a text classifier over numbers), or with fewer than two classes →
  FAILED_PRECONDITION naming the architecture or the dataset.
"""

from __future__ import annotations

from maas_runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, ViolationCollector

from maas_trainer.datasets import DatasetFacts, split_sizes
from maas_trainer.pretrained import PRETRAINED_ARCHITECTURES
from maas_trainer.spec import TrainingSpec, field_path


def check_fits_pool(spec: TrainingSpec, pool_size: int) -> None:
    workers = spec.resources.workers
    if workers > pool_size:
        description = f"asks for {workers} workers but the pool has {pool_size} worker slots"
        raise FailedPrecondition(
            f"{field_path('resources.workers')}: {description}", reason="POOL_TOO_SMALL",
            metadata={"pool_size": str(pool_size)},
            field_violations=[FieldViolation(field_path("resources.workers"), description)])


def check_against_dataset(spec: TrainingSpec, facts: DatasetFacts) -> None:
    """Split sizes and batch size against the dataset's row count; classes present."""
    if facts.num_classes < 2:
        description = (f"{facts.source} has {facts.num_classes} class(es); classification "
                       "needs at least 2")
        raise FailedPrecondition(
            f"{field_path('data.dataset')}: {description}", reason="DATASET_UNUSABLE",
            field_violations=[FieldViolation(field_path("data.dataset"), description)])
    sizes = split_sizes(facts.row_count, spec.data.validation_fraction, spec.data.test_fraction)
    violations = ViolationCollector()
    violations.check(sizes.train >= 1, field_path("data.test_fraction"),
                     f"{facts.source} has {facts.row_count} rows: nothing is left to train on")
    violations.check(spec.batch_size <= sizes.train, field_path("batch_size"),
                     f"{spec.batch_size} is larger than the training split ({sizes.train} of "
                     f"the {facts.row_count} rows of {facts.source})")
    violations.check(spec.batch_size >= spec.resources.workers, field_path("batch_size"),
                     f"{spec.batch_size} cannot be shared by {spec.resources.workers} workers")
    violations.raise_if_any("the training job does not fit its dataset")


def check_architecture_reads_dataset(spec: TrainingSpec, facts: DatasetFacts) -> None:
    """Build the module for the dataset's feature shape and push two zero examples through.

    Runs torch (a few milliseconds for zoo-sized models): call it off the event loop.
    """
    import torch
    from maas_formats import TEXT_CSV
    from maas_zoo import build_model, get_architecture

    architecture_field = field_path("architecture")
    kind = spec.architecture.kind
    pretrained = kind in PRETRAINED_ARCHITECTURES
    reads_text = pretrained or get_architecture(kind).reads_text
    if reads_text != (facts.format == TEXT_CSV):
        reads, holds = ("text", "numeric features") if reads_text else ("numeric features", "text")
        raise _does_not_fit([FieldViolation(
            architecture_field, f"{kind} reads {reads} but {facts.source} holds {holds}")])
    if pretrained:
        # Its input is text by construction and the job loads the encoder; the head trains in
        # seconds on precomputed embeddings, so there is nothing to spread over workers.
        if spec.resources.workers > 1:
            raise InvalidArgument.for_field(
                field_path("resources.workers"),
                f"{kind} trains its head on one worker; asked for {spec.resources.workers}")
        return
    # A text classifier reads max_length token ids per example.
    shape = ([spec.architecture.hyperparameters["max_length"]] if reads_text
             else list(facts.feature_shape))
    _check_parameter_budget(spec, shape, facts.num_classes)
    try:
        module = build_model(spec.architecture.kind, spec.architecture.hyperparameters, shape,
                             facts.num_classes)
        module.eval()
        with torch.no_grad():
            logits = module(torch.zeros(2, *shape))
        if tuple(logits.shape) != (2, facts.num_classes):
            raise RuntimeError(f"it produces logits of shape {list(logits.shape)[1:]}")
    except InvalidArgument as error:
        violations = [FieldViolation(
            architecture_field if v.field in ("input_shape", "num_classes")
            else field_path(v.field),
            f"{spec.architecture.kind} cannot read the features of {facts.source} (shape {shape}, "
            f"{facts.num_classes} classes): {v.description}") for v in error.field_violations]
        raise _does_not_fit(violations) from None
    except RuntimeError as error:
        raise _does_not_fit([FieldViolation(
            architecture_field,
            f"{spec.architecture.kind} cannot read the features of {facts.source} (shape "
            f"{shape}): {error}")]) from None


def _does_not_fit(violations: list[FieldViolation]) -> FailedPrecondition:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return FailedPrecondition(f"the architecture does not fit the dataset: {summary}",
                              reason="ARCHITECTURE_DATASET_MISMATCH", field_violations=violations)


MAX_PARAMETERS = 50_000_000
"""Largest model a job may ask for; beyond it the trainer would exhaust memory building it."""


def _check_parameter_budget(spec: TrainingSpec, shape: list[int], num_classes: int) -> None:
    """Count the requested model's parameters on the meta device (no memory allocated)."""
    import torch
    from maas_zoo import build_model

    if spec.architecture.kind in PRETRAINED_ARCHITECTURES:
        return
    try:
        with torch.device("meta"):
            module = build_model(spec.architecture.kind, spec.architecture.hyperparameters,
                                 shape, num_classes)
    except Exception:  # noqa: BLE001 - the real build below reports it with the dataset's context
        return
    parameters = sum(p.numel() for p in module.parameters())
    if parameters > MAX_PARAMETERS:
        raise InvalidArgument.for_field(
            field_path("architecture.hyperparameters"),
            f"asks for {parameters:,} parameters; the limit is {MAX_PARAMETERS:,}",
            reason="MODEL_TOO_LARGE")
