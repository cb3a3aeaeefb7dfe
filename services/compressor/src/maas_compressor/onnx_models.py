"""ONNX models in a compression job: load a source ONNX file, run it in onnxruntime, count it.

An `OnnxForm` graph takes the signature's raw inputs: `convert` bakes the manifest's
preprocessing into the graph, so the served ONNX file and the torch package give the same
outputs for the same request. Predictions run on onnxruntime's CPU provider with a fixed
number of threads (measurements compare single-thread latencies); sessions are cached per
file (path, size and modification time, so a rewritten file gets a new session) and thread
count.
"""

from __future__ import annotations

import ast
import functools
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from maas_formats.manifest import ModelSignature
from maas_runtime.errors import FailedPrecondition
from onnx import numpy_helper

from maas_compressor.steps.base import ModelUnderCompression, OnnxForm

ONNX_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

# Inputs (by position) that hold quantization bookkeeping rather than weights: scales and
# zero points. They are not parameters of the model the user trained.
_QUANTIZATION_BOOKKEEPING_INPUTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "DynamicQuantizeLinear": frozenset(),
    "MatMulInteger": frozenset({2, 3}),
    "ConvInteger": frozenset({2, 3}),
    "MatMulNBits": frozenset({2, 3, 4}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "DynamicQuantizeLSTM": frozenset(range(8, 14)),
}
# Integer initializers of other roles (shapes, axes, indices) are not parameters either.
_WEIGHT_ELEMENT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
    }
)
_MATMUL_NBITS_DEFAULT_ZERO_POINT = {4: 8, 8: 128, 2: 2}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ONNX_DEFAULT_DOMAINS:
            return int(entry.version)
    raise FailedPrecondition("the ONNX model imports no opset of the default domain",
                             reason="ONNX_OPSET_MISSING")


def strip_exporter_metadata(path: Path) -> None:
    """Drops the exporter's per-node debugging metadata (fx nodes, stack traces with this
    machine's paths, class hierarchies) from the file, in place: it is most of a small
    model's bytes and nothing a runtime reads. The torch module path of each node
    (`NAME_SCOPES_KEY`) stays, for reports that name layers."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key == NAME_SCOPES_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        node.doc_string = ""
    onnx.save(model, str(path))


def torch_module_of(node: onnx.NodeProto) -> str:
    """The torch module a node was exported from (e.g. `features.0`), or "" when unknown."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # The last scope is the aten op (`conv2d`); the one before it is the module.
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    return ""


