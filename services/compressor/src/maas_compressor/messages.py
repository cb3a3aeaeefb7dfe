"""Conversions between `maas.compressor.v1` messages and the compressor's domain values.

Requests are read field by field (after `maas_runtime.messages.validated_request` dropped
output-only fields and checked enum numbers and finite numbers): enum values become the short
names the steps read ("per_layer", "int8", "greedy_soup"), an unset scalar becomes None so
the domain fills its default, and the deprecated `student_kind`/`student_hyperparameters_json`
pair is read when `student` is unset. Responses are built from the accepted spec (defaults
filled in) and the job record (state, times, report).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from maas.common.v1 import architecture_pb2, job_pb2
from maas.compressor.v1 import compression_job_pb2 as cj
from maas_jobs.records import JobRecord
from maas_jobs.servicer import job_message
from maas_runtime.errors import InvalidArgument
from maas_runtime.messages import struct_value_to_python, to_message

from maas_compressor.plan import CompressionPlan
from maas_compressor.spec import SPEC_FIELD, CompressionSpec, StepSpec

COLLECTION = "compressionJobs"

_SCOPES = {cj.PRUNE_SCOPE_GLOBAL: "global", cj.PRUNE_SCOPE_PER_LAYER: "per_layer"}
_DTYPES = {cj.QUANTIZATION_DTYPE_INT8: "int8", cj.QUANTIZATION_DTYPE_INT4: "int4",
           cj.QUANTIZATION_DTYPE_FP16: "fp16", cj.QUANTIZATION_DTYPE_BF16: "bf16"}
_MODES = {cj.QUANTIZATION_MODE_DYNAMIC: "dynamic", cj.QUANTIZATION_MODE_STATIC: "static",
          cj.QUANTIZATION_MODE_AUTO: "auto"}
_METHODS = {cj.FUSION_METHOD_UNIFORM: "uniform", cj.FUSION_METHOD_WEIGHTED: "weighted",
            cj.FUSION_METHOD_GREEDY_SOUP: "greedy_soup"}


def _short(value: int, known: Mapping[Any, str]) -> str:
    # Unset is "" (the domain applies the default or says "is required"); an unknown number
    # was already refused by validated_request.
    return known.get(value, "")


def _enum(name: str, known: Mapping[Any, str]) -> Any:
    return {short: number for number, short in known.items()}[name]


def _student(step: cj.DistillStep, path: str) -> dict[str, Any]:
    if step.HasField("student"):
        return {"kind": step.student.kind,
                "hyperparameters": {key: struct_value_to_python(value) for key, value
                                    in step.student.hyperparameters.fields.items()}}
    hyperparameters: Any = {}
    if step.student_hyperparameters_json:
        try:
            hyperparameters = json.loads(step.student_hyperparameters_json)
        except ValueError as error:
            raise InvalidArgument.for_field(f"{path}.student_hyperparameters_json",
                                            f"is not JSON: {error}") from None
        if not isinstance(hyperparameters, dict):
            raise InvalidArgument.for_field(f"{path}.student_hyperparameters_json",
                                            "must be a JSON object")
    return {"kind": step.student_kind, "hyperparameters": hyperparameters}


def _step_fields(step: cj.CompressionStep, index: int) -> dict[str, Any]:
    kind = step.WhichOneof("step") or ""
    if kind == "prune":
        p = step.prune
        parameters: dict[str, Any] = {
            "amount": p.amount, "structured": p.structured, "scope": _short(p.scope, _SCOPES),
            "finetune_epochs": p.finetune_epochs, "learning_rate": p.learning_rate}
    elif kind == "quantize":
        q = step.quantize
        parameters = {
            "dtype": _short(q.dtype, _DTYPES), "mode": _short(q.mode, _MODES),
            "per_channel": q.per_channel if q.HasField("per_channel") else None,
            "calibration_samples": q.calibration_samples, "accuracy_aware": q.accuracy_aware,
            "tolerance": q.tolerance if q.HasField("tolerance") else None, "format": q.format}
    elif kind == "distill":
        d = step.distill
        parameters = {
            "student_architecture": _student(d, f"{SPEC_FIELD}.steps[{index}].distill"),
            "temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs,
            "learning_rate": d.learning_rate, "batch_size": d.batch_size,
            "teacher_layers": list(d.teacher_layers)}
    elif kind == "fuse":
        f = step.fuse
        parameters = {"model_versions": list(f.model_versions), "weights": list(f.weights),
                      "method": _short(f.method, _METHODS)}
    elif kind == "convert":
        parameters = {"opset": step.convert.opset}
    else:
        parameters = {}
    return {"kind": kind, "parameters": parameters}


def spec_fields(spec: cj.CompressionSpec) -> dict[str, Any]:
    """A request's CompressionSpec as the dict `parse_compression_spec` validates."""
    return {
        "source_model_version": spec.source_model_version,
        "steps": [_step_fields(step, index) for index, step in enumerate(spec.steps)],
        "evaluation_dataset": spec.evaluation_dataset,
        "max_accuracy_drop": (spec.max_accuracy_drop if spec.HasField("max_accuracy_drop")
                              else None),
        "output": {"model_id": spec.output.model_id, "alias": spec.output.alias},
        "resources": {"workers": spec.resources.workers, "priority": spec.resources.priority,
                      "tenant": spec.resources.tenant},
        "seed": spec.seed,
        "min_mean_cosine": spec.min_mean_cosine if spec.HasField("min_mean_cosine") else None,
        "min_similarity_spearman": (spec.min_similarity_spearman
                                    if spec.HasField("min_similarity_spearman") else None),
    }


