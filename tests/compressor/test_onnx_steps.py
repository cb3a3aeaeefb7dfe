"""The ONNX steps on real zoo models trained for seconds on digits: convert (dynamo export
verified in onnxruntime), quantize to int8 dynamic and static, int4, fp16 and bf16, the
accuracy-aware mode, and the refusals (unexportable model, already quantized, no MatMul for
int4, bad parameters)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from maas_compressor.measure import accuracy, predict
from maas_compressor.onnx_models import load_onnx, onnx_parameter_counts, predict_onnx
from maas_compressor.steps.base import ModelUnderCompression, OnnxForm, TorchForm
from maas_compressor.steps.convert import convert
from maas_compressor.steps.quantize import quantize
from maas_compressor.torch_models import count_parameters
from maas_runtime.errors import FailedPrecondition, InvalidArgument

from tests.compressor import torch_helpers
from tests.compressor.torch_helpers import (
    DIGITS_SIGNATURE,
    RecordingContext,
    copy_of,
    trained_model_fixture,
)

CNN = {"channels": [8, 16]}
MLP = {"hidden_sizes": [64]}
SMALL_DROP = 0.02
"""int8 on a digits model loses at most a couple of examples in a hundred."""


# The step tests' shared fixtures, by name (one_torch_thread is autouse).
one_torch_thread = torch_helpers.one_torch_thread
data = torch_helpers.data
context = torch_helpers.context
trained_mlp = trained_model_fixture("mlp", MLP, epochs=8)
trained_cnn = trained_model_fixture("cnn", CNN, epochs=6)


@pytest.fixture(scope="module")
def onnx_mlp(trained_mlp, data, tmp_path_factory) -> ModelUnderCompression:
    return convert(trained_mlp, {}, RecordingContext(data=data, workdir=tmp_path_factory.mktemp("x"))).model


@pytest.fixture(scope="module")
def onnx_cnn(trained_cnn, data, tmp_path_factory) -> ModelUnderCompression:
    return convert(trained_cnn, {}, RecordingContext(data=data, workdir=tmp_path_factory.mktemp("x"))).model


def weight_dtypes(form: OnnxForm) -> set[int]:
    """Element types of the graph's weight matrices and kernels (initializers of rank ≥ 2)."""
    return {init.data_type for init in onnx.load(str(form.path)).graph.initializer if len(init.dims) >= 2}


def op_types(form: OnnxForm) -> set[str]:
    return {node.op_type for node in onnx.load(str(form.path)).graph.node}


