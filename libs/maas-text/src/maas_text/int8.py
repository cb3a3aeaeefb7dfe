"""Int8 encoders for torch: int8 Linear layers and embedding tables, stored as plain data.

The compressor's torch int8 path writes an encoder directory that keeps config.json, the
tokenizer and model.safetensors, plus `maas_quantization.json`: the scheme and, per layer it
quantized, the layer's kind (`linear` or `embedding`). A quantized layer `name` stores
`name.weight_int8` (int8, one row per output channel or table row) and `name.weight_scale`
(float32, one per row) instead of `name.weight`: symmetric, zero point 0, each row's scale its
largest magnitude over 127. Every other tensor is the float encoder's own. Nothing is pickled;
the loader checks the manifest against the module tree and the tensors before it builds a
layer, and refuses a directory whose parts disagree, naming what is wrong.

At run time a Linear's weight is prepacked once for torch's quantized CPU kernels
(`torch.ops.quantized.linear_prepack`, with the oneDNN engine where torch has it: on CPUs with
AVX-512 VNNI or AMX its int8 GEMM is several times faster than the other engines'), and each
call quantizes its input per tensor at run time over the full 8-bit range (`linear_dynamic`;
torch's deprecated `quantize_dynamic` picks a 7-bit range, which costs MiniLM 0.02 of mean
cosine). An embedding gathers int8 rows and scales only those. The engine is chosen for the
prepacking only; the process-wide setting is restored.

The prepacking takes a quantized weight tensor (`torch.quantize_per_channel`), which torch 2.13
warns is deprecated; the suite pins torch 2.13.0 and the warning is silenced where it is made.
The way forward when torch drops those tensors is oneDNN's `qlinear_prepack` and
`qlinear_pointwise` on plain int8 data with the activations quantized in the module: measured
here it gives the same results and took 1.2-1.4× the time of `linear_dynamic` per layer
(quantizing the activations takes four element-wise passes instead of one fused one), so it
is not the default while the faster kernel exists. The stored format does not change.

torch, safetensors and transformers are imported when a model is quantized or loaded.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from maas_runtime.errors import InvalidArgument

QUANTIZATION_FILE = "maas_quantization.json"
SCHEME = "int8-symmetric-per-row"
LINEAR = "linear"
EMBEDDING = "embedding"
KINDS = (LINEAR, EMBEDDING)
INT8_SUFFIX = ".weight_int8"
SCALE_SUFFIX = ".weight_scale"
# Engines for prepacking, fastest first where torch has them (qnnpack: ARM).
PACKING_ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")


def read_manifest(directory: Path, field_path: str = "directory") -> dict[str, str] | None:
    """Layer name → kind from the directory's `maas_quantization.json`, or None for a float
    encoder; InvalidArgument naming the file when it is not a manifest of this scheme."""
    path = directory / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidArgument.for_field(field_path, f"{QUANTIZATION_FILE} is not valid JSON ({error})",
                                        reason="INT8_ENCODER_INVALID") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("scheme") != SCHEME:
        scheme = manifest.get("scheme") if isinstance(manifest, dict) else None
        raise InvalidArgument.for_field(field_path, f"{QUANTIZATION_FILE} names scheme {scheme!r}; "
                                        f"this release reads {SCHEME!r}", reason="INT8_ENCODER_INVALID")
    if (not isinstance(layers, dict) or not layers
            or not all(isinstance(name, str) and kind in KINDS for name, kind in layers.items())):
        raise InvalidArgument.for_field(field_path, f"{QUANTIZATION_FILE}'s layers must map each layer "
                                        f"name to one of {', '.join(KINDS)}", reason="INT8_ENCODER_INVALID")
    return dict(layers)


def quantizable_layers(model: Any) -> dict[str, str]:
    """Layer name → kind of every Linear layer and embedding table of a float torch model."""
    import torch

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = LINEAR
        elif isinstance(module, torch.nn.Embedding):
            layers[name] = EMBEDDING
    return layers


def quantize_rows(weight: Any) -> tuple[Any, Any]:
    """Int8 rows and their float32 scales: symmetric, each row's largest magnitude at 127."""
    import torch

    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    values = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return values.contiguous(), scale.contiguous()


def save_int8(model: Any, layers: Sequence[str], directory: Path) -> dict[str, str]:
    """Writes `model` (float) into `directory` with `layers` quantized: model.safetensors and
    the manifest; returns the manifest's layers. The model itself is left unchanged."""
    from safetensors.torch import save_file

    kinds = quantizable_layers(model)
    unknown = sorted(set(layers) - set(kinds))
    if unknown:
        raise ValueError(f"not Linear or Embedding layers of the model: {', '.join(unknown)}")
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    for name in layers:
        values, scale = quantize_rows(state.pop(f"{name}.weight"))
        state[f"{name}{INT8_SUFFIX}"], state[f"{name}{SCALE_SUFFIX}"] = values, scale
    manifest = {name: kinds[name] for name in layers}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "scheme": SCHEME})
    (directory / QUANTIZATION_FILE).write_text(
        json.dumps({"scheme": SCHEME, "layers": manifest}, indent=2) + "\n", encoding="utf-8")
    return manifest


