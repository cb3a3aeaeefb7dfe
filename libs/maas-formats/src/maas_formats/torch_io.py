"""Read and write maas-packages from torch state dicts, for the images that have torch.

torch is imported inside each function: the registry and inference images install
maas-formats without torch, and importing `maas_formats` must keep working there.
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
    """Write a maas-package from a torch state dict; returns the manifest as written."""
    from safetensors.torch import save_file

    tensors = _storable_tensors(state_dict)
    completed = manifest_with_tensors(
        manifest,
        {
            name: WeightTensorSpec(dtype=_safetensors_dtype_of(t), shape=list(t.shape))
            for name, t in tensors.items()
        },
    )
    with atomic_output_path(path) as temporary:
        save_file(tensors, temporary, metadata={MANIFEST_METADATA_KEY: completed.model_dump_json()})
    return completed


def load_torch_package(
    path: str | os.PathLike[str], *, device: str = "cpu", field_path: str = "artifact"
) -> tuple[ModelManifest, dict[str, torch.Tensor]]:
    """Validate a maas-package, then load its manifest and weights as torch tensors."""
    from safetensors.torch import load_file

    info = validate_model_package(path, field_path=field_path)
    return info.manifest, load_file(os.fspath(path), device=device)


def load_torch_state_dict(
    path: str | os.PathLike[str], *, device: str = "cpu", field_path: str = "artifact"
) -> dict[str, torch.Tensor]:
    """Validate a maas-package and return its weights as a state dict for `load_state_dict`."""
    _, state_dict = load_torch_package(path, device=device, field_path=field_path)
    return state_dict
