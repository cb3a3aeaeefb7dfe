"""The Python-backend runtime's loading rules, exercised in-process (no Triton needed).

Serving through Triton is covered in test_triton_serving; these pin down what the runtime
refuses, since a refused load is the only safe answer to a package it cannot honour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from maas_inference.triton.runtime_model import (
    ArtifactError,
    build_preprocessing,
    load_artifact,
    load_maas_package,
)
from maas_runtime.errors import InvalidArgument

from tests.inference.model_packages import save_zoo_package, zoo_model


def test_no_preprocessing_is_identity() -> None:
    assert build_preprocessing(None, [64]) is None
    assert build_preprocessing({}, [64]) is None


def test_scale_then_standardize_with_per_feature_statistics() -> None:
    mean = np.linspace(0, 1, 4).tolist()
    preprocess = build_preprocessing({"scale": 0.5, "mean": mean, "std": 2.0}, [2, 2])
    inputs = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)
    expected = (inputs * 0.5 - torch.tensor(mean).reshape(2, 2)) / 2.0
    assert torch.equal(preprocess(inputs), expected)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"normalize": True}, "unsupported preprocessing normalize"),
        ({"std": 0.0}, "std values must be positive"),
        ({"std": [1.0, -1.0, 1.0, 1.0]}, "std values must be positive"),
        ({"mean": [0.0, 1.0]}, "must be a number or 4 values"),
        ({"scale": [1.0, 2.0, 3.0, 4.0]}, "scale must be a single number"),
    ],
)
def test_preprocessing_it_cannot_honour_refuses_the_load(spec, message) -> None:
    with pytest.raises(ArtifactError, match=message):
        build_preprocessing(spec, [4])


def test_package_rebuilds_module_in_eval_mode_with_its_weights(tmp_path) -> None:
    original = zoo_model("cnn", {"channels": [4], "dropout": 0.5}, [1, 8, 8], seed=9)
    save_zoo_package(
        tmp_path / "cnn.safetensors",
        original,
        kind="cnn",
        hyperparameters={"channels": [4], "dropout": 0.5},
        input_shape=[1, 8, 8],
    )
    loaded = load_maas_package(tmp_path / "cnn.safetensors")
    assert not loaded.training, "dropout must be off when serving"
    inputs = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(inputs), original(inputs))


def test_package_whose_weights_do_not_fit_the_architecture_is_refused(tmp_path) -> None:
    module = zoo_model("mlp", {"hidden_sizes": [32]}, [64], seed=1)
    save_zoo_package(
        tmp_path / "lying.safetensors",
        module,
        kind="mlp",
        hyperparameters={"hidden_sizes": [16]},  # the manifest disagrees with the weights
        input_shape=[64],
    )
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_maas_package(tmp_path / "lying.safetensors")


def test_a_torchscript_file_is_not_a_package_and_unknown_formats_are_refused(tmp_path) -> None:
    not_a_package = tmp_path / "model.safetensors"
    not_a_package.write_bytes(b"PK\x03\x04 a zip, as TorchScript archives are")
    with pytest.raises(InvalidArgument):
        load_artifact(not_a_package, "maas-package")
    with pytest.raises(ArtifactError, match="unknown artifact format 'onnx'"):
        load_artifact(not_a_package, "onnx")
