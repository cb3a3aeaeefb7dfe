"""Writes Triton model directories: `config.pbtxt`, the Python-backend runtime and the artifact.

One Triton model serves one model artifact, laid out as Triton's Python backend expects:

    <repository>/<triton model name>/config.pbtxt
    <repository>/<triton model name>/1/model.py            (this package's runtime_model.py)
    <repository>/<triton model name>/1/model.safetensors   (model.pt for TorchScript,
                                                            model.onnx for ONNX)

or, for an ONNX graph on a Triton that has its own onnxruntime backend
(`ServingRuntime.ONNXRUNTIME_BACKEND`), as that backend expects: `platform:
"onnxruntime_onnx"` in the config and `1/model.onnx`, without `model.py`.

`config.pbtxt` is built as a `ModelConfig` message from the model's signature and rendered
with protobuf's text format, so it is always syntactically valid. The artifact is referred to
by a path relative to the version directory, so a remote Triton that mounts the shared
repository elsewhere still finds it. A directory is assembled beside its final place and
renamed in, so Triton never loads a half-written model.
"""

from __future__ import annotations

import enum
import importlib.resources
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from google.protobuf import text_format
from maas_runtime.errors import InvalidArgument, NotFound, ViolationCollector
from tritonclient.grpc import model_config_pb2

MODEL_VERSION = "1"
CONFIG_FILE = "config.pbtxt"
RUNTIME_FILE = "model.py"
RUNTIME_SOURCE = "runtime_model.py"
MAX_MODEL_NAME_LENGTH = 128
MAX_BATCH_SIZE_LIMIT = 1 << 16
MAX_INSTANCE_COUNT = 64
# Letters, digits, '_', '-' and inner dots: no separators, no leading dot (hidden/staging
# directories), and '..' is refused separately, so a name can never leave the repository.
_MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"

# Triton parameters the runtime reads (runtime_model.py spells the same keys).
ARTIFACT_PATH_PARAMETER = "maas.artifact_path"
ARTIFACT_FORMAT_PARAMETER = "maas.artifact_format"
TORCH_THREADS_PARAMETER = "maas.torch_threads"
# Read by generation_model.py (the decoupled runtime of GGUF / causal-LM models).
MAX_RUNNING_PARAMETER = "maas.max_running_streams"
MAX_WAITING_PARAMETER = "maas.max_waiting_streams"
GENERATION_RUNTIME_SOURCE = "generation_model.py"

# KServe-v2 datatype names → Triton's config enum; only BYTES is spelled differently.
KSERVE_TO_TRITON_DATATYPE = {
    "BOOL": model_config_pb2.TYPE_BOOL,
    "UINT8": model_config_pb2.TYPE_UINT8,
    "UINT16": model_config_pb2.TYPE_UINT16,
    "UINT32": model_config_pb2.TYPE_UINT32,
    "UINT64": model_config_pb2.TYPE_UINT64,
    "INT8": model_config_pb2.TYPE_INT8,
    "INT16": model_config_pb2.TYPE_INT16,
    "INT32": model_config_pb2.TYPE_INT32,
    "INT64": model_config_pb2.TYPE_INT64,
    "FP16": model_config_pb2.TYPE_FP16,
    "FP32": model_config_pb2.TYPE_FP32,
    "FP64": model_config_pb2.TYPE_FP64,
    "BF16": model_config_pb2.TYPE_BF16,
    "BYTES": model_config_pb2.TYPE_STRING,
}


class ArtifactFormat(enum.StrEnum):
    """Artifact formats the Python-backend runtime can serve."""

    MAAS_PACKAGE = "maas-package"
    """safetensors weights whose header holds the manifest (architecture, signature...)."""

    TORCHSCRIPT = "torchscript"
    """An opaque TorchScript archive, loaded with torch.jit.load (never unpickled)."""

    ONNX = "onnx"
    """An ONNX graph, run by onnxruntime (in the Python backend or Triton's own backend)."""

    HF_TRANSFORMER = "hf-transformer"
    """A zipped Hugging Face directory (config, safetensors or model.onnx, tokenizer): text in,
    tokenized and embedded by maas_text inside the Python backend."""

    GGUF = "gguf"
    """A GGUF file: converted to a bf16 causal-LM directory when the model loads (slow), then
    served as a token stream by the decoupled generation runtime."""

    CAUSAL_LM = "causal-lm"
    """A zipped Hugging Face causal-LM directory (safetensors): the decoupled generation
    runtime (maas_llm's continuous-batching engine) streams its tokens."""

    @property
    def generative(self) -> bool:
        """Served by the decoupled generation runtime (generation_model.py)."""
        return self in GENERATIVE_FORMATS

    @property
    def artifact_file_name(self) -> str:
        """The artifact's file name inside the model's version directory."""
        return ARTIFACT_FILE_NAMES[self]