def test_convert_exports_what_torch_computes_with_the_signature_names_and_a_dynamic_batch(
    trained_cnn, data, context
):
    result = convert(trained_cnn, {"opset": 18}, context)

    assert isinstance(result.model.form, OnnxForm)
    assert result.details["opset"] == result.model.form.opset == 18
    assert result.details["max_abs_difference"] < 1e-4
    assert result.details["argmax_agreement"] == 1.0
    graph = onnx.load(str(result.model.form.path)).graph
    assert [value.name for value in graph.input] == ["input"]
    assert [value.name for value in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    # Raw pixels in, as a client sends them: the manifest's scale is in the graph.
    assert result.details["preprocessing_in_graph"] is True
    for batch in (1, 7):
        raw = data.eval_x[:batch]
        np.testing.assert_allclose(predict_onnx(result.model.form, raw), predict(trained_cnn, raw), atol=1e-4)


def test_convert_refuses_an_opset_the_exporter_cannot_write(trained_mlp, context):
    with pytest.raises(InvalidArgument) as refused:
        convert(trained_mlp, {"opset": 11}, context)
    assert refused.value.field_violations[0].field == "opset"


class DataDependentBranch(torch.nn.Module):
    """A model whose control flow depends on the input values: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.sum() > 0:
            return self.linear(inputs)
        return -self.linear(inputs)


def test_a_model_with_data_dependent_control_flow_fails_with_the_exporters_reason(context):
    model = ModelUnderCompression(
        TorchForm(DataDependentBranch().eval(), {"kind": "custom"}), DIGITS_SIGNATURE
    )
    with pytest.raises(FailedPrecondition) as refused:
        convert(model, {}, context)
    assert refused.value.reason == "ONNX_EXPORT_FAILED"
    assert "data-dependent" in refused.value.message
    assert "inputs.sum() > 0" in refused.value.message  # the line of the model that cannot export


def test_int8_dynamic_stores_int8_weights_in_a_smaller_file_and_keeps_the_accuracy(onnx_mlp, context):
    result = quantize(onnx_mlp, {"dtype": "int8", "mode": "dynamic"}, context)

    form = result.model.form
    assert isinstance(form, OnnxForm)
    assert weight_dtypes(form) == {onnx.TensorProto.INT8}
    assert "MatMulInteger" in op_types(form) or "DynamicQuantizeMatMul" in op_types(form)
    assert form.path.stat().st_size < 0.5 * onnx_mlp.form.path.stat().st_size
    assert result.details["accuracy_drop"] <= SMALL_DROP
    assert result.details["mode"] == "dynamic"
    # Counting elements: an int8 weight is as much a parameter as the float one it replaced.
    assert onnx_parameter_counts(form)[0] == onnx_parameter_counts(onnx_mlp.form)[0]  # type: ignore[arg-type]


def test_the_float_graph_has_as_many_parameters_as_the_torch_module(trained_mlp, onnx_mlp):
    assert isinstance(trained_mlp.form, TorchForm)
    assert onnx_parameter_counts(onnx_mlp.form) == count_parameters(trained_mlp.form.module)  # type: ignore[arg-type]


def test_int8_static_on_a_cnn_is_qdq_with_per_channel_int8_weights_calibrated_on_training_data(
    onnx_cnn, context
):
    result = quantize(onnx_cnn, {"dtype": "int8", "calibration_samples": 128}, context)

    form = result.model.form
    assert isinstance(form, OnnxForm)
    assert result.details["mode"] == "static"  # auto: the graph has a Conv
    assert result.details["calibration_samples"] == 128
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(form)
    assert weight_dtypes(form) == {onnx.TensorProto.INT8}
    conv_scales = [
        init for init in onnx.load(str(form.path)).graph.initializer if init.name.endswith("weight_scale")
    ]
    assert any(scale.dims and scale.dims[0] > 1 for scale in conv_scales)  # one scale per channel
    assert form.path.stat().st_size < onnx_cnn.form.path.stat().st_size
    assert result.details["accuracy_drop"] <= SMALL_DROP


def test_int4_packs_the_matmul_weights_into_four_bit_blocks(onnx_mlp, context):
    int8 = quantize(onnx_mlp, {"dtype": "int8", "mode": "dynamic"}, context)
    result = quantize(onnx_mlp, {"dtype": "int4"}, context)

    form = result.model.form
    assert isinstance(form, OnnxForm)
    assert "MatMulNBits" in op_types(form)
    assert form.path.stat().st_size < int8.model.form.path.stat().st_size  # type: ignore[union-attr]
    assert result.details["accuracy_drop"] <= 0.05
    assert onnx_parameter_counts(form)[0] == onnx_parameter_counts(onnx_mlp.form)[0]  # type: ignore[arg-type]


class ConvolutionOnly(torch.nn.Module):
    """Convolutions and a pooling head: no MatMul for 4-bit weight-only blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.convolution = torch.nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.convolution(inputs.reshape(-1, 1, 8, 8)).mean(dim=(2, 3))


def test_int4_on_a_graph_without_matmuls_is_refused_saying_why(context):
    model = ModelUnderCompression(TorchForm(ConvolutionOnly().eval(), {"kind": "custom"}), DIGITS_SIGNATURE)
    with pytest.raises(FailedPrecondition) as refused:
        quantize(model, {"dtype": "int4"}, context)  # a torch model: converted first
    assert refused.value.reason == "INT4_NOT_APPLICABLE"
    assert "Conv" in refused.value.message


def test_fp16_keeps_float32_inputs_and_reports_its_latency_against_fp32(onnx_mlp, data, context):
    result = quantize(onnx_mlp, {"dtype": "fp16"}, context)

    form = result.model.form
    assert isinstance(form, OnnxForm)
    assert weight_dtypes(form) == {onnx.TensorProto.FLOAT16}
    graph = onnx.load(str(form.path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ratio = result.details["latency_ratio_fp16_to_fp32"]
    assert ratio == pytest.approx(
        result.details["latency_ms_fp16_batch32"] / result.details["latency_ms_fp32_batch32"]
    )
    np.testing.assert_allclose(
        predict_onnx(form, data.eval_x[:5]), predict_onnx(onnx_mlp.form, data.eval_x[:5]), atol=0.05
    )  # type: ignore[arg-type]


def test_bf16_stores_bfloat16_weights_in_half_the_bytes(onnx_mlp, context):
    result = quantize(onnx_mlp, {"dtype": "bf16"}, context)

    form = result.model.form
    assert isinstance(form, OnnxForm)
    assert weight_dtypes(form) == {onnx.TensorProto.BFLOAT16}
    assert result.details["size_ratio"] < 0.6
    assert result.details["accuracy_drop"] <= SMALL_DROP


def mlp_with_an_outlier_weight(trained_mlp: ModelUnderCompression) -> ModelUnderCompression:
    """The trained MLP with one huge first-layer weight on pixel 0, which is 0 in every digit:
    float outputs are unchanged, but one per-tensor int8 scale for that layer rounds all its
    other weights to zero."""
    model = copy_of(trained_mlp)
    assert isinstance(model.form, TorchForm)
    first_layer = next(m for m in model.form.module.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first_layer.weight[0, 0] = 5000.0
    return model


def test_accuracy_aware_int8_keeps_the_sensitive_layer_in_float_until_the_drop_fits(
    trained_mlp, data, context
):
    model = convert(mlp_with_an_outlier_weight(trained_mlp), {}, context).model
    naive = quantize(model, {"dtype": "int8", "mode": "dynamic", "per_channel": False}, context)
    assert naive.details["accuracy_drop"] > 0.2  # the outlier ruins the first layer

    result = quantize(
        model,
        {
            "dtype": "int8",
            "mode": "dynamic",
            "per_channel": False,
            "accuracy_aware": True,
            "tolerance": 0.005,
        },
        context,
    )

    assert result.details["accuracy_drop"] <= 0.005
    kept = result.details["layers_kept_in_float"]
    assert len(kept) == 1 and "layers.1" in kept[0]  # the first Linear, named by its torch module
    assert result.details["sensitivity"][kept[0]] > 0.2
    form = result.model.form
    assert isinstance(form, OnnxForm)
    dtypes = weight_dtypes(form)
    assert onnx.TensorProto.INT8 in dtypes and onnx.TensorProto.FLOAT in dtypes  # the rest stays int8
    assert accuracy(result.model, data.eval_x, data.eval_y) >= result.details["accuracy_fp32"] - 0.005


def test_quantizing_an_int8_model_again_is_refused(onnx_mlp, context):
    int8 = quantize(onnx_mlp, {"dtype": "int8"}, context)
    with pytest.raises(FailedPrecondition) as refused:
        quantize(int8.model, {"dtype": "int8"}, context)
    assert refused.value.reason == "ALREADY_QUANTIZED"


def test_an_uploaded_onnx_source_loads_with_its_signature_and_refuses_other_names(onnx_mlp, context):
    loaded = load_onnx(onnx_mlp.form.path, DIGITS_SIGNATURE, context.workdir / "source")  # type: ignore[union-attr]
    assert isinstance(loaded.form, OnnxForm) and loaded.form.opset == 18
    renamed = type(DIGITS_SIGNATURE)(
        inputs=(type(DIGITS_SIGNATURE.inputs[0])("pixels", "FP32", (64,)),), outputs=DIGITS_SIGNATURE.outputs
    )
    with pytest.raises(FailedPrecondition, match="pixels"):
        load_onnx(onnx_mlp.form.path, renamed, context.workdir / "other")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dtype": "int3"}, "dtype"),
        ({}, "dtype"),
        ({"dtype": "int8", "mode": "eager"}, "mode"),
        ({"dtype": "int8", "calibration_samples": -1}, "calibration_samples"),
        ({"dtype": "int8", "tolerance": -0.1}, "tolerance"),
        ({"dtype": "fp16", "accuracy_aware": True}, "accuracy_aware"),
    ],
)
def test_bad_quantize_parameters_are_refused_naming_the_field(onnx_mlp, context, params, field):
    with pytest.raises(InvalidArgument) as refused:
        quantize(onnx_mlp, params, context)
    assert refused.value.field_violations[0].field == field


def test_convert_and_quantize_keep_the_signature_preprocessing_and_labels(trained_mlp, context):
    labelled = dataclasses.replace(trained_mlp, labels=[f"digit {i}" for i in range(10)])
    converted = convert(labelled, {}, context).model
    quantized = quantize(converted, {"dtype": "int8"}, context).model
    for result in (converted, quantized):
        assert result.labels == labelled.labels
        assert result.signature == labelled.signature
        assert result.preprocessing == labelled.preprocessing