@contextlib.contextmanager
def _packing_engine() -> Iterator[None]:
    import torch

    engines = torch.backends.quantized.supported_engines
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = next(e for e in PACKING_ENGINES if e in engines)
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _int8_linear(values: Any, scale: Any, bias: Any) -> Any:
    import torch

    class Int8Linear(torch.nn.Module):
        """y = x Wᵀ + b with W int8 per output channel and x quantized per call."""

        def __init__(self) -> None:
            super().__init__()
            self.out_features, self.in_features = values.shape
            with warnings.catch_warnings():  # see the module doc on quantized tensors
                warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
                weight = torch.quantize_per_channel(
                    values.float() * scale[:, None], scale.double(),
                    torch.zeros(len(scale), dtype=torch.int64), 0, torch.qint8)
            with _packing_engine():
                self._packed = torch.ops.quantized.linear_prepack(weight, bias)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(inputs, self._packed, False)

    return Int8Linear()


def _int8_embedding(values: Any, scale: Any) -> Any:
    import torch

    class Int8Embedding(torch.nn.Module):
        """Rows of an int8 table, each scaled back to float when it is gathered."""

        def __init__(self) -> None:
            super().__init__()
            self.num_embeddings, self.embedding_dim = values.shape
            self._values, self._scale = values, scale

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self._values[ids].to(torch.float32) * self._scale[ids].unsqueeze(-1)

    return Int8Embedding()


def _invalid(field_path: str, message: str) -> InvalidArgument:
    return InvalidArgument.for_field(field_path, message, reason="INT8_ENCODER_INVALID")


def _int8_parts(tensors: dict[str, Any], name: str, rows: int, columns: int,
                field_path: str) -> tuple[Any, Any]:
    import torch

    values, scale = tensors.pop(f"{name}{INT8_SUFFIX}", None), tensors.pop(f"{name}{SCALE_SUFFIX}", None)
    if values is None or scale is None:
        raise _invalid(field_path, f"model.safetensors lacks {name}{INT8_SUFFIX} or {name}{SCALE_SUFFIX}")
    if (values.dtype != torch.int8 or tuple(values.shape) != (rows, columns)
            or scale.dtype != torch.float32 or tuple(scale.shape) != (rows,)):
        raise _invalid(field_path, f"{name}: int8 [{rows}, {columns}] and float32 [{rows}] expected, found "
                       f"{values.dtype} {list(values.shape)} and {scale.dtype} {list(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise _invalid(field_path, f"{name}{SCALE_SUFFIX} holds scales that are not positive and finite")
    return values, scale


def load_int8_encoder(directory: Path, layers: Mapping[str, str], field_path: str = "directory") -> Any:
    """The torch encoder of an int8 directory (`layers` from `read_manifest`), in eval mode."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    model = AutoModel.from_config(config).eval()
    tensors = load_file(str(directory / "model.safetensors"))
    modules = dict(model.named_modules())
    for name, kind in layers.items():
        module = modules.get(name)
        expected = torch.nn.Linear if kind == LINEAR else torch.nn.Embedding
        if not isinstance(module, expected):
            raise _invalid(field_path, f"{QUANTIZATION_FILE} names {name!r} as {kind}, and the "
                           f"{config.model_type} model has no such layer")
        rows, columns = module.weight.shape
        values, scale = _int8_parts(tensors, name, rows, columns, field_path)
        if kind == LINEAR:
            expected_bias: Any = module.bias
            bias = tensors.pop(f"{name}.bias", None) if expected_bias is not None else None
            if expected_bias is not None and (bias is None or bias.shape != expected_bias.shape):
                raise _invalid(field_path, f"model.safetensors lacks {name}.bias of shape "
                               f"{list(expected_bias.shape)}")
            replacement = _int8_linear(values, scale, None if bias is None else bias.float())
        else:
            replacement = _int8_embedding(values, scale)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, replacement)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        raise _invalid(field_path, f"model.safetensors does not match the encoder: {error}") from None
    if missing or unexpected:
        parts = [f"missing {', '.join(sorted(missing))}" if missing else "",
                 f"unexpected {', '.join(sorted(unexpected))}" if unexpected else ""]
        raise _invalid(field_path, f"model.safetensors does not match the int8 encoder: "
                       f"{'; '.join(p for p in parts if p)}")
    return model
