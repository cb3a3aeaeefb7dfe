"""The quantize step: lower an ONNX graph's precision with `onnxruntime.quantization`.

A torch model is exported first (the convert step, fp32) and the graph is quantized: torch's
own quantized models cannot be exported or saved without pickle. Every path starts with
`quant_pre_process` (shape inference and graph optimisation; without it an exported LSTM is
left in fp32). The dtypes:

* int8, `dynamic`: weights int8, activation scales computed at run time (MatMul, Gemm, LSTM).
* int8, `static`: QDQ with per-channel int8 weights and uint8 activations whose ranges are
  calibrated on `calibration_samples` training examples (CNNs); `auto` picks static for a graph
  with a Conv and dynamic otherwise.
* int4: weight-only blocks of 4-bit integers (`MatMulNBits`) for MatMuls with a constant 2-D
  weight; Gemm nodes (how the exporter writes `nn.Linear`) are first rewritten into MatMul + Add
  so they qualify. A graph with no such MatMul is refused, saying why.
* fp16: all float weights and ops in half precision with float32 inputs and outputs. On a CPU
  it is slower than fp32 (casts, few fp16 kernels): it is meant for GPU Triton, and the report
  carries the measured latency ratio so nobody ships it to a CPU by mistake.
* bf16: weights stored as bfloat16 and cast to float32 in the graph (half the bytes, fp32
  compute; onnxruntime's CPU provider has no bfloat16 kernels for these ops).

The accuracy-aware mode follows Intel Neural Compressor's basic strategy: quantize everything,
measure accuracy on the evaluation split, and while the drop exceeds `tolerance`, keep layers
in float in the order of their sensitivity (how much accuracy keeping that one layer in float
recovers), until it fits. The report names the layers kept in float.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from maas_runtime.errors import FailedPrecondition, InvalidArgument
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxruntime.quantization.shape_inference import quant_pre_process

from maas_compressor.measure import accuracy, latency_ms
from maas_compressor.onnx_models import (
    onnx_parameter_counts,
    strip_exporter_metadata,
    torch_module_of,
)
from maas_compressor.steps.base import HfForm, ModelUnderCompression, OnnxForm, StepContext, StepResult
from maas_compressor.steps.convert import convert

DTYPES = ("int8", "int4", "fp16", "bf16")
MODES = ("dynamic", "static", "auto")
DEFAULT_CALIBRATION_SAMPLES = 256
DEFAULT_TOLERANCE = 0.005
CALIBRATION_BATCH = 32
INT4_BLOCK_SIZE = 32
LATENCY_BATCH = 32

# Ops whose presence means the graph is already quantized (or already half precision).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulNBits",
        "DynamicQuantizeLSTM",
        "QGemm",
    }
)
LOW_PRECISION_WEIGHT_TYPES = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
}
# The layers that carry weights and that the quantizers turn into integer kernels.
WEIGHTED_OPS = frozenset({"Conv", "MatMul", "Gemm", "LSTM", "GRU", "ConvTranspose"})
# bf16 storage is for weights; small float constants (scalars, shapes) stay as they are.
BF16_MIN_ELEMENTS = 16


@dataclass(frozen=True)
class QuantizeParameters:
    """The step's parameters, checked (field names as in the contract's QuantizeStep)."""

    dtype: str
    mode: str
    per_channel: bool
    calibration_samples: int
    accuracy_aware: bool
    tolerance: float


def _choice(params: Mapping[str, Any], key: str, choices: Sequence[str], default: str | None) -> str:
    value = params.get(key) or default
    if not isinstance(value, str) or value.lower() not in choices:
        raise InvalidArgument.for_field(key, f"{value!r} is not one of {', '.join(choices)}")
    return value.lower()


def parse_parameters(params: Mapping[str, Any]) -> QuantizeParameters:
    """The parameters with their defaults; InvalidArgument naming the field otherwise."""
    dtype = _choice(params, "dtype", DTYPES, None)
    mode = _choice(params, "mode", MODES, "auto")
    per_channel = params.get("per_channel")
    if per_channel is None:
        per_channel = True
    if not isinstance(per_channel, bool):
        raise InvalidArgument.for_field("per_channel", f"{per_channel!r} is not a boolean")
    samples = params.get("calibration_samples") or DEFAULT_CALIBRATION_SAMPLES
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise InvalidArgument.for_field("calibration_samples", f"{samples!r} is not a positive integer")
    accuracy_aware = bool(params.get("accuracy_aware", False))
    tolerance = params.get("tolerance")
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE
    if not isinstance(tolerance, int | float) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise InvalidArgument.for_field("tolerance", f"{tolerance!r} must be a fraction in [0, 1)")
    if accuracy_aware and dtype not in ("int8", "int4"):
        raise InvalidArgument.for_field(
            "accuracy_aware", f"accuracy-aware quantization applies to int8 and int4, not {dtype}"
        )
    return QuantizeParameters(dtype, mode, per_channel, samples, accuracy_aware, float(tolerance))


def quantization_already_applied(model: onnx.ModelProto) -> str | None:
    """Why the graph counts as quantized already, or None for a float graph."""
    quantized_ops = sorted({node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS})
    if quantized_ops:
        return f"the graph already has quantized ops ({', '.join(quantized_ops)})"
    for initializer in model.graph.initializer:
        kind = LOW_PRECISION_WEIGHT_TYPES.get(initializer.data_type)
        if kind is not None and len(initializer.dims) >= 2:
            return f"weight {initializer.name!r} is already {kind}"
    return None


def weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes with a constant weight input: the layers a quantizer may turn into integers."""
    initializers = {initializer.name for initializer in model.graph.initializer}
    return [
        node
        for node in model.graph.node
        if node.op_type in WEIGHTED_OPS and any(name in initializers for name in node.input[1:])
    ]


