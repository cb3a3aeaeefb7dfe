"""One entry point for the registry: validate a model artifact of any accepted format.

The registry hands over the uploaded file and the format the caller declared; the answer is
either `ArtifactFacts` to record with the version or an `InvalidArgument` for the caller.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from maas_runtime import contract_enums
from maas_runtime.errors import InvalidArgument

from maas_formats.gguf import GgufHeader, read_gguf_header
from maas_formats.manifest import ModelManifest, ModelSignature
from maas_formats.opaque import (
    validate_causal_lm,
    validate_hf_transformer,
    validate_onnx,
    validate_torchscript,
)
from maas_formats.package import validate_model_package

MODEL_FORMATS = ("maas-package", "torchscript", "onnx", "hf-transformer", "gguf", "causal-lm")

# The contracts' enum value names (maas.registry.v1.ModelFormat / DatasetFormat) → the format
# names used here and stored by the registry; the one translation every service uses.
MODEL_FORMAT_BY_PROTO_NAME: Mapping[str, str] = {
    contract_enums.MODEL_FORMAT_MAAS_PACKAGE: "maas-package",
    contract_enums.MODEL_FORMAT_TORCHSCRIPT: "torchscript",
    contract_enums.MODEL_FORMAT_ONNX: "onnx",
    contract_enums.MODEL_FORMAT_HF_TRANSFORMER: "hf-transformer",
    contract_enums.MODEL_FORMAT_GGUF: "gguf",
    contract_enums.MODEL_FORMAT_CAUSAL_LM: "causal-lm",
}
DATASET_FORMAT_BY_PROTO_NAME: Mapping[str, str] = {
    contract_enums.DATASET_FORMAT_NPZ: "npz",
    contract_enums.DATASET_FORMAT_CSV: "csv",
    contract_enums.DATASET_FORMAT_TEXT_CSV: "text-csv",
}
_PROTO_NAME_BY_MODEL_FORMAT = {short: proto for proto, short in MODEL_FORMAT_BY_PROTO_NAME.items()}

# Label values the registry accepts are at most 63 characters; longer facts are cut.
MAX_FACT_LABEL_CHARS = 63

SIGNATURE_REQUIRED_FORMATS = frozenset({"torchscript", "onnx"})
"""Formats whose artifact carries no signature of its own but that need one to be served
(the serving config names every input and output tensor), so a version must declare it. A
maas-package takes it from its manifest; an hf-transformer is served from its config and
tokenizer."""


@dataclass(frozen=True)
class ArtifactFacts:
    """What validating a model artifact established."""

    format_name: str
    # From the manifest of a maas-package; opaque formats carry no signature of their own.
    signature: ModelSignature | None = None
    manifest: ModelManifest | None = None
    # Known whenever the weights are safetensors (maas-package, hf-transformer).
    parameter_count: int | None = None
    # hf-transformer and causal-lm: the folder inside the zip that holds config.json.
    archive_root: str | None = None
    # gguf only: the parsed header (architecture, context length, vocabulary, quantization).
    gguf_header: GgufHeader | None = None
    # Facts read from the artifact itself that the registry records as version labels (the
    # uploader's own labels cannot override them): a GGUF header's "gguf.architecture", ...
    labels: Mapping[str, str] = field(default_factory=dict)


def _maas_package_facts(path: str | os.PathLike[str], field_path: str) -> ArtifactFacts:
    info = validate_model_package(path, field_path=field_path)
    return ArtifactFacts(
        format_name="maas-package",
        signature=info.signature,
        manifest=info.manifest,
        parameter_count=info.parameter_count,
    )


def _torchscript_facts(path: str | os.PathLike[str], field_path: str) -> ArtifactFacts:
    validate_torchscript(path, field_path=field_path)
    return ArtifactFacts(format_name="torchscript")


def _onnx_facts(path: str | os.PathLike[str], field_path: str) -> ArtifactFacts:
    validate_onnx(path, field_path=field_path)
    return ArtifactFacts(format_name="onnx")


def _hf_transformer_facts(path: str | os.PathLike[str], field_path: str) -> ArtifactFacts:
    info = validate_hf_transformer(path, field_path=field_path)
    return ArtifactFacts(
        format_name="hf-transformer",
        parameter_count=info.parameter_count,
        archive_root=info.root,
    )


def _gguf_facts(path: str | os.PathLike[str], field_path: str) -> ArtifactFacts:
    header = read_gguf_header(path, field_path=field_path)
    return ArtifactFacts(
        format_name="gguf",
        parameter_count=header.parameter_count,
        gguf_header=header,
        labels={
            f"gguf.{key}": value[:MAX_FACT_LABEL_CHARS]
            for key, value in header.facts().items()
            if value
        },
    )


def _causal_lm_facts(path: str | os.PathLike[str], field_path: str) -> ArtifactFacts:
    info = validate_causal_lm(path, field_path=field_path)
    return ArtifactFacts(
        format_name="causal-lm",
        parameter_count=info.parameter_count,
        archive_root=info.root,
    )


_VALIDATORS: Mapping[str, Callable[[str | os.PathLike[str], str], ArtifactFacts]] = {
    "maas-package": _maas_package_facts,
    "torchscript": _torchscript_facts,
    "onnx": _onnx_facts,
    "hf-transformer": _hf_transformer_facts,
    "gguf": _gguf_facts,
    "causal-lm": _causal_lm_facts,
}


def validate_model_artifact(
    path: str | os.PathLike[str],
    format_name: str,
    *,
    field_path: str = "artifact",
    format_field: str = "format",
) -> ArtifactFacts:
    """Validate `path` as `format_name` (one of MODEL_FORMATS); InvalidArgument if it is not.

    Bytes of another format than the declared one are refused on `format_field`, naming both
    (reason FORMAT_MISMATCH), rather than with the declared format's complaint about them.
    """
    validator = _VALIDATORS.get(format_name)
    if validator is None:
        raise InvalidArgument.for_field(
            format_field,
            f"unknown model format {format_name!r}; expected one of {', '.join(MODEL_FORMATS)}",
        )
    try:
        return validator(path, field_path)
    except InvalidArgument:
        actual = sniff_model_format(path, excluding=format_name)
        if actual is None:
            raise
    raise InvalidArgument.for_field(
        format_field,
        f"declared {_describe(format_name)} but the artifact is {_describe(actual)}; "
        f"declare {_PROTO_NAME_BY_MODEL_FORMAT.get(actual, actual)} or upload the "
        f"{format_name} file",
        reason="FORMAT_MISMATCH",
        metadata={"declared_format": format_name, "artifact_format": actual},
    )


def sniff_model_format(path: str | os.PathLike[str], *, excluding: str = "") -> str | None:
    """The model format the bytes at `path` validate as (other than `excluding`), or None."""
    for format_name, validator in _VALIDATORS.items():
        if format_name == excluding:
            continue
        try:
            validator(path, "artifact")
        except InvalidArgument:
            continue
        return format_name
    return None


def _describe(format_name: str) -> str:
    proto_name = _PROTO_NAME_BY_MODEL_FORMAT.get(format_name)
    return f"{format_name} ({proto_name})" if proto_name else format_name
