"""Serving through a real tritonserver: packages and TorchScript in, the same numbers out.

Every model here is written by `ModelRepository`, loaded by `TritonClient` in explicit
model-control mode and answered by `runtime_model.py` inside Triton's Python-backend stub;
the expected outputs come from the same torch module run in this process.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from maas_inference.triton import (
    ArtifactFormat,
    BatchingPolicy,
    RawTensor,
    TensorSpec,
    TritonModelLoadError,
    TritonModelNotFound,
    TritonModelSpec,
    build_infer_request,
    with_model_name,
)
from maas_inference.triton.launcher import BundledTriton
from maas_runtime.errors import InvalidArgument
from tritonclient.grpc import model_config_pb2, service_pb2

from tests.inference.model_packages import (
    DIGITS_FEATURES,
    save_torchscript,
    save_zoo_package,
    zoo_model,
)

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

FEATURES = TensorSpec("features", "FP32", (DIGITS_FEATURES,))
LOGITS = TensorSpec("logits", "FP32", (10,))
PREPROCESSING = {"scale": 1 / 16, "mean": 0.5, "std": 0.25}
BATCHING = BatchingPolicy(
    max_batch_size=32, max_queue_delay_microseconds=2_000, preferred_batch_sizes=(8, 16)
)


@dataclass(frozen=True)
class ServedModel:
    """A model loaded in Triton and the reference module that must agree with it."""

    triton_name: str
    reference: Callable[[torch.Tensor], torch.Tensor]


def digits_batch(rows: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return generator.integers(0, 17, size=(rows, DIGITS_FEATURES)).astype(np.float32)


def reference_logits(model: Callable[[torch.Tensor], torch.Tensor], batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(triton_client, model_repository, tmp_path_factory) -> dict[str, ServedModel]:
    """Writes and loads every model of this module at once (Triton loads them in parallel)."""
    workdir: Path = tmp_path_factory.mktemp("artifacts")
    models: dict[str, ServedModel] = {}

    mlp = zoo_model("mlp", {"hidden_sizes": [32]}, [64], seed=1)
    signature = save_zoo_package(
        workdir / "mlp.safetensors",
        mlp,
        kind="mlp",
        hyperparameters={"hidden_sizes": [32]},
        input_shape=[64],
    )
    spec = TritonModelSpec.from_signature("mlp", "maas-package", signature, batching=BATCHING)
    model_repository.write_model(spec, workdir / "mlp.safetensors")
    models["mlp"] = ServedModel("mlp", mlp)

    scaled = zoo_model("mlp", {"hidden_sizes": [32]}, [64], seed=2)
    signature = save_zoo_package(
        workdir / "scaled.safetensors",
        scaled,
        kind="mlp",
        hyperparameters={"hidden_sizes": [32]},
        input_shape=[64],
        preprocessing=PREPROCESSING,
    )
    spec = TritonModelSpec.from_signature("mlp-preprocessed", "maas-package", signature)
    model_repository.write_model(spec, workdir / "scaled.safetensors")

    def with_preprocessing(inputs: torch.Tensor) -> torch.Tensor:
        prepared = (inputs * PREPROCESSING["scale"] - PREPROCESSING["mean"]) / PREPROCESSING["std"]
        return scaled(prepared)

    models["mlp-preprocessed"] = ServedModel("mlp-preprocessed", with_preprocessing)

    transformer_hyperparameters = {"d_model": 16, "nhead": 2, "num_layers": 1, "dropout": 0.0}
    transformer = zoo_model("transformer", transformer_hyperparameters, [64], seed=3)
    signature = save_zoo_package(
        workdir / "transformer.safetensors",
        transformer,
        kind="transformer",
        hyperparameters=transformer_hyperparameters,
        input_shape=[64],
    )
    spec = TritonModelSpec.from_signature("transformer", "maas-package", signature)
    model_repository.write_model(spec, workdir / "transformer.safetensors")
    models["transformer"] = ServedModel("transformer", transformer)

    scripted = zoo_model("mlp", {"hidden_sizes": [48, 24], "activation": "tanh"}, [64], seed=4)
    save_torchscript(workdir / "scripted.pt", scripted, torch.zeros(1, 64))
    spec = TritonModelSpec("torchscript", ArtifactFormat.TORCHSCRIPT, (FEATURES,), (LOGITS,))
    model_repository.write_model(spec, workdir / "scripted.pt")
    models["torchscript"] = ServedModel("torchscript", scripted)

    await asyncio.gather(*(triton_client.load_model(m.triton_name) for m in models.values()))
    for model in models.values():
        await triton_client.wait_model_ready(model.triton_name, timeout=5)
    return models


async def test_triton_runs_with_the_environment_it_needs(triton) -> None:
    environ = dict(
        entry.split("=", 1)
        for entry in Path(f"/proc/{triton.pid}/environ").read_text().split("\0")
        if "=" in entry
    )
    library_path = environ["LD_LIBRARY_PATH"].split(os.pathsep)
    assert library_path[0] == sysconfig.get_config_var("LIBDIR")
    assert library_path[1] == os.fspath(BundledTriton.locate().shared_libraries_dir)
    assert environ["PATH"].split(os.pathsep)[0] == os.fspath(Path(sys.executable).parent)
    backend = triton.config.state_dir / "backends" / "python"
    # (__pycache__ appears once a model's stub has imported the utilities)
    assert sorted(p.name for p in backend.iterdir() if p.name != "__pycache__") == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    command = Path(f"/proc/{triton.pid}/cmdline").read_text().split("\0")
    assert "--model-control-mode=explicit" in command
    assert f"--backend-directory={triton.config.state_dir / 'backends'}" in command
    assert f"--grpc-port={triton.ports.grpc}" in command


@pytest.mark.parametrize("model_key", ["mlp", "mlp-preprocessed", "transformer", "torchscript"])
async def test_outputs_match_the_module_run_in_process(served, triton_client, model_key: str) -> None:
    model = served[model_key]
    batch = digits_batch(rows=7, seed=11)
    reply = await triton_client.infer(
        model.triton_name, [RawTensor.from_numpy("features", batch)], request_id="r-1"
    )
    logits = reply.output("logits")
    assert (reply.model_name, reply.model_version, reply.request_id) == (model.triton_name, "1", "r-1")
    assert (logits.datatype, logits.shape) == ("FP32", (7, 10))
    np.testing.assert_allclose(
        logits.to_numpy(), reference_logits(model.reference, batch), rtol=1e-5, atol=1e-5
    )


async def test_raw_input_bytes_reach_triton_untouched(served, triton_client) -> None:
    batch = digits_batch(rows=3, seed=12)
    request = build_infer_request("mlp", [RawTensor.from_numpy("features", batch)])
    assert request.raw_input_contents[0] == batch.tobytes()
    assert not request.inputs[0].HasField("contents")
    response = await triton_client.infer_request(request)
    output = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(output, reference_logits(served["mlp"].reference, batch), atol=1e-5)


async def test_serialized_forwarding_retargets_the_model_without_parsing(served, triton_client) -> None:
    batch = digits_batch(rows=2, seed=13)
    # The caller addressed a deployment name; the gateway retargets the bytes at Triton's model.
    caller_request = build_infer_request("deployment-42", [RawTensor.from_numpy("features", batch)])
    forwarded = with_model_name(caller_request.SerializeToString(), "torchscript")
    response = service_pb2.ModelInferResponse.FromString(
        await triton_client.infer_serialized(forwarded, model_name="torchscript")
    )
    assert response.model_name == "torchscript"
    output = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(output, reference_logits(served["torchscript"].reference, batch), atol=1e-5)


async def test_loaded_config_has_dynamic_batching_and_instances(served, triton_client) -> None:
    config = await triton_client.model_config("mlp")
    assert config.backend == "python"
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 2_000
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [64])]


async def test_concurrent_requests_are_batched_and_split_back_correctly(served, triton_client) -> None:
    before = (await triton_client.model_statistics("mlp")).model_stats[0]
    batches = [digits_batch(rows=1 + i % 4, seed=100 + i) for i in range(48)]
    replies = await asyncio.gather(
        *(triton_client.infer("mlp", [RawTensor.from_numpy("features", batch)]) for batch in batches)
    )
    expected_rows = sum(len(batch) for batch in batches)
    # Triton updates its statistics after replying: give them a moment to catch up.
    for _ in range(50):
        after = (await triton_client.model_statistics("mlp")).model_stats[0]
        if after.inference_count - before.inference_count >= expected_rows:
            break
        await asyncio.sleep(0.1)

    # Each reply holds exactly its own rows: the runtime splits the joint forward pass right.
    for batch, reply in zip(batches, replies, strict=True):
        np.testing.assert_allclose(
            reply.output("logits").to_numpy(),
            reference_logits(served["mlp"].reference, batch),
            atol=1e-5,
        )
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == expected_rows
    assert executions < len(batches), "dynamic batching should merge concurrent requests"


async def test_wrong_input_shape_is_invalid_argument(served, triton_client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await triton_client.infer("mlp", [RawTensor.from_numpy("features", np.zeros((2, 63), np.float32))])
    assert "features" in caught.value.message


async def test_unknown_model_is_not_found(triton_client) -> None:
    batch = digits_batch(rows=1, seed=0)
    with pytest.raises(TritonModelNotFound):
        await triton_client.infer("never-loaded", [RawTensor.from_numpy("features", batch)])
    with pytest.raises(TritonModelNotFound):
        await triton_client.infer_serialized(
            build_infer_request(
                "never-loaded", [RawTensor.from_numpy("features", batch)]
            ).SerializeToString(),
            model_name="never-loaded",
        )


async def test_broken_artifact_fails_the_load_with_the_runtime_reason(
    triton_client, model_repository, tmp_path
) -> None:
    not_a_package = tmp_path / "garbage.safetensors"
    not_a_package.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    spec = TritonModelSpec("broken", ArtifactFormat.MAAS_PACKAGE, (FEATURES,), (LOGITS,))
    model_repository.write_model(spec, not_a_package)
    with pytest.raises(TritonModelLoadError) as caught:
        await triton_client.load_model("broken")
    assert "maas.manifest" in caught.value.message
    assert not await triton_client.is_model_ready("broken")


async def test_unload_then_reload(served, triton_client) -> None:
    await triton_client.unload_model("transformer")
    for _ in range(100):
        if not await triton_client.is_model_ready("transformer"):
            break
        await asyncio.sleep(0.05)
    assert not await triton_client.is_model_ready("transformer")
    await triton_client.load_model("transformer")
    await triton_client.wait_model_ready("transformer", timeout=15)
    batch = digits_batch(rows=2, seed=14)
    reply = await triton_client.infer("transformer", [RawTensor.from_numpy("features", batch)])
    np.testing.assert_allclose(
        reply.output("logits").to_numpy(),
        reference_logits(served["transformer"].reference, batch),
        rtol=1e-5,
        atol=1e-5,
    )
