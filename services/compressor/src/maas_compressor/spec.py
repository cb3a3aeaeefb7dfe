"""The compression specification: validated, every default filled in, JSON round-trippable.

`parse_compression_spec` checks what a request can get wrong on its own (no steps, a prune
amount outside (0, 1), a negative gate, an unknown student kind, a torch-only step after the
model became ONNX...) and reports every violation at once, each naming its field from the
request's root (`compression_job.spec.steps[0].prune.amount`). Checks that need the source
version, the fuse members or the dataset live in `maas_compressor.inspection`.

Each step is held as its kind and the parameter dict its step function reads (the keys of
`maas_compressor.steps`), defaults filled in, so the job table, the job process and the
lineage of the registered version all see exactly the settings the job was accepted with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from maas_runtime.errors import InvalidArgument, ViolationCollector
from maas_runtime.names import validate_alias, validate_id
from maas_zoo.architectures import get_architecture, resolve_hyperparameters

SPEC_FIELD = "compression_job.spec"
DIGITS = "builtin:digits"
PYDOC = "builtin:pydoc"
"""The sentence encoders' fixed evaluation set (held-out `pydoc_data.topics` sentences)."""
BUILTIN_EVALUATION_DATASETS = (DIGITS, PYDOC)
DATASET_VERSION_PREFIX = "datasets/"

STEP_KINDS = ("prune", "quantize", "distill", "fuse", "convert")
TORCH_STEPS = frozenset({"prune", "distill", "fuse"})
"""Steps that work on the torch form: before any convert or quantize step."""
PRUNE_SCOPES = ("global", "per_layer")
QUANTIZE_DTYPES = ("int8", "int4", "fp16", "bf16")
QUANTIZE_MODES = ("dynamic", "static", "auto")
QUANTIZE_FORMATS = ("onnx", "torch", "auto")
"""onnx: the graph is quantized (the model is ONNX from then on); torch: int8 weights kept in
torch (a zoo model: torchao weight-only; a sentence encoder: `maas_text.int8`, accuracy-aware);
auto (sentence encoders only, their default): the faster of the two on the compressing machine."""
FUSE_METHODS = ("uniform", "weighted", "greedy_soup")

DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_CALIBRATION_SAMPLES = 256
DEFAULT_TOLERANCE = 0.005
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.7
DEFAULT_DISTILL_BATCH_SIZE = 64
DEFAULT_OPSET = 18
MIN_OPSET = 18
MAX_EPOCHS = 1_000
MAX_STEPS = 32


def field_path(relative: str) -> str:
    """`steps[0].prune.amount` → `compression_job.spec.steps[0].prune.amount`."""
    return f"{SPEC_FIELD}.{relative}"


@dataclass(frozen=True)
class StepSpec:
    """One step: its kind and the parameters its step function reads."""

    kind: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class OutputSpec:
    model_id: str
    alias: str = ""


@dataclass(frozen=True)
class ResourceSpec:
    tenant: str
    priority: int = 0
    workers: int = 1