def layer_label(node: onnx.NodeProto) -> str:
    """`node_name (OpType, torch module)` for reports."""
    module = torch_module_of(node)
    return f"{node.name} ({node.op_type}{', ' + module if module else ''})"


class TrainingSampleReader(CalibrationDataReader):
    """Feeds the first `samples` training examples to the calibrator in small batches."""

    def __init__(self, input_name: str, train_x: np.ndarray, samples: int) -> None:
        self._input_name = input_name
        self._examples = np.ascontiguousarray(train_x[:samples], dtype=np.float32)
        self._batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def rewind(self) -> None:
        self._batches = iter(
            [
                self._examples[i : i + CALIBRATION_BATCH]
                for i in range(0, len(self._examples), CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def gemm_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrites `Gemm(x, W, b)` with a constant W (alpha = beta = 1, A not transposed) into
    `MatMul(x, W') + b`, in place, so the 4-bit MatMul quantizer can take the layer. Returns
    how many nodes were rewritten."""
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        attributes = {
            attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute
        }
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" else None
        if (
            weight is None
            or attributes.get("transA", 0)
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
            or len(weight.dims) != 2
        ):
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(weight)
        if attributes.get("transB", 0):
            matrix = matrix.T
        matmul_weight = f"{weight.name}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(matrix), matmul_weight))
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_product"
        matmul = onnx.helper.make_node(
            "MatMul", [node.input[0], matmul_weight], [product], name=f"{node.name}"
        )
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if product != node.output[0]:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    unused = [initializer for initializer in model.graph.initializer if initializer.name not in used]
    for initializer in unused:
        model.graph.initializer.remove(initializer)
    return rewritten


def bf16_weights(model: onnx.ModelProto) -> int:
    """Stores float32 weights as bfloat16 followed by a Cast back to float32, in place.
    Returns how many tensors were converted."""
    converted = 0
    casts = []
    for index, initializer in enumerate(list(model.graph.initializer)):
        if initializer.data_type != onnx.TensorProto.FLOAT or np.prod(initializer.dims) < BF16_MIN_ELEMENTS:
            continue
        weight_name = initializer.name  # read before CopyFrom renames the same message
        values = numpy_helper.to_array(initializer).astype(ml_dtypes.bfloat16)
        stored_name = f"{weight_name}_bf16"
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, stored_name))
        casts.append(
            onnx.helper.make_node(
                "Cast", [stored_name], [weight_name], to=onnx.TensorProto.FLOAT, name=f"{stored_name}_cast"
            )
        )
        converted += 1
    # Casts first: the node list must stay topologically sorted.
    nodes = [*casts, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return converted


class _Quantizer:
    """Writes quantized variants of one pre-processed graph, each excluding given nodes."""

    def __init__(
        self, source: OnnxForm, preprocessed: Path, settings: QuantizeParameters, mode: str, ctx: StepContext
    ):
        self.source = source
        self.preprocessed = preprocessed
        self.settings = settings
        self.mode = mode
        self.ctx = ctx
        self.input_name = onnx.load(str(preprocessed)).graph.input[0].name
        self.variants = 0

    def write(self, target: Path, nodes_to_exclude: Sequence[str]) -> OnnxForm:
        settings = self.settings
        if settings.dtype == "int8" and self.mode == "dynamic":
            quantize_dynamic(
                self.preprocessed,
                target,
                weight_type=QuantType.QInt8,
                per_channel=settings.per_channel,
                nodes_to_exclude=list(nodes_to_exclude),
            )
        elif settings.dtype == "int8":
            quantize_static(
                self.preprocessed,
                target,
                TrainingSampleReader(self.input_name, self.ctx.data.train_x, settings.calibration_samples),
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        else:  # int4
            graph = onnx.load(str(self.preprocessed))
            quantizer = MatMulNBitsQuantizer(
                graph,
                block_size=INT4_BLOCK_SIZE,
                is_symmetric=True,
                nodes_to_exclude=list(nodes_to_exclude),
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(target))
        self.variants += 1
        return OnnxForm(path=target, opset=self.source.opset)


def resolve_mode(settings: QuantizeParameters, graph: onnx.ModelProto) -> str:
    """`static` or `dynamic` for int8 (auto: static when the graph has a Conv); the float and
    int4 paths only touch weights."""
    if settings.dtype in ("fp16", "bf16"):
        return "weights"
    if settings.dtype == "int4":
        return "weight-only"
    if settings.mode != "auto":
        return settings.mode
    return "static" if any(node.op_type == "Conv" for node in graph.graph.node) else "dynamic"


def _preprocess(source: OnnxForm, workdir: Path, mode: str) -> Path:
    """`quant_pre_process` into the work directory; for the MatMul quantizers (dynamic int8,
    int4) Gemm nodes are rewritten into MatMul + Add first: the 4-bit quantizer takes only
    MatMul, and the dynamic one would split a Gemm itself under a new node name that its
    `nodes_to_exclude` no longer matches."""
    preprocessed = workdir / f"{source.path.stem}-preprocessed.onnx"
    try:
        quant_pre_process(str(source.path), str(preprocessed))
    except Exception as error:  # shape inference raises many unrelated types
        raise FailedPrecondition(f"onnxruntime's quantization pre-processing failed: {error}",
                                 reason="QUANTIZATION_PREPROCESS_FAILED") from error
    if mode in ("dynamic", "weight-only"):
        graph = onnx.load(str(preprocessed))
        if gemm_as_matmul(graph):
            onnx.save(graph, str(preprocessed))
    return preprocessed


def _accuracy_aware(
    quantizer: _Quantizer,
    target: Path,
    baseline_accuracy: float,
    evaluate: Callable[[OnnxForm], float],
) -> tuple[OnnxForm, list[str], dict[str, float]]:
    """INC's basic strategy: everything quantized, then layers kept in float by sensitivity."""
    settings, ctx = quantizer.settings, quantizer.ctx
    quantized = quantizer.write(target, [])
    quantized_accuracy = evaluate(quantized)
    ctx.log(
        f"quantize: all layers quantized, accuracy {quantized_accuracy:.4f} (fp32 {baseline_accuracy:.4f})"
    )
    if baseline_accuracy - quantized_accuracy <= settings.tolerance:
        return quantized, [], {}
    candidates = weighted_nodes(onnx.load(str(quantizer.preprocessed)))
    probe_dir = ctx.workdir / "sensitivity"
    probe_dir.mkdir(exist_ok=True)
    sensitivity: dict[str, float] = {}
    for node in candidates:
        probe = quantizer.write(probe_dir / f"{len(sensitivity)}.onnx", [node.name])
        sensitivity[node.name] = evaluate(probe) - quantized_accuracy
        ctx.log(f"quantize: {layer_label(node)} in float recovers {sensitivity[node.name]:+.4f}")
    shutil.rmtree(probe_dir, ignore_errors=True)
    # Most sensitive first; among equals, the graph order (stable sort) keeps runs repeatable.
    ranked = sorted(candidates, key=lambda node: -sensitivity[node.name])
    kept_in_float: list[str] = []
    for node in ranked:
        kept_in_float.append(node.name)
        quantized = quantizer.write(target, kept_in_float)
        quantized_accuracy = evaluate(quantized)
        ctx.log(f"quantize: {len(kept_in_float)} layer(s) in float, accuracy {quantized_accuracy:.4f}")
        if baseline_accuracy - quantized_accuracy <= settings.tolerance:
            break
    return quantized, kept_in_float, sensitivity


def _weight_dtypes(form: OnnxForm) -> dict[str, int]:
    counts: dict[str, int] = {}
    for initializer in onnx.load(str(form.path)).graph.initializer:
        if len(initializer.dims) >= 2:
            name = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type).name
            name = LOW_PRECISION_WEIGHT_TYPES.get(initializer.data_type, name)
            counts[name] = counts.get(name, 0) + 1
    return counts


def quantize(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """Quantizes the model's ONNX graph (a torch model is converted first); see module doc."""
    if isinstance(model.form, HfForm):
        from maas_compressor.steps.transformer import quantize_hf
        return quantize_hf(model, params, ctx)
    if params.get("format") == "torch":
        from maas_compressor.steps.quantize_torch import quantize_torch
        return quantize_torch(model, params, ctx)
    if params.get("format") not in (None, "", "onnx"):
        raise InvalidArgument.for_field("format", f"{params['format']!r}: a classifier is quantized "
                                        "in format onnx or torch (auto picks between a sentence "
                                        "encoder's two)")
    settings = parse_parameters(params)
    details: dict[str, Any] = {"dtype": settings.dtype}
    if not isinstance(model.form, OnnxForm):
        converted = convert(model, {}, ctx)
        model = converted.model
        details["converted"] = converted.details
    source = model.form
    if not isinstance(source, OnnxForm):
        raise FailedPrecondition("quantize works on an ONNX graph; the conversion returned none",
                                 reason="MODEL_NOT_ONNX")
    already = quantization_already_applied(onnx.load(str(source.path)))
    if already:
        raise FailedPrecondition(f"the model is already quantized: {already}", reason="ALREADY_QUANTIZED")
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    mode = resolve_mode(settings, onnx.load(str(source.path)))
    details["mode"] = mode
    preprocessed = _preprocess(source, ctx.workdir, mode)
    eval_x, eval_y = ctx.data.eval_x, ctx.data.eval_y
    onnx_model = model

    def accuracy_of(form: OnnxForm) -> float:
        return accuracy(onnx_model.with_form(form), eval_x, eval_y)

    def latency_of(form: OnnxForm) -> float:
        return latency_ms(onnx_model.with_form(form), eval_x, LATENCY_BATCH)

    baseline_accuracy = accuracy_of(source)
    target = ctx.workdir / f"{source.path.stem}-{settings.dtype}.onnx"

    if settings.dtype in ("fp16", "bf16"):
        quantized = _half_precision(preprocessed, target, source, settings.dtype)
        fp32_ms, half_ms = latency_of(source), latency_of(quantized)
        details.update(
            {
                f"latency_ms_fp32_batch{LATENCY_BATCH}": fp32_ms,
                f"latency_ms_{settings.dtype}_batch{LATENCY_BATCH}": half_ms,
                f"latency_ratio_{settings.dtype}_to_fp32": half_ms / fp32_ms,
            }
        )
        ctx.log(
            f"quantize: {settings.dtype} takes {half_ms / fp32_ms:.2f}× the fp32 time on this CPU (batch 32)"
        )
    else:
        quantizer = _Quantizer(source, preprocessed, settings, mode, ctx)
        if settings.accuracy_aware:
            quantized, kept_in_float, sensitivity = _accuracy_aware(
                quantizer, target, baseline_accuracy, accuracy_of
            )
            labels = {node.name: layer_label(node) for node in weighted_nodes(onnx.load(str(preprocessed)))}
            details.update(
                {
                    "tolerance": settings.tolerance,
                    "layers_kept_in_float": [labels[name] for name in kept_in_float],
                    "sensitivity": {labels[name]: value for name, value in sensitivity.items()},
                    "quantization_trials": quantizer.variants,
                }
            )
        else:
            quantized = quantizer.write(target, [])
        if settings.dtype == "int4" and not any(
            node.op_type == "MatMulNBits" for node in onnx.load(str(quantized.path)).graph.node
        ):
            ops = sorted({node.op_type for node in weighted_nodes(onnx.load(str(preprocessed)))})
            raise FailedPrecondition(
                "int4 is weight-only for MatMul layers with a constant 2-D weight, and this graph has "
                f"none (its weighted layers: {', '.join(ops) or 'none'}); use int8 instead",
                reason="INT4_NOT_APPLICABLE",
            )
        if settings.dtype == "int8":
            details.update({"per_channel": settings.per_channel})
            if quantizer.mode == "static":
                details["calibration_samples"] = min(settings.calibration_samples, len(ctx.data.train_x))

    strip_exporter_metadata(quantized.path)
    quantized_accuracy = accuracy_of(quantized)
    parameters, nonzero = onnx_parameter_counts(quantized)
    details.update(
        {
            "accuracy_fp32": baseline_accuracy,
            "accuracy_quantized": quantized_accuracy,
            "accuracy_drop": baseline_accuracy - quantized_accuracy,
            "weight_dtypes": _weight_dtypes(quantized),
            "bytes_before": source.path.stat().st_size,
            "bytes_after": quantized.path.stat().st_size,
            "size_ratio": quantized.path.stat().st_size / source.path.stat().st_size,
            "parameters": parameters,
            "nonzero_parameters": nonzero,
        }
    )
    ctx.log(
        f"quantize: {settings.dtype} ({details['mode']}) accuracy {baseline_accuracy:.4f} → "
        f"{quantized_accuracy:.4f}, size ×{details['size_ratio']:.2f}"
    )
    return StepResult(model=model.with_form(quantized), details=details)


def _half_precision(preprocessed: Path, target: Path, source: OnnxForm, dtype: str) -> OnnxForm:
    graph = onnx.load(str(preprocessed))
    if dtype == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        graph = convert_float_to_float16(graph, keep_io_types=True)
    else:
        bf16_weights(graph)
    onnx.save(graph, str(target))
    return OnnxForm(path=target, opset=source.opset)