def load_onnx(path: Path, signature: ModelSignature, workdir: Path) -> ModelUnderCompression:
    """A source ONNX version as the pipeline's model: copied into the job's work directory,
    checked, and its graph's input and output names matched against the signature (the
    serving path feeds tensors by these names)."""
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / "source.onnx"
    shutil.copyfile(path, target)
    try:
        model = onnx.load(str(target), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises several unrelated types for a bad file
        raise FailedPrecondition(f"the source is not a valid ONNX model: {error}",
                                 reason="ONNX_MODEL_INVALID") from error
    graph_inputs = [value.name for value in model.graph.input if value.name not in _initializer_names(model)]
    graph_outputs = [value.name for value in model.graph.output]
    expected_inputs = [tensor.name for tensor in signature.inputs]
    expected_outputs = [tensor.name for tensor in signature.outputs]
    if graph_inputs != expected_inputs or graph_outputs != expected_outputs:
        raise FailedPrecondition(
            f"the ONNX graph's inputs {graph_inputs} and outputs {graph_outputs} do not match "
            f"the signature's {expected_inputs} and {expected_outputs}",
            reason="ONNX_SIGNATURE_MISMATCH",
        )
    return ModelUnderCompression(form=OnnxForm(path=target, opset=default_opset(model)), signature=signature)


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {initializer.name for initializer in model.graph.initializer}


@functools.lru_cache(maxsize=16)
def _session(path: str, size: int, modified_ns: int, threads: int) -> onnxruntime.InferenceSession:
    del size, modified_ns  # part of the cache key only: a rewritten file is a new session
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    return onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_session(form: OnnxForm, threads: int = 1) -> onnxruntime.InferenceSession:
    """The cached CPU session for the form's file with `threads` intra-op threads."""
    stat = form.path.stat()
    return _session(str(form.path.resolve()), stat.st_size, stat.st_mtime_ns, threads)


def predict_onnx(form: OnnxForm, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """The model's first output (logits, float32) for the raw inputs `x` (batch first)."""
    session = onnx_session(form, threads)
    model_input = session.get_inputs()[0]
    (outputs,) = session.run(
        [session.get_outputs()[0].name], {model_input.name: np.ascontiguousarray(x, np.float32)}
    )
    return np.asarray(outputs, dtype=np.float32)


def _bookkeeping_initializers(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        positions = _QUANTIZATION_BOOKKEEPING_INPUTS.get(node.op_type, frozenset())
        names.update(name for index, name in enumerate(node.input) if index in positions and name)
        # Dynamic quantization rescales MatMulInteger's result by `<weight>_scale` in a Mul.
        if node.op_type == "Mul":
            names.update(name for name in node.input if name.endswith("_scale"))
    return names


def _matmul_nbits_weights(nodes: Iterable[onnx.NodeProto]) -> dict[str, tuple[int, int, int, bool]]:
    """Packed MatMulNBits weights: name -> (K, N, bits, has explicit zero points)."""
    packed: dict[str, tuple[int, int, int, bool]] = {}
    for node in nodes:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {
            attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute
        }
        has_zero_points = len(node.input) > 3 and bool(node.input[3])
        packed[node.input[1]] = (
            int(attributes["K"]),
            int(attributes["N"]),
            int(attributes.get("bits", 4)),
            has_zero_points,
        )
    return packed


def _unpack_low_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    values = packed.astype(np.uint8).reshape(-1)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return np.stack([(values >> (bits * i)) & mask for i in range(per_byte)], axis=-1).reshape(-1)


def onnx_parameter_counts(form: OnnxForm) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the graph's weights, counted in their stored
    elements whatever their type (an int8 or int4 weight counts as much as a float one);
    scales, zero points and integer shape constants are not parameters."""
    model = onnx.load(str(form.path))
    nodes = list(model.graph.node)
    bookkeeping = _bookkeeping_initializers(nodes)
    packed = _matmul_nbits_weights(nodes)
    dequantized = {node.input[0] for node in nodes if node.op_type == "DequantizeLinear"}
    parameters = nonzero = 0
    for initializer in model.graph.initializer:
        if initializer.name in bookkeeping:
            continue
        if initializer.name in packed:
            rows, columns, bits, has_zero_points = packed[initializer.name]
            # Stored as (N, blocks, block bytes); padding past K in each column is not a weight.
            codes = _unpack_low_bits(numpy_helper.to_array(initializer), bits).reshape(columns, -1)[:, :rows]
            parameters += rows * columns
            # Without explicit zero points the code for 0.0 is the midpoint; with them a zero
            # code count would be a guess, so every weight counts as non-zero.
            if has_zero_points:
                nonzero += rows * columns
            else:
                nonzero += int(np.count_nonzero(codes != _MATMUL_NBITS_DEFAULT_ZERO_POINT.get(bits, 8)))
            continue
        # A scalar is a constant of the graph (a preprocessing scale), not a weight; a static
        # quantizer's int32 bias is a weight (it feeds a DequantizeLinear).
        is_weight = initializer.data_type in _WEIGHT_ELEMENT_TYPES or initializer.name in dequantized
        if not is_weight or not initializer.dims:
            continue
        values = numpy_helper.to_array(initializer)
        parameters += int(values.size)
        nonzero += int(np.count_nonzero(values))
    return parameters, nonzero
