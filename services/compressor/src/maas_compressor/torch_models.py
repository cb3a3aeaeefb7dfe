"""Zoo models in torch: read and write maas-packages, run them as the serving runtime does.

A maas-package is one safetensors file whose header holds the JSON manifest (architecture,
signature, preprocessing); the module is rebuilt with `maas_zoo.build_model` and its weights
loaded strictly, so nothing is ever unpickled.

Inputs everywhere in the compressor are what a client sends the served model (the job's
`DataSplits`): the manifest's preprocessing is applied here before the module, exactly as the
Triton runtime applies it to every request, so a measured accuracy is the served accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from maas_formats.manifest import (
    ArchitectureSpec,
    FrameworkInfo,
    ModelManifest,
    ModelSignature,
    SignatureSpec,
    TensorSignatureSpec,
    signature_from_manifest,
)
from maas_formats.preprocessing import apply_preprocessing
from maas_formats.torch_io import (
    TORCHAO_INT8_WEIGHT_ONLY,
    holds_torchao_tensors,
    load_torch_package,
    loads_by_assignment,
    save_torch_package,
)
from maas_runtime.errors import FailedPrecondition
from maas_zoo import build_model, resolve_hyperparameters

from maas_compressor.steps.base import ModelUnderCompression, TorchForm

PACKAGE_FILENAME = "model.safetensors"
_PREDICTION_BATCH = 1024


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def classifier_shape(signature: ModelSignature) -> tuple[list[int], int]:
    """The zoo's `(input_shape, num_classes)` for a signature of one input and one output."""
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        raise FailedPrecondition(
            "the zoo's classifiers have exactly one input and one output; this model has "
            f"{len(signature.inputs)} and {len(signature.outputs)}",
            reason="SINGLE_INPUT_OUTPUT_REQUIRED",
        )
    return list(signature.inputs[0].shape), signature.outputs[0].shape[-1]


def build_zoo_module(architecture: Mapping[str, Any], signature: ModelSignature) -> torch.nn.Module:
    """A freshly initialised zoo module for `architecture` and the signature's shapes."""
    input_shape, num_classes = classifier_shape(signature)
    return build_model(architecture["kind"], architecture["hyperparameters"], input_shape, num_classes)


def load_package(path: Path) -> ModelUnderCompression:
    """The maas-package at `path` as a model under compression (a `TorchForm` in eval mode)."""
    manifest, state_dict = load_torch_package(path)
    signature = signature_from_manifest(manifest)
    kind = manifest.architecture.kind
    architecture = {
        "kind": kind,
        "hyperparameters": resolve_hyperparameters(kind, manifest.architecture.hyperparameters),
    }
    module = build_zoo_module(architecture, signature)
    module.load_state_dict(state_dict, strict=True, assign=loads_by_assignment(manifest))
    return ModelUnderCompression(
        form=TorchForm(module=module.eval(), architecture=architecture),
        signature=signature,
        preprocessing=manifest.preprocessing,
        labels=manifest.labels,
    )


def _signature_spec(signature: ModelSignature) -> SignatureSpec:
    def tensors(specs) -> list[TensorSignatureSpec]:
        return [TensorSignatureSpec(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs]

    return SignatureSpec(inputs=tensors(signature.inputs), outputs=tensors(signature.outputs))


def torch_form_of(model: ModelUnderCompression) -> TorchForm:
    """The model's torch form; FailedPrecondition when it has been converted to ONNX already."""
    if not isinstance(model.form, TorchForm):
        raise FailedPrecondition(
            "this step works on a torch model, but the model is ONNX by now; "
            "put it before the convert and quantize steps",
            reason="MODEL_NOT_TORCH",
        )
    return model.form


def quantization_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """The manifest's `quantization` for a state dict: None for float tensors; the torchao
    scheme for the int8 weight-only tensors of `steps.quantize_torch` (the only ones made here)."""
    if not holds_torchao_tensors(state_dict):
        return None
    from importlib.metadata import version

    kinds = {type(t).__name__ for t in state_dict.values() if type(t).__module__.startswith("torchao.")}
    if kinds != {"Int8Tensor"}:
        raise FailedPrecondition(f"only torchao Int8Tensor weights can be packaged, not {sorted(kinds)}",
                                 reason="WEIGHT_SCHEME_UNSUPPORTED")
    return {"scheme": TORCHAO_INT8_WEIGHT_ONLY, "library": "torchao", "version": version("torchao")}


def write_package(model: ModelUnderCompression, path: Path) -> Path:
    """Write a torch-form model as a maas-package at `path` (atomically) and return `path`."""
    form = torch_form_of(model)
    state_dict = form.module.state_dict()
    manifest = ModelManifest(
        architecture=ArchitectureSpec(
            kind=form.architecture["kind"], hyperparameters=form.architecture["hyperparameters"]
        ),
        signature=_signature_spec(model.signature),
        preprocessing=model.preprocessing,
        labels=model.labels,
        framework=FrameworkInfo(name="torch", version=torch.__version__),
        quantization=quantization_of(state_dict),
    )
    save_torch_package(path, manifest, state_dict)
    return path


def module_inputs(preprocessing: Mapping[str, Any] | None, x: np.ndarray) -> torch.Tensor:
    """Client inputs as the module's first layer takes them (preprocessing applied)."""
    return torch.from_numpy(np.ascontiguousarray(apply_preprocessing(preprocessing, x)))


def predict_torch(
    form: TorchForm,
    x: np.ndarray,
    threads: int = 1,
    preprocessing: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Logits `[batch, num_classes]` for client inputs `x`, preprocessing applied first."""
    module = form.module.eval()
    outputs = []
    with torch_threads(threads), torch.inference_mode():
        for begin in range(0, max(len(x), 1), _PREDICTION_BATCH):
            batch = module_inputs(preprocessing, x[begin : begin + _PREDICTION_BATCH])
            outputs.append(module(batch).float().numpy())
    return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) over the state dict, buffers included; a torchao
    quantized weight counts its integer data."""
    tensors = [getattr(t, "qdata", t) for t in module.state_dict().values()]
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors)
    return total, nonzero
