"""The quantize step's torch path (`format: "torch"`): torchao int8 weight-only on a digits
zoo model, written as a maas-package whose safetensors hold the int8 weights, loaded back
without pickle by the compressor and by the Triton runtime's loader (in-process); and the
QuantizeStep's `format` field as the spec accepts, refuses and round-trips it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from maas_compressor.measure import accuracy, predict
from maas_compressor.messages import _spec_message, spec_fields
from maas_compressor.spec import parse_compression_spec
from maas_compressor.steps.base import TorchForm
from maas_compressor.steps.quantize import quantize
from maas_compressor.torch_models import load_package, write_package
from maas_formats.safetensors_header import read_safetensors_header
from maas_formats.torch_io import TORCHAO_INT8_WEIGHT_ONLY, load_torch_package
from maas_inference.triton.runtime_model import load_maas_package
from maas_runtime.errors import FailedPrecondition, InvalidArgument

from tests.compressor import torch_helpers
from tests.compressor.torch_helpers import trained_model_fixture, zoo_model

MLP = {"hidden_sizes": [256]}
TORCH_INT8 = {"dtype": "int8", "format": "torch"}

# The step tests' shared fixtures, by name (one_torch_thread is autouse).
one_torch_thread = torch_helpers.one_torch_thread
data = torch_helpers.data
context = torch_helpers.context
trained_mlp = trained_model_fixture("mlp", MLP, epochs=8)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling while the test runs fails it: the package must load from safetensors."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a maas-package was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_torch_format_stores_int8_linear_weights_smaller_than_fp32_within_a_point(
    trained_mlp, data, context, tmp_path
):
    result = quantize(trained_mlp, TORCH_INT8, context)

    assert isinstance(result.model.form, TorchForm)
    assert result.details["scheme"] == TORCHAO_INT8_WEIGHT_ONLY
    fp32_path = write_package(trained_mlp, tmp_path / "fp32.safetensors")
    int8_path = write_package(result.model, tmp_path / "int8.safetensors")
    header = read_safetensors_header(int8_path)
    int8_tensors = {name for name, spec in header.tensors.items() if spec.dtype == "I8"}
    linear_weights = [name for name in trained_mlp.form.module.state_dict() if name.endswith("weight")]
    # Every Linear weight is stored as its int8 data; no float copy of it remains.
    assert {name.rsplit(".", 1)[0] + "._weight_qdata" for name in linear_weights} <= int8_tensors
    assert not set(linear_weights) & header.tensors.keys()
    assert int8_path.stat().st_size < 0.35 * fp32_path.stat().st_size
    drop = accuracy(trained_mlp, data.eval_x, data.eval_y) - accuracy(result.model, data.eval_x, data.eval_y)
    assert drop <= 0.01
    assert result.details["accuracy_drop"] == pytest.approx(drop)


def test_the_int8_package_round_trips_without_pickle_and_predicts_the_same(
    trained_mlp, data, context, tmp_path, no_unpickling
):
    quantized = quantize(trained_mlp, TORCH_INT8, context).model
    path = write_package(quantized, tmp_path / "int8.safetensors")

    manifest, state_dict = load_torch_package(path)
    assert manifest.quantization is not None
    assert manifest.quantization["scheme"] == TORCHAO_INT8_WEIGHT_ONLY
    assert {type(t).__name__ for name, t in state_dict.items() if name.endswith("weight")} == {"Int8Tensor"}
    reloaded = load_package(path)
    np.testing.assert_array_equal(predict(reloaded, data.eval_x), predict(quantized, data.eval_x))


def test_the_triton_runtime_loads_the_int8_package_and_serves_the_compressors_outputs(
    trained_mlp, data, context, tmp_path, no_unpickling
):
    quantized = quantize(trained_mlp, TORCH_INT8, context).model
    path = write_package(quantized, tmp_path / "int8.safetensors")

    served = load_maas_package(path)
    with torch.inference_mode():
        outputs = served(torch.from_numpy(data.eval_x[:32])).numpy()
    np.testing.assert_allclose(outputs, predict(quantized, data.eval_x[:32]), rtol=1e-5, atol=1e-5)


def test_a_float_package_carries_no_quantization_in_its_manifest(trained_mlp, tmp_path):
    path = write_package(trained_mlp, tmp_path / "fp32.safetensors")

    manifest, _ = load_torch_package(path)
    assert manifest.quantization is None
    assert "quantization" not in read_safetensors_header(path).metadata["maas.manifest"]


def test_conv_layers_stay_float(data, context):
    cnn = zoo_model("cnn", {"channels": [4]})

    quantized = quantize(cnn, TORCH_INT8, context).model

    assert isinstance(quantized.form, TorchForm)
    kinds = {name: type(t).__name__ for name, t in quantized.form.module.state_dict().items()}
    conv_weights = [name for name, layer in quantized.form.module.named_modules()
                    if isinstance(layer, torch.nn.Conv2d)]
    assert conv_weights
    assert all(kinds[f"{name}.weight"] == "Tensor" for name in conv_weights)
    assert "Int8Tensor" in kinds.values()


def test_other_dtypes_and_already_quantized_models_are_refused(trained_mlp, context):
    with pytest.raises(InvalidArgument) as refused:
        quantize(trained_mlp, {"dtype": "int4", "format": "torch"}, context)
    assert refused.value.field_violations[0].field == "dtype"

    quantized = quantize(trained_mlp, TORCH_INT8, context).model
    with pytest.raises(FailedPrecondition, match="already quantized"):
        quantize(quantized, TORCH_INT8, context)


def _spec_fields(*steps: dict) -> dict:
    return {"source_model_version": "models/m@production", "steps": list(steps),
            "evaluation_dataset": "builtin:digits", "output": {"model_id": "out"}}


def test_the_spec_carries_format_torch_through_the_contract_message_unchanged():
    spec = parse_compression_spec(_spec_fields(
        {"kind": "prune", "parameters": {"amount": 0.5}},
        {"kind": "quantize", "parameters": {"dtype": "int8", "format": "torch"}}), default_tenant="t")

    assert spec.steps[1].parameters["format"] == "torch"
    message = _spec_message(spec)
    assert message.steps[1].quantize.format == "torch"
    assert parse_compression_spec(spec_fields(message), default_tenant="t") == spec


def test_the_spec_refuses_format_torch_with_other_dtypes_later_steps_or_after_a_convert():
    with pytest.raises(InvalidArgument) as refused:
        parse_compression_spec(_spec_fields(
            {"kind": "quantize", "parameters": {"dtype": "int4", "format": "torch",
                                                "accuracy_aware": True}},
            {"kind": "quantize", "parameters": {"dtype": "int8", "format": "tflite"}}),
            default_tenant="t")

    named = {violation.field for violation in refused.value.field_violations}
    prefix = "compression_job.spec.steps"
    # accuracy_aware is judged once the source is known: an encoder's torch int8 searches.
    assert named == {f"{prefix}[0].quantize.dtype", f"{prefix}[0].quantize.format",
                     f"{prefix}[1].quantize.format"}

    with pytest.raises(InvalidArgument) as refused:
        parse_compression_spec(_spec_fields(
            {"kind": "convert", "parameters": {}},
            {"kind": "quantize", "parameters": {"dtype": "int8", "format": "torch"}}),
            default_tenant="t")
    assert [v.field for v in refused.value.field_violations] == [f"{prefix}[1].quantize.format"]
    assert "steps[0] made it ONNX" in refused.value.field_violations[0].description


def test_the_spec_keeps_an_explicit_onnx_and_auto_and_a_classifier_refuses_auto(trained_mlp, context):
    spec = parse_compression_spec(_spec_fields(
        {"kind": "quantize", "parameters": {"dtype": "int8", "format": "onnx"}}), default_tenant="t")
    assert spec.steps[0].parameters["format"] == "onnx"  # an encoder's default is auto, not onnx
    unset = parse_compression_spec(_spec_fields(
        {"kind": "quantize", "parameters": {"dtype": "int8"}}), default_tenant="t")
    assert "format" not in unset.steps[0].parameters
    auto = parse_compression_spec(_spec_fields(
        {"kind": "quantize", "parameters": {"dtype": "int8", "format": "auto"}}), default_tenant="t")
    assert auto.steps[0].parameters["format"] == "auto"
    assert parse_compression_spec(spec_fields(_spec_message(auto)), default_tenant="t") == auto

    with pytest.raises(InvalidArgument) as refused:
        quantize(trained_mlp, {"dtype": "int8", "format": "auto"}, context)
    assert refused.value.field_violations[0].field == "format"
