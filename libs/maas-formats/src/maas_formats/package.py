"""The maas-package model format: one safetensors file with the manifest in its header.

The registry calls `validate_model_package` on every upload; the trainer writes packages with
`write_model_package` and the inference service reads them with `load_model_package`. Weights
are read only through safetensors — a package can never execute code when loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import safetensors.numpy
from maas_runtime.errors import InvalidArgument, ViolationCollector

from maas_formats._atomic import atomic_output_path
from maas_formats.manifest import (
    ModelManifest,
    ModelSignature,
    WeightTensorSpec,
    parse_manifest,
    signature_from_manifest,
)
from maas_formats.safetensors_header import (
    METADATA_KEY,
    SafetensorsHeader,
    read_safetensors_header,
)

MANIFEST_METADATA_KEY = "maas.manifest"

# Safetensors dtypes that have a NumPy counterpart; BF16 and the float8 types need torch.
NUMPY_LOADABLE_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "U16", "I16", "F16", "U32", "I32", "F32", "U64", "I64", "F64", "C64"}
)

# Keyed by (kind, itemsize) so big- and little-endian arrays map alike; save_file byteswaps.
_SAFETENSORS_DTYPE_BY_NUMPY_KIND = {
    ("b", 1): "BOOL",
    ("u", 1): "U8",
    ("i", 1): "I8",
    ("u", 2): "U16",
    ("i", 2): "I16",
    ("f", 2): "F16",
    ("u", 4): "U32",
    ("i", 4): "I32",
    ("f", 4): "F32",
    ("u", 8): "U64",
    ("i", 8): "I64",
    ("f", 8): "F64",
    ("c", 8): "C64",
}


@dataclass(frozen=True)
class ModelPackageInfo:
    """What validation learned about a maas-package: its manifest and its weights' header."""

    manifest: ModelManifest
    header: SafetensorsHeader

    @property
    def signature(self) -> ModelSignature:
        return signature_from_manifest(self.manifest)

    @property
    def parameter_count(self) -> int:
        return self.header.parameter_count


def validate_model_package(
    source: str | os.PathLike[str] | BinaryIO, *, field_path: str = "artifact"
) -> ModelPackageInfo:
    """Check a maas-package without reading its tensor data.

    Raises `InvalidArgument` when the safetensors header is corrupt, the manifest is missing
    or breaks the schema, or the manifest's `tensors` disagree with the weights.
    """
    header = read_safetensors_header(source, field_path=field_path)
    manifest_path = f"{field_path}.manifest"
    manifest_text = header.metadata.get(MANIFEST_METADATA_KEY)
    if manifest_text is None:
        raise InvalidArgument.for_field(
            manifest_path,
            f"safetensors {METADATA_KEY} has no {MANIFEST_METADATA_KEY!r} entry; "
            "a maas-package carries its JSON manifest there",
        )
    manifest = parse_manifest(manifest_text, field_path=manifest_path)
    _check_manifest_matches_weights(manifest, header, f"{manifest_path}.tensors")
    return ModelPackageInfo(manifest=manifest, header=header)


def _tensor_field(tensors_path: str, name: str) -> str:
    return f'{tensors_path}["{name}"]'


def _check_manifest_matches_weights(
    manifest: ModelManifest, header: SafetensorsHeader, tensors_path: str
) -> None:
    collector = ViolationCollector()
    for name in sorted(manifest.tensors.keys() - header.tensors.keys()):
        collector.add(
            _tensor_field(tensors_path, name),
            f"tensor {name!r} is listed in the manifest but absent from the weights",
        )
    for name in sorted(header.tensors.keys() - manifest.tensors.keys()):
        collector.add(
            tensors_path, f"weight tensor {name!r} is missing from the manifest's tensors"
        )
    for name in sorted(manifest.tensors.keys() & header.tensors.keys()):
        declared, stored = manifest.tensors[name], header.tensors[name]
        collector.check(
            declared.dtype == stored.dtype,
            f"{_tensor_field(tensors_path, name)}.dtype",
            f"tensor {name!r}: manifest says {declared.dtype}, weights hold {stored.dtype}",
        )
        collector.check(
            tuple(declared.shape) == stored.shape,
            f"{_tensor_field(tensors_path, name)}.shape",
            f"tensor {name!r}: manifest says shape {list(declared.shape)}, "
            f"weights hold {list(stored.shape)}",
        )
    collector.raise_if_any("model package manifest disagrees with its weights")


def manifest_with_tensors(
    manifest: ModelManifest, tensors: Mapping[str, WeightTensorSpec]
) -> ModelManifest:
    """A copy of `manifest` whose `tensors` are exactly `tensors` (validated, not trusted)."""
    document = manifest.model_dump()
    document["tensors"] = {name: spec.model_dump() for name, spec in tensors.items()}
    return ModelManifest.model_validate(document)


def safetensors_dtype_of(array: np.ndarray) -> str:
    """The safetensors dtype name for a NumPy array; TypeError for dtypes it cannot store."""
    dtype_name = _SAFETENSORS_DTYPE_BY_NUMPY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if dtype_name is None:
        raise TypeError(f"numpy dtype {array.dtype} cannot be stored in safetensors")
    return dtype_name


def write_model_package(
    path: str | os.PathLike[str],
    manifest: ModelManifest,
    tensors: Mapping[str, np.ndarray],
) -> ModelManifest:
    """Write a maas-package; `manifest.tensors` is replaced by what `tensors` actually hold.

    Returns the manifest as written. The file appears atomically under `path`.
    """
    arrays: dict[str, np.ndarray] = {}
    specs: dict[str, WeightTensorSpec] = {}
    for name, array in tensors.items():
        if name == METADATA_KEY:
            raise ValueError(f"{METADATA_KEY!r} is reserved by safetensors, not a tensor name")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array")
        # safetensors copies raw memory, so strided views must be made contiguous first.
        arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")
        specs[name] = WeightTensorSpec(dtype=safetensors_dtype_of(array), shape=list(array.shape))
    completed = manifest_with_tensors(manifest, specs)
    metadata = {MANIFEST_METADATA_KEY: completed.to_json()}
    with atomic_output_path(path) as temporary:
        safetensors.numpy.save_file(arrays, temporary, metadata=metadata)
    return completed


def load_model_package(
    path: str | os.PathLike[str], *, field_path: str = "artifact"
) -> tuple[ModelManifest, dict[str, np.ndarray]]:
    """Validate a maas-package, then load its manifest and weights as NumPy arrays."""
    info = validate_model_package(path, field_path=field_path)
    for name, entry in info.header.tensors.items():
        if entry.dtype not in NUMPY_LOADABLE_DTYPES:
            raise InvalidArgument.for_field(
                field_path,
                f"tensor {name!r} is {entry.dtype}, which NumPy cannot hold; "
                "load this package with maas_formats.torch_io.load_torch_package",
            )
    return info.manifest, safetensors.numpy.load_file(os.fspath(path))
