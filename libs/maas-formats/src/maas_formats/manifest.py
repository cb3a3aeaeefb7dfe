"""The maas-package manifest: what a model is, how to call it, and which weights it holds.

The manifest travels as JSON inside the safetensors header (`__metadata__["maas.manifest"]`).
It is a strict schema — unknown fields, wrong types and unknown datatypes are rejected rather
than guessed at — because the trainer, the registry and the inference service all act on it.
Schema errors become one `FieldViolation` each, with paths such as
`artifact.manifest.signature.inputs[0].datatype`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from maas_runtime.errors import FieldViolation, InvalidArgument
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from maas_formats.safetensors_header import SAFETENSORS_DTYPE_BITS

MANIFEST_FORMAT_VERSION: Final = 1

# The KServe v2 datatype names, as in maas.common.v1.DataType without the DATA_TYPE_ prefix.
KServeDatatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
if TYPE_CHECKING:  # the literal is built from the table, which a type checker cannot follow
    SafetensorsDtype = str
else:
    SafetensorsDtype = Literal[tuple(SAFETENSORS_DTYPE_BITS)]

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


def _reject_zero_dimension(dimension: int) -> int:
    # A zero-sized dimension cannot carry an example; -1 is how "any size" is spelled.
    if dimension == 0:
        raise ValueError("dimension must be positive, or -1 for a variable size")
    return dimension


SignatureDimension = Annotated[int, Field(ge=-1), AfterValidator(_reject_zero_dimension)]


class _StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ArchitectureSpec(_StrictModel):
    """Enough to rebuild the network: a kind the runtime knows and its hyperparameters."""

    kind: NonEmptyText
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class TensorSignatureSpec(_StrictModel):
    """One input or output tensor; `shape` excludes the batch dimension."""

    name: NonEmptyText
    datatype: KServeDatatype
    shape: list[SignatureDimension]


class SignatureSpec(_StrictModel):
    """The tensor interface a serving runtime exposes for the model."""

    inputs: Annotated[list[TensorSignatureSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSignatureSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _names_unique_within_signature(self) -> SignatureSpec:
        seen: set[str] = set()
        for spec in [*self.inputs, *self.outputs]:
            if spec.name in seen:
                raise ValueError(f"tensor name {spec.name!r} is used twice in the signature")
            seen.add(spec.name)
        return self


class WeightTensorSpec(_StrictModel):
    """A weight tensor as stored in the safetensors data: its dtype name and full shape."""

    dtype: SafetensorsDtype
    shape: list[Annotated[int, Field(ge=0)]]


class FrameworkInfo(_StrictModel):
    """The library that produced the weights, for reproducibility."""

    name: NonEmptyText
    version: NonEmptyText


class ModelManifest(_StrictModel):
    """The JSON document stored under the safetensors metadata key `maas.manifest`."""

    format_version: Literal[1] = MANIFEST_FORMAT_VERSION
    architecture: ArchitectureSpec
    signature: SignatureSpec
    preprocessing: dict[str, Any] | None = None
    tensors: dict[str, WeightTensorSpec] = Field(default_factory=dict)
    labels: list[str] | None = None
    framework: FrameworkInfo | None = None
    quantization: dict[str, Any] | None = None
    """How the weights were quantized when they are not plain float tensors, e.g.
    `{"scheme": "torchao-int8-weight-only", "library": "torchao", "version": "0.18.0"}`;
    a loader rebuilds the quantized tensors from the safetensors metadata the scheme names."""

    def to_json(self) -> str:
        """The JSON stored in the safetensors metadata; an unset `quantization` is left out so
        float packages read exactly as before by readers that predate the field."""
        return self.model_dump_json(exclude={"quantization"} if self.quantization is None else None)


@dataclass(frozen=True)
class TensorSignature:
    """One signature tensor, transport-free; `datatype` is a KServe name such as "FP32"."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSignature:
    """A model's tensor interface, hashable and comparable with one built from a request."""

    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]


def signature_from_manifest(manifest: ModelManifest) -> ModelSignature:
    """The manifest's signature as plain values (proto enum = "DATA_TYPE_" + datatype)."""

    def convert(specs: Sequence[TensorSignatureSpec]) -> tuple[TensorSignature, ...]:
        return tuple(TensorSignature(s.name, s.datatype, tuple(s.shape)) for s in specs)

    return ModelSignature(
        inputs=convert(manifest.signature.inputs),
        outputs=convert(manifest.signature.outputs),
    )


def parse_manifest(text: str, *, field_path: str = "artifact.manifest") -> ModelManifest:
    """Parse manifest JSON, turning every schema error into a field violation under it."""
    try:
        return ModelManifest.model_validate_json(text)
    except ValidationError as error:
        violations = manifest_violations(error, field_path)
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(
            f"invalid model manifest: {summary}", field_violations=violations,
            reason="MANIFEST_INVALID",
        ) from None


# Locations whose next element is a dict key (a tensor name may contain dots), not a field.
_MAPPING_LOCATIONS = frozenset(
    {("tensors",), ("preprocessing",), ("architecture", "hyperparameters")}
)


def format_field_path(prefix: str, location: Sequence[int | str]) -> str:
    """Render a pydantic error location as `prefix.field[0]["dict key"].field`."""
    path = prefix
    for index, part in enumerate(location):
        if isinstance(part, int):
            path += f"[{part}]"
        elif tuple(location[:index]) in _MAPPING_LOCATIONS:
            path += f"[{json.dumps(part)}]"
        else:
            path += f".{part}"
    return path


def manifest_violations(error: ValidationError, prefix: str) -> list[FieldViolation]:
    return [
        FieldViolation(format_field_path(prefix, detail["loc"]), detail["msg"])
        for detail in error.errors(include_url=False)
    ]