ARTIFACT_FILE_NAMES = {
    ArtifactFormat.MAAS_PACKAGE: "model.safetensors",
    ArtifactFormat.TORCHSCRIPT: "model.pt",
    ArtifactFormat.ONNX: "model.onnx",
    ArtifactFormat.HF_TRANSFORMER: "model.zip",
    ArtifactFormat.GGUF: "model.gguf",
    ArtifactFormat.CAUSAL_LM: "model.zip",
}
GENERATIVE_FORMATS = frozenset({ArtifactFormat.GGUF, ArtifactFormat.CAUSAL_LM})


@dataclass(frozen=True)
class GenerationTensor:
    """One tensor of the generation model's fixed I/O contract (BYTES, one element)."""

    name: str
    optional: bool = False


# The decoupled generation model's contract with the gateway and KServe-v2 stream clients
# (see generation_model.py): the version's signature is not consulted for these formats.
GENERATION_INPUTS = (GenerationTensor("text_input"), GenerationTensor("sampling_parameters", True))
GENERATION_OUTPUTS = (
    GenerationTensor("text_output"),
    GenerationTensor("finish_reason"),
    GenerationTensor("usage"),
)


@dataclass(frozen=True)
class GenerationServing:
    """How the decoupled generation model of a GGUF / causal-LM deployment runs its engine."""

    max_running_streams: int = 8
    """Streams decoded together in one forward pass."""

    max_waiting_streams: int = 32
    """Streams queued for a running slot; one more is refused with RESOURCE_EXHAUSTED."""

    torch_threads: int = 0
    """torch threads of the engine; 0 uses every core (the model runs one instance)."""


class ServingRuntime(enum.StrEnum):
    """Which Triton backend runs a model."""

    PYTHON_BACKEND = "python"
    """`runtime_model.py` in Triton's Python backend: torch, or onnxruntime for ONNX."""

    ONNXRUNTIME_BACKEND = "onnxruntime"
    """Triton's own onnxruntime backend (`platform: "onnxruntime_onnx"`), where it has one."""


ONNXRUNTIME_PLATFORM = "onnxruntime_onnx"
# Thread settings Triton's onnxruntime backend reads from the config's parameters.
ONNXRUNTIME_INTRA_OP_PARAMETER = "intra_op_thread_count"
ONNXRUNTIME_INTER_OP_PARAMETER = "inter_op_thread_count"


def runtime_description(artifact_format: ArtifactFormat, runtime: ServingRuntime, *,
                        ships_onnx_graph: bool = False) -> str:
    """How a deployment reports what runs its model, e.g. "onnxruntime in Triton's Python backend".

    `ships_onnx_graph`: a Hugging Face archive carries its ONNX conversion (`model.onnx`), which
    the text runtime prefers over the safetensors weights.
    """
    if runtime is ServingRuntime.ONNXRUNTIME_BACKEND:
        return "Triton's onnxruntime backend"
    if artifact_format.generative:
        return "maas_llm continuous-batching engine (torch, bf16) in Triton's Python backend, decoupled"
    if artifact_format is ArtifactFormat.HF_TRANSFORMER:
        engine = "onnxruntime" if ships_onnx_graph else "torch"
        return f"maas_text tokenizer + {engine} in Triton's Python backend"
    engine = "onnxruntime" if artifact_format is ArtifactFormat.ONNX else "torch"
    return f"{engine} in Triton's Python backend"


class InstanceKind(enum.StrEnum):
    """Where Triton places model instances: CPU here, GPU on a Triton pod."""

    CPU = "KIND_CPU"
    GPU = "KIND_GPU"


class TensorSignatureLike(Protocol):
    """What a signature tensor offers (maas_formats.TensorSignature fits)."""

    name: str
    datatype: str
    shape: Sequence[int]


