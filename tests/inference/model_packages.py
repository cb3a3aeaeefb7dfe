"""Builds small zoo models and writes them as maas-packages or TorchScript, for the tests.

Packages are written with maas-formats (`save_torch_package`), exactly as the trainer does,
so the Triton runtime is tested against the real format, not a test-only imitation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from maas_formats import ModelManifest, ModelSignature, signature_from_manifest
from maas_formats.torch_io import save_torch_package
from maas_zoo import build_model, resolve_hyperparameters

DIGITS_FEATURES = 64
DIGITS_CLASSES = 10


def zoo_model(
    kind: str, hyperparameters: dict[str, Any], input_shape: list[int], *, seed: int
) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(kind, hyperparameters, input_shape, DIGITS_CLASSES).eval()


def save_zoo_package(
    path: Path,
    module: torch.nn.Module,
    *,
    kind: str,
    hyperparameters: dict[str, Any],
    input_shape: list[int],
    preprocessing: dict[str, Any] | None = None,
) -> ModelSignature:
    """Writes `module` as a maas-package and returns the signature its manifest declares."""
    manifest = ModelManifest.model_validate(
        {
            "architecture": {
                "kind": kind,
                "hyperparameters": resolve_hyperparameters(kind, hyperparameters),
            },
            "signature": {
                "inputs": [{"name": "features", "datatype": "FP32", "shape": input_shape}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [DIGITS_CLASSES]}],
            },
            "preprocessing": preprocessing,
            "framework": {"name": "torch", "version": torch.__version__},
        }
    )
    written = save_torch_package(path, manifest, module.state_dict())
    return signature_from_manifest(written)


def save_torchscript(path: Path, module: torch.nn.Module, example: torch.Tensor) -> None:
    # torch 2.13 marks TorchScript deprecated, but archives it wrote before are exactly the
    # opaque format the suite accepts, so the tests keep producing them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(module, example).save(str(path))
