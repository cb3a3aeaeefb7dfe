"""The zoo builds every architecture, validates strictly, and rebuilds identically.

The round-trip tests are the zoo's contract with serving: a module rebuilt from
(kind, hyperparameters, input shape, classes) plus the safetensors weights of the original
must compute the same function, since that is exactly what the Triton runtime does.
"""

from __future__ import annotations

import json

import pytest
import torch
from maas_runtime.errors import InvalidArgument
from maas_zoo import (
    ARCHITECTURES,
    build_model,
    default_hyperparameters,
    resolve_hyperparameters,
)
from safetensors.torch import load_file, save_file

DIGITS_FLAT = [64]
DIGITS_IMAGE = [1, 8, 8]


def violation_fields(error: InvalidArgument) -> list[str]:
    return [violation.field for violation in error.field_violations]


@pytest.mark.parametrize(
    ("kind", "input_shape"),
    [
        ("mlp", DIGITS_FLAT),
        ("mlp", DIGITS_IMAGE),
        ("cnn", DIGITS_FLAT),
        ("cnn", DIGITS_IMAGE),
        ("cnn", [3, 5, 7]),
        ("transformer", [12, 6]),
        ("transformer", DIGITS_FLAT),
        ("transformer", DIGITS_IMAGE),
        ("transformer", [10]),
    ],
)
def test_every_architecture_maps_a_batch_to_logits(kind: str, input_shape: list[int]) -> None:
    torch.manual_seed(0)
    model = build_model(kind, {}, input_shape, num_classes=10).eval()
    with torch.inference_mode():
        logits = model(torch.randn(7, *input_shape))
    assert logits.shape == (7, 10)
    assert torch.isfinite(logits).all()


def test_catalogue_lists_the_four_kinds_with_json_friendly_defaults() -> None:
    assert set(ARCHITECTURES) == {"mlp", "cnn", "transformer", "text_lstm"}
    for kind in ARCHITECTURES:
        defaults = default_hyperparameters(kind)
        assert json.loads(json.dumps(defaults)) == defaults
        assert resolve_hyperparameters(kind, defaults) == defaults


def test_defaults_are_fresh_copies() -> None:
    defaults = default_hyperparameters("mlp")
    defaults["hidden_sizes"].append(999)
    assert default_hyperparameters("mlp")["hidden_sizes"] == [128]


def test_resolve_fills_defaults_and_normalizes_numbers() -> None:
    resolved = resolve_hyperparameters("mlp", {"hidden_sizes": (32, 16), "dropout": 0})
    assert resolved == {"hidden_sizes": [32, 16], "dropout": 0.0, "activation": "relu"}
    assert isinstance(resolved["dropout"], float)


def test_mlp_layer_widths_follow_hidden_sizes() -> None:
    model = build_model("mlp", {"hidden_sizes": [32]}, DIGITS_FLAT, 10)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == {
        "layers.1.weight": (32, 64),
        "layers.1.bias": (32,),
        "layers.4.weight": (10, 32),
        "layers.4.bias": (10,),
    }


def test_unknown_kind_names_architecture_kind() -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_model("resnet", {}, DIGITS_FLAT, 10)
    assert violation_fields(caught.value) == ["architecture.kind"]
    assert "mlp" in caught.value.field_violations[0].description