class SignatureLike(Protocol):
    inputs: Sequence[TensorSignatureLike]
    outputs: Sequence[TensorSignatureLike]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; `shape` excludes the batch dimension, -1 is variable."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: TensorSignatureLike) -> TensorSpec:
        return cls(tensor.name, tensor.datatype, tuple(tensor.shape))


@dataclass(frozen=True)
class BatchingPolicy:
    """How Triton batches requests for the model."""

    max_batch_size: int = 64
    """Largest batch one execution sees; 0 turns batching off (inputs carry their own batch
    dimension then)."""

    dynamic_batching: bool = True
    """Let Triton merge concurrent requests into one execution."""

    max_queue_delay_microseconds: int = 100
    """How long a request may wait for others to join its batch."""

    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes the scheduler aims for; empty lets it form the largest batch it can."""


@dataclass(frozen=True)
class TritonModelSpec:
    """Everything needed to write one Triton model for one artifact."""

    name: str
    artifact_format: ArtifactFormat
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    instance_count: int = 1
    instance_kind: InstanceKind = InstanceKind.CPU
    torch_threads: int = 1
    """Intra-op threads per instance (torch or onnxruntime); 1 keeps N instances from
    oversubscribing N cores."""
    runtime: ServingRuntime = ServingRuntime.PYTHON_BACKEND
    generation: GenerationServing = field(default_factory=GenerationServing)
    """GGUF / causal-LM formats only: the engine's stream limits and threads."""

    @classmethod
    def from_signature(
        cls,
        name: str,
        artifact_format: ArtifactFormat | str,
        signature: SignatureLike,
        **options,
    ) -> TritonModelSpec:
        return cls(
            name=name,
            artifact_format=ArtifactFormat(artifact_format),
            inputs=tuple(TensorSpec.of(t) for t in signature.inputs),
            outputs=tuple(TensorSpec.of(t) for t in signature.outputs),
            **options,
        )


def validate_triton_model_name(name: str) -> str:
    """Returns `name` if it is a safe Triton model (and directory) name; raises otherwise."""
    if (
        not isinstance(name, str)
        or len(name) > MAX_MODEL_NAME_LENGTH
        or not _MODEL_NAME_PATTERN.fullmatch(name)
        or ".." in name
    ):
        raise InvalidArgument.for_field(
            "triton_model_name",
            f"{name!r} is not a safe model name: 1-{MAX_MODEL_NAME_LENGTH} letters, digits, "
            "'_', '-' or inner '.', starting with a letter or digit, no '..'",
        )
    return name


def _check_tensors(
    violations: ViolationCollector, field_path: str, tensors: Sequence[TensorSpec], names: set[str]
) -> None:
    violations.check(len(tensors) > 0, field_path, "at least one tensor is required")
    for index, tensor in enumerate(tensors):
        where = f"{field_path}[{index}]"
        if violations.check(bool(tensor.name), f"{where}.name", "must not be empty"):
            violations.check(tensor.name not in names, f"{where}.name", f"{tensor.name!r} is used twice")
            names.add(tensor.name)
        violations.check(
            tensor.datatype in KSERVE_TO_TRITON_DATATYPE,
            f"{where}.datatype",
            f"{tensor.datatype!r} is not one of {', '.join(KSERVE_TO_TRITON_DATATYPE)}",
        )
        violations.check(
            all(isinstance(d, int) and (d == -1 or d > 0) for d in tensor.shape),
            f"{where}.shape",
            f"dimensions must be positive or -1 (variable), got {list(tensor.shape)}",
        )


def _validate_generation_spec(spec: TritonModelSpec) -> None:
    generation = spec.generation
    violations = ViolationCollector()
    violations.check(spec.runtime is ServingRuntime.PYTHON_BACKEND, "runtime",
                     f"{spec.artifact_format.value} is served by the Python backend only")
    violations.check(1 <= generation.max_running_streams <= 256, "generation.max_running_streams",
                     f"must be between 1 and 256, got {generation.max_running_streams}")
    violations.check(0 <= generation.max_waiting_streams <= 10_000, "generation.max_waiting_streams",
                     f"must be between 0 and 10000, got {generation.max_waiting_streams}")
    violations.check(0 <= generation.torch_threads <= 256, "generation.torch_threads",
                     f"must be between 0 and 256, got {generation.torch_threads}")
    violations.raise_if_any(f"cannot serve Triton model {spec.name!r}")