def _step_message(step: StepSpec) -> cj.CompressionStep:
    p = step.parameters
    if step.kind == "prune":
        return cj.CompressionStep(prune=cj.PruneStep(
            amount=p["amount"], structured=p["structured"], scope=_enum(p["scope"], _SCOPES),
            finetune_epochs=p["finetune_epochs"], learning_rate=p["learning_rate"]))
    if step.kind == "quantize":
        return cj.CompressionStep(quantize=cj.QuantizeStep(
            dtype=_enum(p["dtype"], _DTYPES), mode=_enum(p["mode"], _MODES),
            per_channel=p["per_channel"], calibration_samples=p["calibration_samples"],
            accuracy_aware=p["accuracy_aware"], tolerance=p["tolerance"],
            format=p.get("format", "")))
    if step.kind == "distill" and "layers" in p:  # a sentence encoder's student
        return cj.CompressionStep(distill=cj.DistillStep(
            teacher_layers=p["layers"], epochs=p["epochs"], learning_rate=p.get("learning_rate", 0.0)))
    if step.kind == "distill":
        student = architecture_pb2.ArchitectureSpec(kind=p["student_architecture"]["kind"])
        student.hyperparameters.update(p["student_architecture"]["hyperparameters"])
        return cj.CompressionStep(distill=cj.DistillStep(
            student=student, temperature=p["temperature"], alpha=p["alpha"],
            epochs=p["epochs"], learning_rate=p["learning_rate"], batch_size=p["batch_size"]))
    if step.kind == "fuse":
        return cj.CompressionStep(fuse=cj.FuseStep(
            model_versions=p["model_versions"], weights=p["weights"],
            method=_enum(p["method"], _METHODS)))
    return cj.CompressionStep(convert=cj.ConvertStep(opset=p["opset"]))


def _spec_message(spec: CompressionSpec) -> cj.CompressionSpec:
    """The spec as accepted: every default filled in, tenant resolved."""
    message = cj.CompressionSpec(
        source_model_version=spec.source_model_version,
        steps=[_step_message(step) for step in spec.steps],
        evaluation_dataset=spec.evaluation_dataset,
        output=cj.CompressionOutput(model_id=spec.output.model_id, alias=spec.output.alias),
        resources=job_pb2.JobResources(workers=spec.resources.workers,
                                       priority=spec.resources.priority,
                                       tenant=spec.resources.tenant),
        seed=spec.seed)
    if spec.max_accuracy_drop is not None:
        message.max_accuracy_drop = spec.max_accuracy_drop
    if spec.min_mean_cosine is not None:
        message.min_mean_cosine = spec.min_mean_cosine
    if spec.min_similarity_spearman is not None:
        message.min_similarity_spearman = spec.min_similarity_spearman
    return message


def compression_job_message(job: JobRecord) -> cj.CompressionJob:
    message = job_message(job, COLLECTION, cj.CompressionJob)
    message.spec.CopyFrom(_spec_message(CompressionPlan.from_dict(job.spec).spec))
    message.model_version = job.result.get("model_version", "")
    if "report" in job.result:
        message.report.CopyFrom(to_message(job.result["report"], cj.CompressionReport))
    return message
