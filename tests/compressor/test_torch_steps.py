"""The torch steps on real zoo models trained for seconds on digits: prune, distill, fuse,
the maas-package round trip and the measurements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from maas_compressor.measure import accuracy, artifact_of, measure, predict
from maas_compressor.steps.base import ModelUnderCompression, OnnxForm, TorchForm
from maas_compressor.steps.distill import distill
from maas_compressor.steps.fuse import fuse
from maas_compressor.steps.prune import prune
from maas_compressor.torch_models import build_zoo_module, load_package, write_package
from maas_formats.torch_io import load_torch_package
from maas_runtime.contract_enums import MODEL_FORMAT_MAAS_PACKAGE, MODEL_FORMAT_ONNX
from maas_runtime.errors import FailedPrecondition, InvalidArgument

from tests.compressor import torch_helpers
from tests.compressor.torch_helpers import (
    DIGITS_SIGNATURE,
    RecordingContext,
    copy_of,
    train_in_place,
    trained_model_fixture,
    zoo_model,
)

CNN = {"channels": [16, 32]}
MLP = {"hidden_sizes": [64]}
SANE_ACCURACY = 0.85
"""Digits after seconds of training: far above chance (0.1), not a leaderboard number."""


# The step tests' shared fixtures, by name (one_torch_thread is autouse).
one_torch_thread = torch_helpers.one_torch_thread
data = torch_helpers.data
context = torch_helpers.context
trained_cnn = trained_model_fixture("cnn", CNN, epochs=12)
trained_mlp = trained_model_fixture("mlp", MLP, epochs=20)


def torch_form(model: ModelUnderCompression) -> TorchForm:
    assert isinstance(model.form, TorchForm)
    return model.form


def weights_of(model: ModelUnderCompression) -> dict[str, torch.Tensor]:
    return torch_form(model).module.state_dict()


def has_no_pruning_leftovers(module: torch.nn.Module) -> bool:
    """No hooks, masks or re-parametrisations: nothing of torch.nn.utils.prune remains."""
    for submodule in module.modules():
        if submodule._forward_hooks or submodule._forward_pre_hooks:
            return False
        if hasattr(submodule, "parametrizations"):
            return False
    names = [name for name, _ in module.named_parameters()] + [name for name, _ in module.named_buffers()]
    return not any(name.endswith(("_orig", "_mask")) for name in names)


def parameter_total(model: ModelUnderCompression) -> int:
    return sum(p.numel() for p in torch_form(model).module.parameters())


# -- the package round trip and the measurements --------------------------------------------


def test_a_package_round_trips_architecture_signature_preprocessing_and_predictions(
        trained_cnn, data, tmp_path):
    path = write_package(trained_cnn, tmp_path / "model.safetensors")

    loaded = load_package(path)

    assert torch_form(loaded).architecture == torch_form(trained_cnn).architecture
    assert loaded.signature == trained_cnn.signature
    assert loaded.preprocessing == trained_cnn.preprocessing
    np.testing.assert_array_equal(predict(loaded, data.eval_x[:50]), predict(trained_cnn, data.eval_x[:50]))
    assert not torch_form(loaded).module.training


def test_predictions_apply_the_manifest_preprocessing_like_the_serving_runtime(trained_cnn, data):
    raw = data.eval_x[:20]
    module = torch_form(trained_cnn).module
    with torch.inference_mode():
        expected = module(torch.from_numpy(raw) / 16).numpy()

    np.testing.assert_allclose(predict(trained_cnn, raw), expected, rtol=1e-5, atol=1e-5)


def test_measure_reports_the_package_size_and_consistent_counts(trained_cnn, data, tmp_path):
    measurement = measure(trained_cnn, data, tmp_path, repeats=5)

    artifact, registry_format = artifact_of(trained_cnn, tmp_path)
    assert registry_format == MODEL_FORMAT_MAAS_PACKAGE
    assert measurement.artifact_bytes == artifact.stat().st_size
    assert measurement.parameters == parameter_total(trained_cnn)
    assert measurement.nonzero_parameters <= measurement.parameters
    assert measurement.accuracy == accuracy(trained_cnn, data.eval_x, data.eval_y)
    assert measurement.accuracy >= SANE_ACCURACY
    assert 0 < measurement.latency_ms_batch1 and 0 < measurement.latency_ms_batch32
    assert measurement.runtime == "torch"


def test_an_onnx_form_is_registered_as_its_own_file_in_the_onnx_format(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    model = ModelUnderCompression(OnnxForm(path=onnx_file, opset=18), DIGITS_SIGNATURE)

    assert artifact_of(model, tmp_path / "elsewhere") == (onnx_file, MODEL_FORMAT_ONNX)


# -- prune ----------------------------------------------------------------------------------


def test_global_unstructured_pruning_zeroes_ninety_percent_of_the_weights_permanently(
        trained_cnn, data, context):
    before = {name: tensor.clone() for name, tensor in weights_of(trained_cnn).items()}

    result = prune(trained_cnn, {"amount": 0.9, "structured": False, "scope": "global",
                                 "finetune_epochs": 3, "learning_rate": 2e-3}, context)

    assert result.details["sparsity"] == pytest.approx(0.9, abs=0.002)
    module = torch_form(result.model).module
    assert has_no_pruning_leftovers(module)
    assert set(module.state_dict()) == set(before)
    # the source model is untouched; the zeros survived fine-tuning
    assert all(torch.equal(before[name], tensor) for name, tensor in weights_of(trained_cnn).items())
    weights = [p for name, p in module.named_parameters() if name.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=0.002)
    assert accuracy(result.model, data.eval_x, data.eval_y) >= SANE_ACCURACY - 0.1

    reloaded = load_package(write_package(result.model, context.workdir / "pruned.safetensors"))
    reloaded_weights = weights_of(reloaded)
    assert all(torch.equal(reloaded_weights[name], tensor) for name, tensor in module.state_dict().items())
    measurement = measure(result.model, data, context.workdir, repeats=3)
    assert measurement.nonzero_parameters < 0.2 * measurement.parameters
    assert measurement.artifact_bytes == (context.workdir / "model.safetensors").stat().st_size


def test_per_layer_unstructured_pruning_removes_the_same_share_of_every_layer(trained_mlp, context):
    result = prune(trained_mlp, {"amount": 0.5, "structured": False, "scope": "per_layer",
                                 "finetune_epochs": 0}, context)

    per_layer = result.details["sparsity_per_layer"]
    assert set(per_layer) == {"layers.1.weight", "layers.4.weight"}
    assert all(share == pytest.approx(0.5, abs=0.01) for share in per_layer.values())
    assert has_no_pruning_leftovers(torch_form(result.model).module)


@pytest.mark.parametrize(("fixture", "hyperparameter", "expected"),
                         [("trained_cnn", "channels", [8, 16]), ("trained_mlp", "hidden_sizes", [32])])
def test_structured_pruning_yields_a_smaller_zoo_spec_that_still_classifies(
        fixture, hyperparameter, expected, request, data, context):
    source = request.getfixturevalue(fixture)

    result = prune(source, {"amount": 0.5, "structured": True, "finetune_epochs": 4,
                            "learning_rate": 2e-3}, context)

    architecture = torch_form(result.model).architecture
    assert architecture["hyperparameters"][hyperparameter] == expected
    assert result.details["hyperparameters_after"][hyperparameter] == expected
    assert parameter_total(result.model) < 0.6 * parameter_total(source)
    assert result.details["parameters_after"] < result.details["parameters_before"]
    assert predict(result.model, data.eval_x[:7]).shape == (7, 10)
    assert accuracy(result.model, data.eval_x, data.eval_y) >= SANE_ACCURACY
    # the package is manifest + safetensors of the smaller spec, rebuilt by the zoo alone
    manifest, _ = load_torch_package(write_package(result.model, context.workdir / "small.safetensors"))
    assert manifest.architecture.hyperparameters[hyperparameter] == expected


def test_structured_pruning_of_a_transformer_narrows_its_feed_forward_blocks(data, context):
    transformer = zoo_model("transformer", {"d_model": 16, "nhead": 2, "num_layers": 2,
                                            "dim_feedforward": 32, "dropout": 0.0})

    result = prune(transformer, {"amount": 0.5, "structured": True, "finetune_epochs": 0}, context)

    assert torch_form(result.model).architecture["hyperparameters"]["dim_feedforward"] == 16
    assert predict(result.model, data.eval_x[:3]).shape == (3, 10)


def test_structured_pruning_of_a_linear_model_is_refused_with_the_reason(context):
    linear = zoo_model("mlp", {"hidden_sizes": []})

    with pytest.raises(FailedPrecondition, match="no hidden layers"):
        prune(linear, {"amount": 0.5, "structured": True, "finetune_epochs": 0}, context)


def test_pruning_an_onnx_model_is_refused(tmp_path, context):
    model = ModelUnderCompression(OnnxForm(path=tmp_path / "m.onnx", opset=18), DIGITS_SIGNATURE)

    with pytest.raises(FailedPrecondition, match="ONNX"):
        prune(model, {"amount": 0.5, "structured": False, "finetune_epochs": 0}, context)


# -- distill --------------------------------------------------------------------------------


def test_distillation_trains_a_smaller_student_to_a_sane_accuracy(trained_cnn, data, context):
    result = distill(trained_cnn, {
        "student_architecture": {"kind": "mlp", "hyperparameters": {"hidden_sizes": [24]}},
        "temperature": 4.0, "alpha": 0.7, "epochs": 25, "learning_rate": 5e-3, "batch_size": 64,
    }, context)

    student = torch_form(result.model)
    assert student.architecture == {"kind": "mlp", "hyperparameters": {
        "hidden_sizes": [24], "dropout": 0.0, "activation": "relu"}}
    assert parameter_total(result.model) < 0.5 * parameter_total(trained_cnn)
    assert result.details["student_parameters"] == parameter_total(result.model)
    assert result.model.signature == trained_cnn.signature
    assert result.model.preprocessing == trained_cnn.preprocessing
    assert accuracy(result.model, data.eval_x, data.eval_y) >= SANE_ACCURACY
    assert [m["distill_epoch"] for m in context.reported] == list(range(1, 26))


def test_a_student_whose_outputs_differ_from_the_teachers_is_refused_naming_the_field(context):
    # The teacher's module answers 5 classes while its signature says 10: no zoo student
    # built for the signature can learn those logits.
    teacher = zoo_model("mlp", MLP)
    five_classes = ModelUnderCompression(
        TorchForm(module=build_zoo_module(torch_form(teacher).architecture, _signature_with_classes(5)),
                  architecture=torch_form(teacher).architecture),
        DIGITS_SIGNATURE, teacher.preprocessing)

    with pytest.raises(FailedPrecondition) as refused:
        distill(five_classes, {"student_architecture": {"kind": "mlp", "hyperparameters": {}},
                               "epochs": 1}, context)

    assert [v.field for v in refused.value.field_violations] == ["student_architecture"]


def test_a_student_with_invalid_hyperparameters_is_refused_under_the_steps_field(trained_mlp, context):
    with pytest.raises(InvalidArgument) as refused:
        distill(trained_mlp, {"student_architecture": {"kind": "cnn", "hyperparameters": {"kernel_size": 4}},
                              "epochs": 1}, context)

    assert [v.field for v in refused.value.field_violations] == [
        "student_architecture.hyperparameters.kernel_size"]


def _signature_with_classes(classes: int):
    from maas_formats.manifest import ModelSignature, TensorSignature

    return ModelSignature(inputs=DIGITS_SIGNATURE.inputs,
                          outputs=(TensorSignature("logits", "FP32", (classes,)),))


# -- fuse -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned_runs(trained_mlp, data, tmp_path_factory) -> list[ModelUnderCompression]:
    """Three runs fine-tuned from one trained model with different example orders (a soup's
    members share their initialisation)."""
    runs = []
    for seed in (1, 2, 3):
        context = RecordingContext(data=data, workdir=tmp_path_factory.mktemp(f"run{seed}"), seed=seed)
        runs.append(train_in_place(copy_of(trained_mlp), context, epochs=2, learning_rate=1e-3))
    return runs


def test_uniform_fusion_averages_every_members_weights(fine_tuned_runs, context):
    source, *others = fine_tuned_runs
    context.versions = {"models/m/versions/2": others[0], "models/m/versions/3": others[1]}

    result = fuse(source, {"model_versions": list(context.versions), "method": "uniform"}, context)

    assert result.details["members_used"] == ["source", "models/m/versions/2", "models/m/versions/3"]
    fused = weights_of(result.model)
    for name, tensor in fused.items():
        expected = torch.stack([weights_of(run)[name] for run in fine_tuned_runs]).mean(dim=0)
        torch.testing.assert_close(tensor, expected)


def test_weighted_fusion_follows_the_normalised_weights(fine_tuned_runs, context):
    source, other, _ = fine_tuned_runs
    context.versions = {"models/m/versions/2": other}

    result = fuse(source, {"model_versions": ["models/m/versions/2"], "method": "weighted",
                           "weights": [3.0, 1.0]}, context)

    assert result.details["weights"] == [0.75, 0.25]
    name = "layers.1.weight"
    torch.testing.assert_close(weights_of(result.model)[name],
                               0.75 * weights_of(source)[name] + 0.25 * weights_of(other)[name])


def test_greedy_soup_keeps_a_member_only_when_validation_accuracy_holds(fine_tuned_runs, data, context):
    source, *others = fine_tuned_runs
    # A member that learned nothing: adding it would hurt, so the soup must leave it out.
    scrambled = copy_of(source)
    with torch.no_grad():
        for parameter in torch_form(scrambled).module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 3)
    context.versions = {"good/2": others[0], "good/3": others[1], "scrambled": scrambled}

    result = fuse(source, {"model_versions": list(context.versions), "method": "greedy_soup"}, context)

    used = result.details["members_used"]
    assert "scrambled" not in used
    validation = result.details["validation_accuracy"]
    assert validation["soup"] >= max(validation[name] for name in ("source", "good/2", "good/3"))
    best_single = max(accuracy(run, data.eval_x, data.eval_y) for run in fine_tuned_runs)
    assert accuracy(result.model, data.eval_x, data.eval_y) >= best_single - 0.02


def test_fusing_versions_of_another_architecture_is_refused_naming_the_version(trained_mlp, context):
    context.versions = {"models/other/versions/1": zoo_model("mlp", {"hidden_sizes": [32]})}

    with pytest.raises(FailedPrecondition) as refused:
        fuse(trained_mlp, {"model_versions": ["models/other/versions/1"], "method": "uniform"}, context)

    assert [v.field for v in refused.value.field_violations] == ["model_versions[0]"]


def test_weights_that_do_not_match_the_members_are_refused(trained_mlp, context):
    context.versions = {"models/m/versions/2": copy_of(trained_mlp)}

    with pytest.raises(InvalidArgument) as refused:
        fuse(trained_mlp, {"model_versions": ["models/m/versions/2"], "method": "weighted",
                           "weights": [1.0]}, context)

    assert [v.field for v in refused.value.field_violations] == ["weights"]
