"""Read and write maas-packages from torch state dicts, for the images that have torch.

torch is imported inside each function: the registry and inference images install
maas-formats without torch, and importing `maas_formats` must keep working there.

A state dict holding torchao quantized tensors (e.g. `Int8Tensor` weights from
`quantize_(module, Int8WeightOnlyConfig())`) is written through torchao's safetensors support:
each such tensor becomes its plain parts (int8 data, scales) and its type and attributes go
into the safetensors metadata as JSON, and the manifest's `quantization` says so. Loading
rebuilds them with torchao's allow-listed types, never pickle; such a state dict must be loaded
with `load_state_dict(..., assign=True)` (`loads_by_assignment`). torchao is imported only for
these packages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from maas_formats._atomic import atomic_output_path
from maas_formats.manifest import ModelManifest, WeightTensorSpec
from maas_formats.package import (
    MANIFEST_METADATA_KEY,
    manifest_with_tensors,
    validate_model_package,
)

if TYPE_CHECKING:
    import torch

# torch dtype attribute names → safetensors dtype names. Names, not torch objects, so the
# table exists without importing torch; attributes missing from an older torch are skipped.
_SAFETENSORS_DTYPE_BY_TORCH_NAME = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint32": "U32",
    "int32": "I32",
    "float32": "F32",
    "uint64": "U64",
    "int64": "I64",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}


def _safetensors_dtype_of(tensor: torch.Tensor) -> str:
    import torch

    for torch_name, safetensors_name in _SAFETENSORS_DTYPE_BY_TORCH_NAME.items():
        if getattr(torch, torch_name, None) == tensor.dtype:
            return safetensors_name
    raise TypeError(f"torch dtype {tensor.dtype} cannot be stored in safetensors")


TORCHAO_INT8_WEIGHT_ONLY = "torchao-int8-weight-only"
"""The `quantization.scheme` of packages written from torchao int8 weight-only tensors."""
TORCHAO_SCHEMES = frozenset({TORCHAO_INT8_WEIGHT_ONLY})


def holds_torchao_tensors(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether any tensor is a torchao tensor subclass; by type, without importing torchao."""
    return any(type(tensor).__module__.startswith("torchao.") for tensor in state_dict.values())


def loads_by_assignment(manifest: ModelManifest) -> bool:
    """Whether the package's tensors must replace the module's (`load_state_dict(assign=True)`):
    quantized tensor subclasses cannot be copied into float parameters."""
    quantization = manifest.quantization or {}
    return quantization.get("scheme") in TORCHAO_SCHEMES


def _flatten_torchao(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(dict(state_dict))
    return tensors, metadata


def _storable_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views into one buffer)
    # and non-contiguous ones; give each such tensor its own contiguous CPU copy.
    storable: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
            storage = tensor.untyped_storage().data_ptr()
        seen_storages.add(storage)
        storable[name] = tensor
    return storable


def save_torch_package(
    path: str | os.PathLike[str],
    manifest: ModelManifest,
    state_dict: Mapping[str, torch.Tensor],
) -> ModelManifest:
    """Write a maas-package from a torch state dict; returns the manifest as written.

    torchao tensors are flattened into their parts (see the module doc); `manifest.quantization`
    must then name the scheme, which this checks.
    """
    from safetensors.torch import save_file

    metadata: dict[str, str] = {}
    if holds_torchao_tensors(state_dict):
        if not loads_by_assignment(manifest):
            raise ValueError(
                "the state dict holds torchao tensors; the manifest's quantization.scheme must be "
                f"one of {sorted(TORCHAO_SCHEMES)}"
            )
        state_dict, metadata = _flatten_torchao(state_dict)
    tensors = _storable_tensors(state_dict)
    completed = manifest_with_tensors(
        manifest,
        {
            name: WeightTensorSpec(dtype=_safetensors_dtype_of(t), shape=list(t.shape))
            for name, t in tensors.items()
        },
    )
    with atomic_output_path(path) as temporary:
        save_file(tensors, temporary, metadata={**metadata, MANIFEST_METADATA_KEY: completed.to_json()})
    return completed


def load_torch_package(
    path: str | os.PathLike[str], *, device: str = "cpu", field_path: str = "artifact"
) -> tuple[ModelManifest, dict[str, torch.Tensor]]:
    """Validate a maas-package, then load its manifest and weights as torch tensors (torchao
    tensors rebuilt when the manifest's quantization says so; see `loads_by_assignment`)."""
    from safetensors.torch import load_file

    info = validate_model_package(path, field_path=field_path)
    tensors = load_file(os.fspath(path), device=device)
    if not loads_by_assignment(info.manifest):
        return info.manifest, tensors
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    torchao_metadata = {
        key: value for key, value in info.header.metadata.items() if key != MANIFEST_METADATA_KEY
    }
    state_dict, leftover = unflatten_tensor_state_dict(tensors, torchao_metadata)
    if leftover:
        raise ValueError(f"torchao could not place the stored tensors {sorted(leftover)}")
    return info.manifest, state_dict


def load_torch_state_dict(
    path: str | os.PathLike[str], *, device: str = "cpu", field_path: str = "artifact"
) -> dict[str, torch.Tensor]:
    """Validate a maas-package and return its weights as a state dict for `load_state_dict`."""
    _, state_dict = load_torch_package(path, device=device, field_path=field_path)
    return state_dict
