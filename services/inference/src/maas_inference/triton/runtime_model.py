"""Triton Python-backend runtime for MaaS model artifacts (copied as each model's `model.py`).

This file runs inside Triton's `triton_python_backend_stub` process, never in the inference
service (which does not need torch). It needs torch, numpy, `maas_formats` (the package
format, over safetensors) and `maas_zoo` (the architectures) — so a remote Triton image
needs those and nothing of the service.

Per model instance, `initialize` loads the artifact once:

* `maas-package`: a safetensors file whose header metadata `maas.manifest` holds the JSON
  manifest, read and validated by `maas_formats.torch_io.load_torch_package` (safetensors
  only: nothing is ever unpickled). The module is rebuilt with `maas_zoo.build_model` from
  the manifest's architecture and signature, the weights are loaded strictly (every tensor
  must match), and the manifest's preprocessing is applied before the forward pass.
* `torchscript`: an opaque archive loaded with `torch.jit.load`.

`execute` receives every request Triton's dynamic batcher gathered, concatenates each input
across them, runs ONE forward pass in inference mode and splits the outputs back per request:
that single pass is what makes dynamic batching pay off.

Preprocessing (manifest `preprocessing`, all keys optional, any other key refuses the load
rather than serve a model whose inputs would be prepared wrongly):
`scale` (a number: inputs are multiplied by it first), then `mean` and `std` (a number, or
one value per element of an example, flattened row-major): `(x * scale - mean) / std`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

ARTIFACT_PATH_PARAMETER = "maas.artifact_path"
ARTIFACT_FORMAT_PARAMETER = "maas.artifact_format"
TORCH_THREADS_PARAMETER = "maas.torch_threads"
PREPROCESSING_KEYS = frozenset({"scale", "mean", "std"})

Preprocess = Callable[[torch.Tensor], torch.Tensor]


class ArtifactError(ValueError):
    """The artifact cannot be served; the message says why (it ends up in the load error)."""


def _triton_utils():
    # The module exists only inside the stub process; importing it lazily keeps the loading
    # functions below importable (and testable) in a plain interpreter.
    import triton_python_backend_utils

    return triton_python_backend_utils


def build_preprocessing(spec: dict | None, example_shape: Sequence[int]) -> Preprocess | None:
    """The manifest's preprocessing as a tensor function (see module doc), or None."""
    if not spec:
        return None
    unknown = sorted(set(spec) - PREPROCESSING_KEYS)
    if unknown:
        raise ArtifactError(
            f"unsupported preprocessing {', '.join(unknown)}; supported: "
            f"{', '.join(sorted(PREPROCESSING_KEYS))}"
        )
    example_size = math.prod(example_shape)

    def constant(key: str, default: float) -> torch.Tensor:
        value = torch.tensor(spec.get(key, default), dtype=torch.float32)
        if value.numel() == 1:
            return value.reshape(())
        if value.dim() != 1 or value.numel() != example_size:
            raise ArtifactError(
                f"preprocessing.{key} must be a number or {example_size} values, "
                f"got shape {list(value.shape)}"
            )
        return value.reshape(tuple(example_shape))

    scale = constant("scale", 1.0)
    mean = constant("mean", 0.0)
    std = constant("std", 1.0)
    if scale.numel() != 1:
        raise ArtifactError("preprocessing.scale must be a single number")
    if not bool((std > 0).all()):
        raise ArtifactError("preprocessing.std values must be positive")

    def preprocess(inputs: torch.Tensor) -> torch.Tensor:
        return (inputs * scale - mean) / std

    return preprocess


class _PreprocessedModule(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.module = module
        self._preprocess = preprocess

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(self._preprocess(inputs))


def load_maas_package(artifact: Path) -> torch.nn.Module:
    """Rebuilds the package's module with its weights and preprocessing, in eval mode."""
    from maas_formats.torch_io import load_torch_package
    from maas_zoo import build_model

    # Validates the header and the manifest, and that the manifest lists exactly the
    # weights the file holds, before any tensor is read.
    manifest, state_dict = load_torch_package(artifact)
    signature = manifest.signature
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        raise ArtifactError(
            "a maas-package for the zoo's classifiers has exactly one input and one output, "
            f"this one has {len(signature.inputs)} and {len(signature.outputs)}"
        )
    model_input, model_output = signature.inputs[0], signature.outputs[0]
    module = build_model(
        manifest.architecture.kind,
        manifest.architecture.hyperparameters,
        model_input.shape,
        model_output.shape[-1],
    )
    module.load_state_dict(state_dict, strict=True)
    preprocess = build_preprocessing(manifest.preprocessing, model_input.shape)
    if preprocess is not None:
        module = _PreprocessedModule(module, preprocess)
    return module.eval()


def load_torchscript(artifact: Path) -> torch.nn.Module:
    return torch.jit.load(str(artifact), map_location="cpu").eval()


ARTIFACT_LOADERS = {"maas-package": load_maas_package, "torchscript": load_torchscript}


def load_artifact(artifact: Path, artifact_format: str) -> torch.nn.Module:
    loader = ARTIFACT_LOADERS.get(artifact_format)
    if loader is None:
        raise ArtifactError(
            f"unknown artifact format {artifact_format!r}; known: {', '.join(ARTIFACT_LOADERS)}"
        )
    return loader(artifact)


def as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, list | tuple) else (outputs,)