@pytest.mark.parametrize(
    ("kind", "hyperparameters", "field"),
    [
        ("mlp", {"hidden_size": [32]}, "architecture.hyperparameters.hidden_size"),
        ("mlp", {"hidden_sizes": 32}, "architecture.hyperparameters.hidden_sizes"),
        ("mlp", {"hidden_sizes": [32, 0]}, "architecture.hyperparameters.hidden_sizes"),
        ("mlp", {"hidden_sizes": [True]}, "architecture.hyperparameters.hidden_sizes"),
        ("mlp", {"hidden_sizes": "32"}, "architecture.hyperparameters.hidden_sizes"),
        ("mlp", {"dropout": 1.0}, "architecture.hyperparameters.dropout"),
        ("mlp", {"dropout": -0.1}, "architecture.hyperparameters.dropout"),
        ("mlp", {"dropout": float("nan")}, "architecture.hyperparameters.dropout"),
        ("mlp", {"dropout": "0.1"}, "architecture.hyperparameters.dropout"),
        ("mlp", {"activation": "softmax"}, "architecture.hyperparameters.activation"),
        ("cnn", {"channels": []}, "architecture.hyperparameters.channels"),
        ("cnn", {"kernel_size": 4}, "architecture.hyperparameters.kernel_size"),
        ("cnn", {"kernel_size": 3.0}, "architecture.hyperparameters.kernel_size"),
        ("cnn", {"kernel_size": 9}, "architecture.hyperparameters.kernel_size"),
        ("transformer", {"nhead": 5}, "architecture.hyperparameters.nhead"),
        ("transformer", {"num_layers": 0}, "architecture.hyperparameters.num_layers"),
        ("transformer", {"d_model": False}, "architecture.hyperparameters.d_model"),
    ],
)
def test_bad_hyperparameters_name_the_field(kind, hyperparameters, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_model(kind, hyperparameters, DIGITS_FLAT, 10)
    assert violation_fields(caught.value) == [field]
    assert caught.value.code == "INVALID_ARGUMENT"


def test_every_violation_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_hyperparameters("mlp", {"bogus": 1, "dropout": 2, "activation": "x"})
    assert sorted(violation_fields(caught.value)) == [
        "architecture.hyperparameters.activation",
        "architecture.hyperparameters.bogus",
        "architecture.hyperparameters.dropout",
    ]


def test_hyperparameters_must_be_an_object() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_hyperparameters("mlp", [("dropout", 0.1)])
    assert violation_fields(caught.value) == ["architecture.hyperparameters"]


@pytest.mark.parametrize(
    ("kind", "input_shape", "num_classes", "field"),
    [
        ("mlp", [], 10, "input_shape"),
        ("mlp", [0], 10, "input_shape"),
        ("mlp", [1, 2, 3, 4], 10, "input_shape"),
        ("mlp", [64], 0, "num_classes"),
        ("mlp", [64], 2.0, "num_classes"),
        ("cnn", [63], 10, "input_shape"),
        ("transformer", [3, 8, 8], 10, "input_shape"),
    ],
)
def test_bad_shapes_name_the_field(kind, input_shape, num_classes, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_model(kind, {}, input_shape, num_classes)
    assert violation_fields(caught.value) == [field]


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_same_seed_builds_the_same_module(kind: str) -> None:
    torch.manual_seed(1234)
    first = build_model(kind, {}, DIGITS_FLAT, 10).state_dict()
    torch.manual_seed(1234)
    second = build_model(kind, {}, DIGITS_FLAT, 10).state_dict()
    torch.manual_seed(4321)
    other = build_model(kind, {}, DIGITS_FLAT, 10).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize(
    ("kind", "hyperparameters", "input_shape"),
    [
        ("mlp", {"hidden_sizes": [32], "activation": "gelu"}, DIGITS_FLAT),
        ("cnn", {"channels": [8, 16], "kernel_size": 5}, DIGITS_IMAGE),
        ("transformer", {"d_model": 16, "nhead": 2, "num_layers": 1}, [8, 8]),
    ],
)
def test_safetensors_round_trip_rebuilds_identical_outputs(
    tmp_path, kind, hyperparameters, input_shape
) -> None:
    torch.manual_seed(7)
    original = build_model(kind, hyperparameters, input_shape, 10)
    # Perturb weights away from their initialisation so the rebuilt module cannot pass by
    # merely re-drawing the same initial weights.
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    original.eval()
    weights_file = tmp_path / "weights.safetensors"
    save_file(original.state_dict(), weights_file)

    torch.manual_seed(99)
    rebuilt = build_model(kind, hyperparameters, input_shape, 10)
    rebuilt.load_state_dict(load_file(weights_file), strict=True)
    rebuilt.eval()

    inputs = torch.randn(16, *input_shape)
    with torch.inference_mode():
        assert torch.equal(original(inputs), rebuilt(inputs))