def validate_spec(spec: TritonModelSpec) -> None:
    """Raises `InvalidArgument` listing every problem a Triton load would otherwise hit later."""
    validate_triton_model_name(spec.name)
    if spec.artifact_format.generative:
        _validate_generation_spec(spec)
        return
    violations = ViolationCollector()
    names: set[str] = set()
    _check_tensors(violations, "signature.inputs", spec.inputs, names)
    _check_tensors(violations, "signature.outputs", spec.outputs, names)
    batching = spec.batching
    violations.check(
        0 <= batching.max_batch_size <= MAX_BATCH_SIZE_LIMIT,
        "batching.max_batch_size",
        f"must be between 0 and {MAX_BATCH_SIZE_LIMIT}, got {batching.max_batch_size}",
    )
    violations.check(
        not batching.dynamic_batching or batching.max_batch_size > 0,
        "batching.dynamic_batching",
        "needs max_batch_size > 0",
    )
    violations.check(
        batching.max_queue_delay_microseconds >= 0,
        "batching.max_queue_delay_microseconds",
        f"must not be negative, got {batching.max_queue_delay_microseconds}",
    )
    violations.check(
        all(1 <= size <= batching.max_batch_size for size in batching.preferred_batch_sizes),
        "batching.preferred_batch_sizes",
        f"each must be between 1 and max_batch_size ({batching.max_batch_size}), "
        f"got {list(batching.preferred_batch_sizes)}",
    )
    violations.check(
        1 <= spec.instance_count <= MAX_INSTANCE_COUNT,
        "instance_count",
        f"must be between 1 and {MAX_INSTANCE_COUNT}, got {spec.instance_count}",
    )
    violations.check(
        spec.torch_threads >= 1, "torch_threads", f"must be at least 1, got {spec.torch_threads}"
    )
    violations.check(
        spec.runtime is ServingRuntime.PYTHON_BACKEND or spec.artifact_format is ArtifactFormat.ONNX,
        "runtime",
        f"Triton's onnxruntime backend serves ONNX graphs, not {spec.artifact_format.value}",
    )
    violations.raise_if_any(f"cannot serve Triton model {spec.name!r}")


def _add_tensor(repeated_field, tensor: TensorSpec, batched: bool) -> None:
    # With max_batch_size > 0 Triton adds the batch dimension itself; without batching the
    # dims are the full shape, so the batch dimension is spelled out as variable.
    dims = list(tensor.shape) if batched else [-1, *tensor.shape]
    repeated_field.add(name=tensor.name, data_type=KSERVE_TO_TRITON_DATATYPE[tensor.datatype], dims=dims)


