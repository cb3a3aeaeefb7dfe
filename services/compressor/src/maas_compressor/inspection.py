"""Checks of a parsed spec against the versions and the dataset it names, before queueing.

They run at Create on the staged (downloaded and verified) files, so a request that cannot
work fails at once with its code and field rather than minutes later as a failed job:

- a source that is neither a maas-package nor ONNX, or a maas-package step (prune, distill,
  fuse, convert) on an ONNX source → FAILED_PRECONDITION naming the field;
- a dataset whose examples do not fill the model's input → FAILED_PRECONDITION on
  `evaluation_dataset`;
- fuse members of another architecture (or signature) than the model → INVALID_ARGUMENT on
  the member;
- a student the zoo cannot build for the model's input, or whose outputs differ from the
  teacher's → INVALID_ARGUMENT / FAILED_PRECONDITION on the student;
- quantizing a graph that is already quantized → FAILED_PRECONDITION on the dtype;
- a sentence encoder (HF_TRANSFORMER) source takes convert, int8 quantize and distill with
  `teacher_layers`, is measured on `builtin:pydoc` (or an empty dataset) and gated by
  `min_mean_cosine` / `min_similarity_spearman`; a classifier takes none of these
  (`check_encoder_plan`). An encoder's quantize is dynamic and accuracy-aware on cosine in
  either format; `format: "torch"` (`maas_text.int8`) needs the safetensors encoder and is
  per-channel only. An int8 encoder is a result: no step starts from it;
- `format: "torch"` on a zoo model is torchao weight-only, never accuracy-aware, and needs a
  maas-package source (FAILED_PRECONDITION on the format for an ONNX one).

These read manifests and graphs and build tiny torch modules: call them off the event loop.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas_formats.manifest import ModelSignature
from maas_runtime.contract_enums import (
    MODEL_FORMAT_HF_TRANSFORMER,
    MODEL_FORMAT_MAAS_PACKAGE,
    MODEL_FORMAT_ONNX,
)
from maas_runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument
from maas_text.int8 import QUANTIZATION_FILE

from maas_compressor.data import check_dataset_fits, signature_from_registry
from maas_compressor.plan import CompressionPlan, InputVersion
from maas_compressor.spec import PYDOC, TORCH_STEPS, field_path

COMPRESSIBLE_FORMATS = (MODEL_FORMAT_MAAS_PACKAGE, MODEL_FORMAT_ONNX, MODEL_FORMAT_HF_TRANSFORMER)
ENCODER_STEPS = frozenset({"convert", "quantize", "distill"})
ARCHITECTURE_CHANGING_STEPS = frozenset({"distill"})


@dataclass(frozen=True)
class InspectedModel:
    """What the checks need to know of a staged version."""

    signature: ModelSignature
    architecture: dict[str, Any] | None
    """Zoo spec of a maas-package (hyperparameters resolved); None for ONNX."""


def check_format(version: InputVersion, where: str) -> None:
    if version.format not in COMPRESSIBLE_FORMATS:
        description = (f"{version.name} is {version.format or 'of no format'}; the compressor "
                       f"reads {', '.join(COMPRESSIBLE_FORMATS)}")
        raise FailedPrecondition(f"{where}: {description}", reason="FORMAT_NOT_COMPRESSIBLE",
                                 field_violations=[FieldViolation(where, description)])


def inspect(version: InputVersion, path: Path, where: str) -> InspectedModel:
    """Signature and architecture of a staged version (no weights loaded)."""
    if version.is_onnx:
        signature = signature_from_registry(version.signature)
        if not signature.inputs or not signature.outputs:
            description = f"{version.name} is ONNX without a signature"
            raise FailedPrecondition(f"{where}: {description}", reason="SIGNATURE_MISSING",
                                     field_violations=[FieldViolation(where, description)])
        return InspectedModel(signature, None)
    from maas_formats import validate_model_package
    from maas_zoo import resolve_hyperparameters

    info = validate_model_package(path)
    kind = info.manifest.architecture.kind
    return InspectedModel(info.signature, {
        "kind": kind,
        "hyperparameters": resolve_hyperparameters(kind, info.manifest.architecture.hyperparameters)})


def _step_field(index: int, kind: str, relative: str = "") -> str:
    return field_path(f"steps[{index}].{kind}" + (f".{relative}" if relative else ""))


def check_student(student: dict[str, Any], signature: ModelSignature, where: str) -> None:
    """The zoo builds the student for the teacher's input, and its logits have the teacher's
    shape (a student that cannot learn the teacher's outputs is refused)."""
    import torch
    from maas_zoo import build_model

    input_shape = list(signature.inputs[0].shape)
    teacher_shape = list(signature.outputs[0].shape)
    try:
        module = build_model(student["kind"], student["hyperparameters"], input_shape,
                             teacher_shape[-1])
        with torch.inference_mode():
            student_shape = list(module.eval()(torch.zeros(1, *input_shape)).shape[1:])
    except InvalidArgument as error:
        raise InvalidArgument(
            f"{where}: {error.message}", reason="STUDENT_UNBUILDABLE",
            field_violations=[FieldViolation(where, f"{student['kind']} cannot read the "
                                             f"teacher's input {input_shape}: {v.description}")
                              for v in error.field_violations]) from None
    except RuntimeError as error:
        description = f"{student['kind']} cannot read the teacher's input {input_shape}: {error}"
        raise InvalidArgument(f"{where}: {description}", reason="STUDENT_UNBUILDABLE",
                              field_violations=[FieldViolation(where, description)]) from None
    if student_shape != teacher_shape:
        description = (f"the student's outputs have shape {student_shape}, the teacher's "
                       f"{teacher_shape}: it cannot learn the teacher's logits")
        raise FailedPrecondition(f"{where}: {description}", reason="STUDENT_OUTPUT_MISMATCH",
                                 field_violations=[FieldViolation(where, description)])


def _already_quantized(path: Path) -> str | None:
    import onnx

    from maas_compressor.steps.quantize import quantization_already_applied

    return quantization_already_applied(onnx.load(str(path), load_external_data=False))


def _refuse(where: str, description: str, reason: str, *, invalid: bool = True) -> None:
    error = InvalidArgument if invalid else FailedPrecondition
    raise error(f"{where}: {description}", reason=reason,
                field_violations=[FieldViolation(where, description)])


def check_encoder_plan(plan: CompressionPlan, workdir: Path) -> None:
    """An encoder source's steps, dataset and gates (the archive is checked as it unzips:
    no pickle, no escaping paths)."""
    from maas_formats.opaque import validate_hf_transformer

    spec = plan.spec
    name = plan.source.name
    if plan.dataset.source != PYDOC:
        _refuse(field_path("evaluation_dataset"),
                f"{name} is a sentence encoder, measured on the fixed held-out sentences of "
                f"{PYDOC}: leave evaluation_dataset empty or set {PYDOC!r}, not "
                f"{spec.evaluation_dataset!r}", "DATASET_NOT_FOR_ENCODERS")
    if spec.max_accuracy_drop is not None:
        _refuse(field_path("max_accuracy_drop"),
                f"{name} is a sentence encoder without accuracy: gate it with min_mean_cosine "
                "or min_similarity_spearman", "GATE_NOT_FOR_ENCODERS")
    for index, step in enumerate(spec.steps):
        where = field_path(f"steps[{index}]")
        if step.kind not in ENCODER_STEPS:
            _refuse(where, f"{step.kind} does not apply to the sentence encoder {name}; "
                    f"encoders take {', '.join(sorted(ENCODER_STEPS))}",
                    "STEP_NOT_FOR_ENCODERS", invalid=False)
        if step.kind == "quantize":
            _check_encoder_quantize(index, step.parameters)
        if step.kind == "distill" and "layers" not in step.parameters:
            _refuse(_step_field(index, "distill", "teacher_layers"),
                    f"a student of the sentence encoder {name} keeps some of its layers: set "
                    "teacher_layers (and leave student unset)", "STUDENT_NOT_FOR_ENCODERS")
    archive = validate_hf_transformer(workdir / plan.source.filename,
                                      field_path=field_path("source_model_version"))
    layers = int(archive.config.get("num_hidden_layers") or 0)
    weights_format = "safetensors" if archive.weights else "onnx"
    if _holds_int8_manifest(workdir / plan.source.filename, archive.root):
        _refuse(field_path("steps[0]"),
                f"{name} is an int8 encoder ({QUANTIZATION_FILE}), a compression result: "
                "compress the float encoder it came from", "ALREADY_QUANTIZED", invalid=False)
    for index, step in enumerate(spec.steps):
        if step.kind == "quantize" and step.parameters.get("format") == "torch" and (
                weights_format != "safetensors"):
            _refuse(_step_field(index, "quantize", "format"),
                    f"\"torch\" quantizes the torch (safetensors) encoder and {name} is "
                    f"{weights_format}: use format \"onnx\"", "STEP_NEEDS_TORCH_MODEL",
                    invalid=False)
        if step.kind == "distill" and max(step.parameters["layers"]) >= layers:
            _refuse(_step_field(index, "distill", "teacher_layers"),
                    f"{name} has {layers} encoder layers (0..{layers - 1}), got "
                    f"{step.parameters['layers']}", "STUDENT_UNBUILDABLE")
        if step.kind in TORCH_STEPS | {"convert"} and weights_format != "safetensors":
            _refuse(field_path(f"steps[{index}]"),
                    f"{step.kind} works on the torch (safetensors) encoder and {name} is "
                    f"{weights_format}", "STEP_NEEDS_TORCH_MODEL", invalid=False)


def _check_encoder_quantize(index: int, parameters: dict[str, Any]) -> None:
    """An encoder's quantize: int8, dynamic; the torch format per channel only."""
    if parameters["dtype"] != "int8":
        _refuse(_step_field(index, "quantize", "dtype"),
                f"sentence encoders are quantized to int8, not {parameters['dtype']}",
                "DTYPE_NOT_FOR_ENCODERS")
    if parameters["mode"] == "static":
        _refuse(_step_field(index, "quantize", "mode"),
                "sentence encoders are quantized dynamically (activations per call): leave "
                "mode unset or set dynamic", "MODE_NOT_FOR_ENCODERS")
    if parameters.get("format") == "torch" and not parameters["per_channel"]:
        _refuse(_step_field(index, "quantize", "per_channel"),
                "the torch int8 encoder keeps one scale per output channel: leave per_channel "
                "unset or true", "PER_TENSOR_NOT_FOR_TORCH_ENCODERS")


def _holds_int8_manifest(archive: Path, root: str) -> bool:
    with zipfile.ZipFile(archive) as opened:
        return f"{root}{QUANTIZATION_FILE}" in opened.namelist()


def check_plan(plan: CompressionPlan, workdir: Path) -> None:
    """Every check above, on the files staged in `workdir`."""
    if plan.source.is_encoder:
        check_encoder_plan(plan, workdir)
        return
    for gate, value in plan.spec.encoder_gates.items():
        _refuse(field_path(gate), f"{plan.source.name} is a classifier: {gate} ({value}) "
                "gates sentence encoders; use max_accuracy_drop", "GATE_NOT_FOR_CLASSIFIERS")
    for index, step in enumerate(plan.spec.steps):
        if step.kind == "distill" and "layers" in step.parameters:
            _refuse(_step_field(index, "distill", "teacher_layers"),
                    "picks a sentence encoder's student; a classifier's student is a zoo "
                    "architecture (set student)", "STUDENT_NOT_FOR_CLASSIFIERS")
        if step.kind == "quantize" and step.parameters.get("format") == "auto":
            _refuse(_step_field(index, "quantize", "format"),
                    f"\"auto\" picks the faster of a sentence encoder's int8 formats; the "
                    f"classifier {plan.source.name} is quantized in format \"onnx\" or \"torch\"",
                    "AUTO_FORMAT_FOR_ENCODERS")
        if (step.kind == "quantize" and step.parameters.get("format") == "torch"
                and step.parameters["accuracy_aware"]):
            _refuse(_step_field(index, "quantize", "accuracy_aware"),
                    f"format \"torch\" quantizes the classifier {plan.source.name} with "
                    "torchao weight-only, all Linear layers at once: leave accuracy_aware "
                    "unset or use format \"onnx\"", "ACCURACY_AWARE_NOT_FOR_TORCH")
    if plan.dataset.source == PYDOC:
        dataset_field = field_path("evaluation_dataset")
        if not plan.spec.evaluation_dataset:
            _refuse(dataset_field, "is required", "DATASET_REQUIRED")
        _refuse(dataset_field, f"{PYDOC} measures sentence encoders; {plan.source.name} is "
                "a classifier", "DATASET_DOES_NOT_FIT", invalid=False)
    source_field = field_path("source_model_version")
    source = inspect(plan.source, workdir / plan.source.filename, source_field)
    check_dataset_fits(plan.dataset, source.signature)
    onnx_since: int | None = None if source.architecture is not None else -1
    architecture_changed = False
    for index, step in enumerate(plan.spec.steps):
        if step.kind in (*TORCH_STEPS, "convert") and onnx_since == -1:
            description = (f"{step.kind} works on a maas-package (zoo architecture) and the "
                           f"source {plan.source.name} is ONNX")
            where = field_path(f"steps[{index}]")
            raise FailedPrecondition(f"{where}: {description}", reason="STEP_NEEDS_TORCH_MODEL",
                                     field_violations=[FieldViolation(where, description)])
        if step.kind == "quantize" and onnx_since == -1 and step.parameters.get("format") == "torch":
            _refuse(_step_field(index, "quantize", "format"),
                    f"\"torch\" quantizes a maas-package (zoo architecture) and the source "
                    f"{plan.source.name} is ONNX: use format \"onnx\"", "STEP_NEEDS_TORCH_MODEL",
                    invalid=False)
        if step.kind == "quantize" and onnx_since == -1:
            reason = _already_quantized(workdir / plan.source.filename)
            if reason:
                where = _step_field(index, "quantize", "dtype")
                description = f"{plan.source.name} is already quantized ({reason})"
                raise FailedPrecondition(f"{where}: {description}", reason="ALREADY_QUANTIZED",
                                         field_violations=[FieldViolation(where, description)])
        if step.kind == "distill":
            check_student(step.parameters["student_architecture"], source.signature,
                          _step_field(index, "distill", "student"))
        if step.kind == "fuse" and not architecture_changed:
            for position, name in enumerate(step.parameters["model_versions"]):
                member = plan.member(name)
                where = _step_field(index, "fuse", f"model_versions[{position}]")
                inspected = inspect(member, workdir / member.filename, where)
                if (inspected.architecture != source.architecture
                        or inspected.signature != source.signature):
                    description = (
                        f"{member.name} is {_describe(inspected)} but the model is "
                        f"{_describe(source)}: only versions of one architecture can be "
                        "averaged")
                    raise InvalidArgument(f"{where}: {description}",
                                          reason="ARCHITECTURE_MISMATCH",
                                          field_violations=[FieldViolation(where, description)])
        if step.kind in ARCHITECTURE_CHANGING_STEPS or (
                step.kind == "prune" and step.parameters["structured"]):
            architecture_changed = True
        if step.kind in ("convert", "quantize") and onnx_since is None:
            onnx_since = index


def _describe(model: InspectedModel) -> str:
    if model.architecture is None:
        return "an ONNX graph"
    return f"a {model.architecture['kind']} {model.architecture['hyperparameters']}"

