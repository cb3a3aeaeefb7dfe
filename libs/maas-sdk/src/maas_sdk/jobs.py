"""Training and compression jobs from the SDK's side: specs from short arguments, progress.

`compression_step("prune:amount=0.5")` builds one `CompressionStep` strictly from the
contract (an unknown step or option is an `InvalidArgument`, enum values by short name:
`quantize:dtype=int8`); `training_spec(...)` builds a `TrainingSpec` from the handful of
arguments most runs change. `JobProgress` is what a `wait(..., progress=callback)` passes on
for every event of the job's Watch stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from maas.common.v1 import job_pb2
from maas.compressor.v1 import compression_job_pb2 as cj
from maas.trainer.v1 import training_job_pb2 as tj

from maas_sdk.errors import InvalidArgument

FINAL_STATES = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


@dataclass(frozen=True)
class JobProgress:
    """One event of a job as it runs: a state change, metrics of an epoch/phase, or a log line."""

    job: str
    kind: str
    """"state_change", "metrics" or "log"."""
    state: str = ""
    """The job's state after this event, e.g. "RUNNING" (JOB_STATE_ prefix dropped)."""
    epoch: int = 0
    total_epochs: int = 0
    """Epochs the job will run (0 when unknown)."""
    phase: str = ""
    """Of metrics: "train", "val", "test", or a compression step."""
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def progress_of(job: str, event: job_pb2.JobEvent, state: str, total_epochs: int) -> JobProgress:
    kind = event.WhichOneof("kind") or ""
    if kind == "state_change":
        return JobProgress(job, kind, state_name(event.state_change.state),
                           total_epochs=total_epochs, message=event.state_change.reason)
    if kind == "metrics":
        return JobProgress(job, kind, state, event.metrics.epoch, total_epochs,
                           event.metrics.phase, dict(event.metrics.values))
    return JobProgress(job, kind, state, total_epochs=total_epochs, message=event.log.message)


def parse_value(text: str) -> Any:
    """`0.5` → 0.5, `true` → True, `[32, 16]` → list, anything else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _enum_value(field_descriptor: FieldDescriptor, value: Any, path: str) -> str:
    names = [v.name for v in field_descriptor.enum_type.values if v.number]
    wanted = str(value).upper()
    for name in names:
        if wanted == name or name.endswith("_" + wanted):
            return name
    short = ", ".join(name.rsplit("_", 1)[-1].lower() for name in names)
    raise InvalidArgument.for_field(path, f"unknown value {value!r}; one of {short}")


def message_from_options(options: Mapping[str, Any], message_type: Any, path: str) -> Any:
    """A message of `message_type` from flat options, strictly: unknown names raise, enum
    values may be given by their short name (`int8` for QUANTIZATION_DTYPE_INT8)."""
    descriptor = message_type.DESCRIPTOR
    document: dict[str, Any] = {}
    for key, value in options.items():
        field_descriptor = descriptor.fields_by_name.get(key)
        if field_descriptor is None:
            known = ", ".join(f.name for f in descriptor.fields)
            raise InvalidArgument.for_field(f"{path}.{key}", f"unknown option; known: {known}")
        if field_descriptor.enum_type is not None:
            value = _enum_value(field_descriptor, value, f"{path}.{key}")
        document[key] = value
    try:
        return json_format.ParseDict(document, message_type())
    except json_format.ParseError as error:
        raise InvalidArgument.for_field(path, str(error)) from None


def compression_step(text: str, index: int = 0) -> cj.CompressionStep:
    """`kind[:key=value,key=value]`, e.g. `prune:amount=0.5,finetune_epochs=1`,
    `quantize:dtype=int8`, `distill:epochs=2,student={"kind":"mlp"}`, `convert`."""
    path = f"steps[{index}]"
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    step_fields = cj.CompressionStep.DESCRIPTOR.fields_by_name
    if kind not in step_fields:
        raise InvalidArgument.for_field(path, f"unknown step {kind!r}; one of "
                                        f"{', '.join(step_fields)}")
    options: dict[str, Any] = {}
    for item in _split_options(rest):
        key, separator, value = item.partition("=")
        if not separator:
            raise InvalidArgument.for_field(path, f"expected key=value, got {item!r}")
        options[key.strip()] = parse_value(value.strip())
    step = cj.CompressionStep()
    getattr(step, kind).CopyFrom(message_from_options(
        options, type(getattr(step, kind)), f"{path}.{kind}"))
    return step


def _split_options(text: str) -> list[str]:
    """Split on commas outside brackets and braces (values may be JSON lists or objects)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current)
    return [item.strip() for item in items if item.strip()]


def compression_spec(source: str, steps: Sequence[cj.CompressionStep | str], *,
                     dataset: str, output_model: str, alias: str = "",
                     max_accuracy_drop: float | None = None, seed: int = 0) -> cj.CompressionSpec:
    built = [step if isinstance(step, cj.CompressionStep) else compression_step(step, index)
             for index, step in enumerate(steps)]
    spec = cj.CompressionSpec(source_model_version=source, steps=built, evaluation_dataset=dataset,
                              output=cj.CompressionOutput(model_id=output_model, alias=alias),
                              seed=seed)
    if max_accuracy_drop is not None:
        spec.max_accuracy_drop = max_accuracy_drop
    return spec


def compression_spec_from_document(document: Mapping[str, Any]) -> cj.CompressionSpec:
    """A `CompressionSpec` from its JSON form (a spec file), strictly; steps may also be
    given in the short `kind:key=value` form."""
    document = dict(document)
    steps: list[Any] = list(document.get("steps", []))
    document["steps"] = [json_format.MessageToDict(compression_step(str(step), index))
                         if isinstance(step, str) else step for index, step in enumerate(steps)]
    try:
        return json_format.ParseDict(document, cj.CompressionSpec())
    except json_format.ParseError as error:
        raise InvalidArgument.for_field("spec", str(error)) from None


def training_spec(*, dataset: str, arch: str, model: str, epochs: int = 3,
                  hyperparameters: Mapping[str, Any] | None = None, batch_size: int = 32,
                  learning_rate: float = 0.003, optimizer: str = "adam", alias: str = "",
                  min_test_accuracy: float = 0.0, seed: int = 0) -> tj.TrainingSpec:
    optimizer_spec = message_from_options({"kind": optimizer, "learning_rate": learning_rate},
                                          tj.OptimizerSpec, "optimizer")
    spec = tj.TrainingSpec(architecture=tj.ArchitectureSpec(kind=arch),
                           data=tj.DataSource(dataset=dataset), optimizer=optimizer_spec,
                           epochs=epochs, batch_size=batch_size, seed=seed,
                           output=tj.TrainingOutput(model_id=model, alias=alias,
                                                    min_test_accuracy=min_test_accuracy))
    if hyperparameters:
        spec.architecture.hyperparameters.update(dict(hyperparameters))
    return spec