def _generation_model_config(spec: TritonModelSpec) -> model_config_pb2.ModelConfig:
    """A decoupled, unbatched, single-instance model with the fixed generation I/O: the
    engine inside batches the streams itself, so Triton's batcher must stay out of the way."""
    config = model_config_pb2.ModelConfig(name=spec.name, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    for tensor in GENERATION_INPUTS:
        config.input.add(name=tensor.name, data_type=model_config_pb2.TYPE_STRING, dims=[1],
                         optional=tensor.optional)
    for tensor in GENERATION_OUTPUTS:
        config.output.add(name=tensor.name, data_type=model_config_pb2.TYPE_STRING, dims=[1])
    config.instance_group.add(
        kind=model_config_pb2.ModelInstanceGroup.Kind.Value(spec.instance_kind.value), count=1
    )
    parameters = {
        ARTIFACT_PATH_PARAMETER: spec.artifact_format.artifact_file_name,
        ARTIFACT_FORMAT_PARAMETER: spec.artifact_format.value,
        TORCH_THREADS_PARAMETER: str(spec.generation.torch_threads),
        MAX_RUNNING_PARAMETER: str(spec.generation.max_running_streams),
        MAX_WAITING_PARAMETER: str(spec.generation.max_waiting_streams),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def build_model_config(spec: TritonModelSpec) -> model_config_pb2.ModelConfig:
    """The `ModelConfig` for `spec` (validated first)."""
    validate_spec(spec)
    if spec.artifact_format.generative:
        return _generation_model_config(spec)
    batching = spec.batching
    batched = batching.max_batch_size > 0
    if spec.runtime is ServingRuntime.ONNXRUNTIME_BACKEND:
        config = model_config_pb2.ModelConfig(
            name=spec.name,
            platform=ONNXRUNTIME_PLATFORM,
            backend="onnxruntime",
            max_batch_size=batching.max_batch_size,
            default_model_filename=spec.artifact_format.artifact_file_name,
        )
    else:
        config = model_config_pb2.ModelConfig(
            name=spec.name, backend="python", max_batch_size=batching.max_batch_size
        )
    for tensor in spec.inputs:
        _add_tensor(config.input, tensor, batched)
    for tensor in spec.outputs:
        _add_tensor(config.output, tensor, batched)
    if batching.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.instance_group.add(
        kind=model_config_pb2.ModelInstanceGroup.Kind.Value(spec.instance_kind.value),
        count=spec.instance_count,
    )
    if spec.runtime is ServingRuntime.ONNXRUNTIME_BACKEND:
        parameters = {
            ONNXRUNTIME_INTRA_OP_PARAMETER: str(spec.torch_threads),
            ONNXRUNTIME_INTER_OP_PARAMETER: "1",
        }
    else:
        parameters = {
            ARTIFACT_PATH_PARAMETER: spec.artifact_format.artifact_file_name,
            ARTIFACT_FORMAT_PARAMETER: spec.artifact_format.value,
            TORCH_THREADS_PARAMETER: str(spec.torch_threads),
        }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def render_config_pbtxt(config: model_config_pb2.ModelConfig) -> str:
    return "# Generated by maas-inference from the model signature; edits are overwritten.\n" + (
        text_format.MessageToString(config)
    )


def parse_config_pbtxt(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def runtime_source(artifact_format: ArtifactFormat | None = None) -> bytes:
    """The Python-backend runtime that becomes a model's `model.py`: the decoupled generation
    runtime for GGUF / causal-LM formats, runtime_model.py for every other format."""
    source = (
        GENERATION_RUNTIME_SOURCE
        if artifact_format is not None and artifact_format.generative
        else RUNTIME_SOURCE
    )
    return importlib.resources.files(__package__).joinpath(source).read_bytes()


class ModelRepository:
    """A Triton model repository directory this service writes models into."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_dir(self, name: str) -> Path:
        return self.root / validate_triton_model_name(name)

    def write_model(self, spec: TritonModelSpec, artifact: Path) -> Path:
        """Writes (or replaces) the model directory for `spec` with a copy of `artifact`.

        The artifact is copied, not linked, so the repository stays valid when the source
        (a download or a blob store entry) goes away or lives on another volume.
        """
        config = build_model_config(spec)
        if not artifact.is_file():
            raise NotFound("artifact", os.fspath(artifact))
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{_STAGING_PREFIX}{spec.name}-{uuid.uuid4().hex}"
        try:
            version_dir = staging / MODEL_VERSION
            version_dir.mkdir(parents=True)
            (staging / CONFIG_FILE).write_text(render_config_pbtxt(config))
            if spec.runtime is ServingRuntime.PYTHON_BACKEND:
                (version_dir / RUNTIME_FILE).write_bytes(runtime_source(spec.artifact_format))
            shutil.copyfile(artifact, version_dir / spec.artifact_format.artifact_file_name)
            self._move_into_place(staging, self.model_dir(spec.name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.model_dir(spec.name)

    def _move_into_place(self, staging: Path, target: Path) -> None:
        if target.exists():
            # rename() cannot replace a non-empty directory; move the old one aside first.
            retired = self.root / f"{_RETIRED_PREFIX}{target.name}-{uuid.uuid4().hex}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)

    def remove_model(self, name: str) -> bool:
        """Deletes the model directory; False if there was none. Unload it from Triton first."""
        target = self.model_dir(name)
        if not target.exists():
            return False
        retired = self.root / f"{_RETIRED_PREFIX}{name}-{uuid.uuid4().hex}"
        os.rename(target, retired)
        shutil.rmtree(retired, ignore_errors=True)
        return True

    def has_model(self, name: str) -> bool:
        return (self.model_dir(name) / CONFIG_FILE).is_file()

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and (entry / CONFIG_FILE).is_file()
        )

    def read_config(self, name: str) -> model_config_pb2.ModelConfig:
        path = self.model_dir(name) / CONFIG_FILE
        if not path.is_file():
            raise NotFound("triton model", name)
        return parse_config_pbtxt(path.read_text())