@dataclass(frozen=True)
class CompressionSpec:
    """A validated compression request."""

    source_model_version: str
    """As the caller named it: a version or an alias (resolved once, at Create)."""
    steps: list[StepSpec]
    evaluation_dataset: str
    output: OutputSpec
    resources: ResourceSpec
    max_accuracy_drop: float | None = None
    """Points (0-100); None: no gate."""
    seed: int = 0
    fuse_members: list[str] = field(default_factory=list)
    """Every fuse step's model_versions in order, as the caller named them."""
    min_mean_cosine: float | None = None
    """Encoders: the lowest mean cosine to the source's embeddings accepted; None: no gate."""
    min_similarity_spearman: float | None = None
    """Encoders: the lowest Spearman of pairwise similarities accepted; None: no gate."""

    @property
    def encoder_gates(self) -> dict[str, float]:
        """The encoder gates that are set, by name."""
        gates = {"min_mean_cosine": self.min_mean_cosine,
                 "min_similarity_spearman": self.min_similarity_spearman}
        return {name: value for name, value in gates.items() if value is not None}

    @property
    def dataset_version(self) -> str | None:
        """The dataset version's resource name when the data comes from the registry."""
        return (self.evaluation_dataset
                if self.evaluation_dataset.startswith(DATASET_VERSION_PREFIX) else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> CompressionSpec:
        return cls(
            source_model_version=document["source_model_version"],
            steps=[StepSpec(step["kind"], dict(step["parameters"])) for step in document["steps"]],
            evaluation_dataset=document["evaluation_dataset"],
            output=OutputSpec(**document["output"]),
            resources=ResourceSpec(**document["resources"]),
            max_accuracy_drop=document.get("max_accuracy_drop"),
            seed=int(document.get("seed", 0)),
            fuse_members=list(document.get("fuse_members", [])),
            min_mean_cosine=document.get("min_mean_cosine"),
            min_similarity_spearman=document.get("min_similarity_spearman"))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _or_default(value: Any, default: Any) -> Any:
    """Proto3 scalars cannot say "unset": None and 0 mean the default."""
    return default if value is None or value == 0 else value


class _StepParser:
    """Validates one step's fields; `prefix` is its path, e.g. `steps[2].quantize`."""

    def __init__(self, prefix: str, violations: ViolationCollector):
        self.prefix = prefix
        self.violations = violations

    def check(self, condition: bool, name: str, description: str) -> None:
        self.violations.check(condition, field_path(f"{self.prefix}.{name}"), description)

    def prune(self, fields: dict[str, Any]) -> dict[str, Any]:
        amount = fields.get("amount")
        self.check(_finite(amount) and 0 < float(amount or 0) < 1, "amount",
                   f"must be a fraction strictly between 0 and 1, got {amount}")
        scope = fields.get("scope") or "global"
        self.check(scope in PRUNE_SCOPES, "scope", f"must be one of {list(PRUNE_SCOPES)}")
        epochs = int(fields.get("finetune_epochs") or 0)
        self.check(0 <= epochs <= MAX_EPOCHS, "finetune_epochs",
                   f"must be between 0 and {MAX_EPOCHS}, got {epochs}")
        rate = _or_default(fields.get("learning_rate"), DEFAULT_LEARNING_RATE)
        self.check(_finite(rate) and rate > 0, "learning_rate", f"must be > 0, got {rate}")
        return {"amount": amount, "structured": bool(fields.get("structured")), "scope": scope,
                "finetune_epochs": epochs, "learning_rate": rate}

    def quantize(self, fields: dict[str, Any]) -> dict[str, Any]:
        dtype = fields.get("dtype") or ""
        self.check(dtype in QUANTIZE_DTYPES, "dtype",
                   "is required" if not dtype else f"must be one of {list(QUANTIZE_DTYPES)}")
        mode = fields.get("mode") or "auto"
        self.check(mode in QUANTIZE_MODES, "mode", f"must be one of {list(QUANTIZE_MODES)}")
        self.check(mode in ("auto", "dynamic", "static") and not (
            mode == "static" and dtype not in ("int8", "")), "mode",
            f"static quantization calibrates int8 activations; {dtype} has none")
        samples = int(_or_default(fields.get("calibration_samples"), DEFAULT_CALIBRATION_SAMPLES))
        self.check(samples > 0, "calibration_samples", f"must be > 0, got {samples}")
        tolerance = fields.get("tolerance")
        tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
        self.check(_finite(tolerance) and 0 <= tolerance <= 1, "tolerance",
                   f"must be a fraction between 0 and 1, got {tolerance}")
        per_channel = fields.get("per_channel")
        parameters = {"dtype": dtype, "mode": mode,
                      "per_channel": True if per_channel is None else bool(per_channel),
                      "calibration_samples": samples,
                      "accuracy_aware": bool(fields.get("accuracy_aware")), "tolerance": tolerance}
        artifact_format = fields.get("format") or "onnx"
        self.check(artifact_format in QUANTIZE_FORMATS, "format",
                   f"must be one of {list(QUANTIZE_FORMATS)}, got {artifact_format!r}")
        if artifact_format == "torch":  # absent otherwise: ONNX specs read exactly as before
            # accuracy_aware is judged once the source is known (`maas_compressor.inspection`):
            # an encoder's torch int8 always searches on cosine, a zoo model's never does.
            self.check(dtype in ("int8", ""), "dtype",
                       f"format \"torch\" quantizes to int8, not {dtype}")
            parameters["format"] = artifact_format
        elif fields.get("format"):  # an explicit "onnx" is kept: an encoder's default is auto
            parameters["format"] = artifact_format
        return parameters

    def distill(self, fields: dict[str, Any]) -> dict[str, Any]:
        teacher_layers = list(fields.get("teacher_layers") or [])
        student = fields.get("student_architecture") or {}
        if teacher_layers:
            return self.distill_encoder(fields, teacher_layers, student)
        kind = student.get("kind") or ""
        hyperparameters = student.get("hyperparameters") or {}
        if not kind:
            self.violations.add(field_path(f"{self.prefix}.student.kind"), "is required")
        else:
            try:
                get_architecture(kind)
                resolve_hyperparameters(kind, hyperparameters)
            except InvalidArgument as error:
                for violation in error.field_violations:
                    # The zoo names `architecture.…`; here it is the step's student.
                    relative = violation.field.removeprefix("architecture")
                    self.violations.add(field_path(f"{self.prefix}.student{relative}"),
                                        violation.description)
        temperature = _or_default(fields.get("temperature"), DEFAULT_TEMPERATURE)
        self.check(_finite(temperature) and temperature > 0, "temperature",
                   f"must be > 0, got {temperature}")
        alpha = _or_default(fields.get("alpha"), DEFAULT_ALPHA)
        self.check(_finite(alpha) and 0 <= alpha <= 1, "alpha",
                   f"must be in [0, 1], got {alpha}")
        epochs = int(fields.get("epochs") or 0)
        self.check(1 <= epochs <= MAX_EPOCHS, "epochs",
                   f"must be between 1 and {MAX_EPOCHS}, got {epochs}")
        rate = _or_default(fields.get("learning_rate"), DEFAULT_LEARNING_RATE)
        self.check(_finite(rate) and rate > 0, "learning_rate", f"must be > 0, got {rate}")
        batch_size = int(_or_default(fields.get("batch_size"), DEFAULT_DISTILL_BATCH_SIZE))
        self.check(batch_size >= 1, "batch_size", f"must be at least 1, got {batch_size}")
        return {"student_architecture": {"kind": kind, "hyperparameters": hyperparameters},
                "temperature": temperature, "alpha": alpha, "epochs": epochs,
                "learning_rate": rate, "batch_size": batch_size}

    def distill_encoder(self, fields: dict[str, Any], layers: list[Any],
                        student: dict[str, Any]) -> dict[str, Any]:
        """A sentence encoder's student: the teacher's layers it keeps (see transformer.py)."""
        self.check(not student.get("kind"), "student",
                   "must be unset when teacher_layers picks an encoder's student")
        self.check(all(isinstance(i, int) and i >= 0 for i in layers)
                   and len(set(layers)) == len(layers), "teacher_layers",
                   f"must be distinct layer indices from 0, got {layers}")
        epochs = int(fields.get("epochs") or 0)
        self.check(1 <= epochs <= MAX_EPOCHS, "epochs",
                   f"must be between 1 and {MAX_EPOCHS}, got {epochs}")
        parameters: dict[str, Any] = {"layers": sorted(layers), "epochs": epochs}
        rate = fields.get("learning_rate")
        if rate:  # unset: the encoder recipe's own rate, not the zoo students' 1e-3
            self.check(_finite(rate) and rate > 0, "learning_rate", f"must be > 0, got {rate}")
            parameters["learning_rate"] = rate
        return parameters

    def fuse(self, fields: dict[str, Any]) -> dict[str, Any]:
        versions = list(fields.get("model_versions") or [])
        self.check(bool(versions), "model_versions",
                   "needs at least one other version to average with")
        for index, name in enumerate(versions):
            self.check(isinstance(name, str) and name.startswith("models/"),
                       f"model_versions[{index}]",
                       f"must be \"models/{{m}}/versions/{{v}}\" or \"models/{{m}}@{{alias}}\", "
                       f"got {name!r}")
        weights = list(fields.get("weights") or [])
        method = fields.get("method") or ("weighted" if weights else "uniform")
        self.check(method in FUSE_METHODS, "method", f"must be one of {list(FUSE_METHODS)}")
        if weights:
            self.check(method == "weighted", "weights",
                       f"are only for the weighted method, not {method}")
            self.check(len(weights) == len(versions) + 1, "weights",
                       f"needs one weight per member, the model under compression first: "
                       f"{len(versions) + 1}, got {len(weights)}")
            self.check(all(_finite(w) and w >= 0 for w in weights), "weights",
                       "must be finite and not negative")
            self.check(any(w > 0 for w in weights if _finite(w)), "weights",
                       "must not all be 0")
        elif method == "weighted":
            self.violations.add(field_path(f"{self.prefix}.weights"),
                                "are required by the weighted method")
        return {"model_versions": versions, "weights": weights, "method": method}

    def convert(self, fields: dict[str, Any]) -> dict[str, Any]:
        opset = int(_or_default(fields.get("opset"), DEFAULT_OPSET))
        self.check(opset >= MIN_OPSET, "opset", f"must be at least {MIN_OPSET}, got {opset}")
        return {"opset": opset}


def parse_compression_spec(fields: dict[str, Any], *, default_tenant: str) -> CompressionSpec:
    """Validate a request's spec (as `maas_compressor.messages.spec_fields` reads it)."""
    violations = ViolationCollector()
    source = fields.get("source_model_version") or ""
    violations.check(bool(source), field_path("source_model_version"), "is required")
    violations.check(not source or (source.startswith("models/") and (
        "@" in source or "/versions/" in source)), field_path("source_model_version"),
        f"must be \"models/{{m}}/versions/{{v}}\" or \"models/{{m}}@{{alias}}\", got {source!r}")

    raw_steps = list(fields.get("steps") or [])
    violations.check(bool(raw_steps), field_path("steps"), "needs at least one step")
    violations.check(len(raw_steps) <= MAX_STEPS, field_path("steps"),
                     f"at most {MAX_STEPS} steps, got {len(raw_steps)}")
    steps: list[StepSpec] = []
    onnx_from: int | None = None
    for index, raw in enumerate(raw_steps):
        kind = raw.get("kind") or ""
        if kind not in STEP_KINDS:
            violations.add(field_path(f"steps[{index}]"),
                           f"must set one of {list(STEP_KINDS)}")
            continue
        parser = _StepParser(f"steps[{index}].{kind}", violations)
        steps.append(StepSpec(kind, getattr(parser, kind)(raw.get("parameters") or {})))
        if kind in TORCH_STEPS and onnx_from is not None:
            violations.add(field_path(f"steps[{index}]"),
                           f"{kind} works on the torch model, but steps[{onnx_from}] made it "
                           "ONNX: put it before the convert and quantize steps")
        torch_quantize = kind == "quantize" and steps[-1].parameters.get("format") == "torch"
        violations.check(not torch_quantize or index == len(raw_steps) - 1,
                         field_path(f"steps[{index}].quantize.format"),
                         "a \"torch\" quantize leaves int8 torch weights that no later step "
                         "takes: make it the last step")
        violations.check(not torch_quantize or onnx_from is None,
                         field_path(f"steps[{index}].quantize.format"),
                         f"\"torch\" quantizes the torch model, but steps[{onnx_from}] made it "
                         "ONNX: drop the convert step or use format \"onnx\"")
        if kind in ("convert", "quantize") and onnx_from is None and not torch_quantize:
            onnx_from = index
        if kind == "convert" and onnx_from is not None and onnx_from != index:
            violations.add(field_path(f"steps[{index}]"),
                           f"the model is ONNX since steps[{onnx_from}]: nothing to convert")

    # Empty is judged once the source is known: an encoder's default, a classifier's error.
    dataset = fields.get("evaluation_dataset") or ""
    violations.check(not dataset or dataset in BUILTIN_EVALUATION_DATASETS or (
        dataset.startswith(DATASET_VERSION_PREFIX) and "/versions/" in dataset),
        field_path("evaluation_dataset"),
        f"must be one of {list(BUILTIN_EVALUATION_DATASETS)} or "
        f"\"datasets/{{dataset}}/versions/{{version}}\", got {dataset!r}")

    gate = fields.get("max_accuracy_drop")
    violations.check(gate is None or (_finite(gate) and 0 <= gate <= 100),
                     field_path("max_accuracy_drop"),
                     f"must be between 0 and 100 points, got {gate}")

    cosine = fields.get("min_mean_cosine")
    violations.check(cosine is None or (_finite(cosine) and 0 < cosine <= 1),
                     field_path("min_mean_cosine"), f"must be in (0, 1], got {cosine}")
    spearman = fields.get("min_similarity_spearman")
    violations.check(spearman is None or (_finite(spearman) and -1 <= spearman <= 1),
                     field_path("min_similarity_spearman"), f"must be in [-1, 1], got {spearman}")

    output = fields.get("output") or {}
    model_id = output.get("model_id") or ""
    alias = output.get("alias") or ""
    if not model_id:
        violations.add(field_path("output.model_id"), "is required")
    else:
        _collect(violations, lambda: validate_id(model_id, field_path("output.model_id")))
    if alias:
        _collect(violations, lambda: validate_alias(alias, field_path("output.alias")))

    resources = fields.get("resources") or {}
    workers = int(resources.get("workers") or 1)
    violations.check(workers == 1, field_path("resources.workers"),
                     f"a compression job runs in one worker slot, got {workers}")
    tenant = resources.get("tenant") or default_tenant
    if resources.get("tenant"):
        _collect(violations, lambda: validate_id(tenant, field_path("resources.tenant")))
    violations.raise_if_any("the compression job is invalid")

    members = [name for step in steps if step.kind == "fuse"
               for name in step.parameters["model_versions"]]
    return CompressionSpec(
        source_model_version=source, steps=steps, evaluation_dataset=dataset,
        output=OutputSpec(model_id, alias),
        resources=ResourceSpec(tenant=tenant, priority=int(resources.get("priority") or 0),
                               workers=1),
        max_accuracy_drop=None if gate is None else float(gate),
        seed=int(fields.get("seed") or 0), fuse_members=members,
        min_mean_cosine=None if cosine is None else float(cosine),
        min_similarity_spearman=None if spearman is None else float(spearman))


def _collect(violations: ViolationCollector, check) -> None:
    try:
        check()
    except InvalidArgument as error:
        for violation in error.field_violations:
            violations.add(violation.field, violation.description)
