"""The quantize step's torch path: torchao int8 weight-only on a zoo model's Linear layers.

Chosen with `format: "torch"` (dtype int8) where a torch artifact is wanted rather than the
ONNX graph the default path produces. `quantize_(module, Int8WeightOnlyConfig())` replaces each
`nn.Linear` weight by a torchao `Int8Tensor` (int8 data, one scale per output row); Conv layers
and biases stay float. The result stays a `TorchForm`, and the package writer stores the int8
data and scales through torchao's safetensors support (no pickle), the manifest's
`quantization` naming the scheme so every loader rebuilds the same tensors.

torchao is imported inside the function: importing it loads (and on a CPU, fails to load, with
harmless warnings) its CUDA kernels, which the ONNX path has no business paying for.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from maas_formats.torch_io import TORCHAO_INT8_WEIGHT_ONLY, holds_torchao_tensors
from maas_runtime.errors import FailedPrecondition, InvalidArgument

from maas_compressor.measure import accuracy
from maas_compressor.steps.base import ModelUnderCompression, StepContext, StepResult, TorchForm
from maas_compressor.torch_models import count_parameters, torch_form_of

TORCH_FORMAT = "torch"


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the stored tensors; a torchao tensor counts its parts (int8 data, scales)."""
    total = 0
    for tensor in module.state_dict().values():
        parts = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", ())]
        for part in parts or [tensor]:
            total += part.numel() * part.element_size()
    return total


def quantize_torch(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """int8 weight-only quantization of every `nn.Linear` with torchao; see the module doc."""
    dtype = params.get("dtype")
    if dtype != "int8":
        raise InvalidArgument.for_field(
            "dtype", f"format {TORCH_FORMAT!r} quantizes to int8 (torchao weight-only), not {dtype!r}"
        )
    form = torch_form_of(model)
    if holds_torchao_tensors(form.module.state_dict()):
        raise FailedPrecondition(
            "the model is already quantized (torchao tensors)", reason="ALREADY_QUANTIZED"
        )
    linear_layers = [
        name for name, layer in form.module.named_modules() if isinstance(layer, torch.nn.Linear)
    ]
    if not linear_layers:
        raise FailedPrecondition("torchao int8 weight-only quantizes Linear layers, and this model has none",
                                 reason="NO_LINEAR_LAYERS")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    module = copy.deepcopy(form.module).eval()
    quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda layer, _: isinstance(layer, torch.nn.Linear))
    quantized = model.with_form(TorchForm(module=module, architecture=form.architecture))
    accuracy_fp32 = accuracy(model, ctx.data.eval_x, ctx.data.eval_y)
    accuracy_int8 = accuracy(quantized, ctx.data.eval_x, ctx.data.eval_y)
    bytes_before, bytes_after = _state_bytes(form.module), _state_bytes(module)
    parameters, nonzero = count_parameters(module)
    details = {
        "dtype": "int8",
        "format": TORCH_FORMAT,
        "mode": "weight-only",
        "scheme": TORCHAO_INT8_WEIGHT_ONLY,
        "layers_quantized": linear_layers,
        "accuracy_fp32": accuracy_fp32,
        "accuracy_quantized": accuracy_int8,
        "accuracy_drop": accuracy_fp32 - accuracy_int8,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "size_ratio": bytes_after / bytes_before,
        "parameters": parameters,
        "nonzero_parameters": nonzero,
    }
    ctx.log(
        f"quantize: torchao int8 weight-only on {len(linear_layers)} Linear layer(s), accuracy "
        f"{accuracy_fp32:.4f} → {accuracy_int8:.4f}, weights ×{details['size_ratio']:.2f}"
    )
    return StepResult(model=quantized, details=details)