class TritonPythonModel:
    """One model instance in Triton's Python backend."""

    def initialize(self, args: dict) -> None:
        pb_utils = _triton_utils()
        config = json.loads(args["model_config"])
        parameters = {
            key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()
        }
        # One intra-op thread per instance: instances, not threads, use the cores, and more
        # threads than cores (2 here) only adds contention.
        torch.set_num_threads(int(parameters.get(TORCH_THREADS_PARAMETER, "1")))
        self.device = torch.device(
            f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"
        )
        version_dir = Path(args["model_repository"]) / args["model_version"]
        artifact = version_dir / parameters[ARTIFACT_PATH_PARAMETER]
        module = load_artifact(artifact, parameters[ARTIFACT_FORMAT_PARAMETER])
        self.module = module.to(self.device)
        self.batched = config.get("max_batch_size", 0) > 0
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        self._warm_up(config["input"], pb_utils)

    def _warm_up(self, inputs: list[dict], pb_utils) -> None:
        # The first forward pass pays for lazy initialisation; pay it before READY instead of
        # on a caller's request. Skipped when a dimension is variable (no shape to invent).
        shapes = [[1, *tensor["dims"]] if self.batched else tensor["dims"] for tensor in inputs]
        if any(d < 1 for shape in shapes for d in shape):
            return
        self._forward(
            [
                np.zeros(shape, dtype=pb_utils.triton_string_to_numpy(tensor["data_type"]))
                for shape, tensor in zip(shapes, inputs, strict=True)
            ]
        )

    def _forward(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(array).to(self.device) for array in arrays]
        with torch.inference_mode():
            results = as_tuple(self.module(*tensors))
        if len(results) != len(self.outputs):
            raise ArtifactError(
                f"model returned {len(results)} outputs, the config declares {len(self.outputs)}"
            )
        return [
            result.detach().cpu().numpy().astype(dtype, copy=False)
            for result, (_, dtype) in zip(results, self.outputs, strict=True)
        ]

    def _responses(self, pb_utils, per_request_outputs: list[list[np.ndarray]]):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(array))
                    for (name, _), array in zip(self.outputs, outputs, strict=True)
                ]
            )
            for outputs in per_request_outputs
        ]

    def execute(self, requests):
        pb_utils = _triton_utils()
        try:
            inputs_per_request = [
                [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names]
                for request in requests
            ]
            sizes = [inputs[0].shape[0] for inputs in inputs_per_request]
            same_example_shapes = all(
                [a.shape[1:] for a in inputs] == [a.shape[1:] for a in inputs_per_request[0]]
                for inputs in inputs_per_request
            )
            if same_example_shapes:
                # np.concatenate copies into one writable, contiguous batch (Triton's arrays
                # are read-only views, which torch.from_numpy warns about).
                batch = [
                    np.concatenate([inputs[i] for inputs in inputs_per_request])
                    for i in range(len(self.input_names))
                ]
                outputs = self._forward(batch)
                boundaries = np.cumsum(sizes)[:-1]
                split = [np.split(output, boundaries) for output in outputs]
                per_request = [list(parts) for parts in zip(*split, strict=True)]
            else:
                per_request = [self._forward([np.array(a) for a in inputs]) for inputs in inputs_per_request]
            return self._responses(pb_utils, per_request)
        except Exception as error:
            # Every request must get an answer; an exception escaping execute() would leave
            # Triton to fail the whole batch with a less useful message.
            message = f"{type(error).__name__}: {error}"
            return [
                pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                for _ in requests
            ]

    def finalize(self) -> None:
        del self.module  # frees the weights before the stub exits
