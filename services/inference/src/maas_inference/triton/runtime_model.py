"""Triton Python-backend runtime for MaaS model artifacts (copied as each model's `model.py`).

This file runs inside Triton's `triton_python_backend_stub` process, never in the inference
service (which does not need torch). It needs numpy, and per format: torch, `maas_formats`
(the package format, over safetensors) and `maas_zoo` (the architectures) for torch models,
onnxruntime for ONNX — so a remote Triton image needs those and nothing of the service.

Per model instance, `initialize` loads the artifact once:

* `maas-package`: a safetensors file whose header metadata `maas.manifest` holds the JSON
  manifest, read and validated by `maas_formats.torch_io.load_torch_package` (safetensors
  only: nothing is ever unpickled). The module is rebuilt with `maas_zoo.build_model` from
  the manifest's architecture and signature, the weights are loaded strictly (every tensor
  must match), and the manifest's preprocessing is applied before the forward pass.
* `torchscript`: an opaque archive loaded with `torch.jit.load`.
* `onnx`: an ONNX graph run by onnxruntime (CPU provider, `maas.torch_threads` intra-op
  threads), fed by input name. torch is not imported for it: an ONNX model starts in the time
  onnxruntime takes to load, and a Triton image for ONNX needs numpy and onnxruntime only.
  (A Triton with its own onnxruntime backend serves ONNX without this file at all.)
* `hf-transformer`: a zipped Hugging Face directory, unzipped next to this file (validated by
  maas_formats: no pickle, no escaping paths) and loaded as a `maas_text.SentenceEncoder`
  (tokenizer + torch from safetensors, an int8 encoder of `maas_text.int8` on torch's
  quantized CPU kernels, or onnxruntime when it holds model.onnx). Its one input
  is BYTES text ([batch, 1]); texts are checked (UTF-8, not empty), tokenized together padded
  to the longest text of everything the dynamic batcher gathered, embedded once and answered
  per request as `embedding` FP32 [batch, dim] (L2-normalized) and `truncated` BOOL [batch, 1]
  (true where a text exceeded the model's limit and was cut). A request with a bad text gets
  an INVALID_ARG error of its own; the others in the batch are served.
* text classifiers (`maas_zoo.text_classifiers`): a text_lstm maas-package whose manifest
  carries its tokenizer, or an hf-transformer zip with `classifier/classifier.json` and a head.
  Same BYTES text input and per-request error handling as the encoder above; the outputs are
  `label` BYTES [batch, 1] (the class name) and `probabilities` FP32 [batch, classes].

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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime
    import torch
    from maas_text.encoder import SentenceEncoder
    from maas_zoo.text_classifiers import TextClassifier

ARTIFACT_PATH_PARAMETER = "maas.artifact_path"
ARTIFACT_FORMAT_PARAMETER = "maas.artifact_format"
TORCH_THREADS_PARAMETER = "maas.torch_threads"
PREPROCESSING_KEYS = frozenset({"scale", "mean", "std"})

Preprocess = Callable[["torch.Tensor"], "torch.Tensor"]
Runner = Callable[[list[np.ndarray]], list[np.ndarray]]
"""A loaded model: input arrays in config order → output arrays in config order."""


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
    import torch

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


def _preprocessed_module(module: torch.nn.Module, preprocess: Preprocess) -> torch.nn.Module:
    import torch

    class PreprocessedModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.module(preprocess(inputs))

    return PreprocessedModule()


def load_maas_package(artifact: Path) -> torch.nn.Module:
    """Rebuilds the package's module with its weights and preprocessing, in eval mode."""
    from maas_formats.torch_io import load_torch_package, loads_by_assignment
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
    # A torchao-quantized package's int8 tensors replace the float parameters (assign).
    module.load_state_dict(state_dict, strict=True, assign=loads_by_assignment(manifest))
    preprocess = build_preprocessing(manifest.preprocessing, model_input.shape)
    if preprocess is not None:
        module = _preprocessed_module(module, preprocess)
    return module.eval()


def load_torchscript(artifact: Path) -> torch.nn.Module:
    import torch

    return torch.jit.load(str(artifact), map_location="cpu").eval()


ARTIFACT_LOADERS = {"maas-package": load_maas_package, "torchscript": load_torchscript}
ONNX_FORMAT = "onnx"
HF_TRANSFORMER_FORMAT = "hf-transformer"


def _is_text_classifier(artifact: Path, artifact_format: str) -> bool:
    if artifact_format not in ("maas-package", HF_TRANSFORMER_FORMAT):
        return False
    from maas_zoo.text_classifiers import is_text_classifier

    return is_text_classifier(artifact, artifact_format)


def _invalid_argument(pb_utils, message: str):
    # TritonError carries a status code from Triton 23.x on; older stubs take the message only.
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def load_artifact(artifact: Path, artifact_format: str) -> torch.nn.Module:
    loader = ARTIFACT_LOADERS.get(artifact_format)
    if loader is None:
        raise ArtifactError(
            f"unknown artifact format {artifact_format!r}; known: "
            f"{', '.join([*ARTIFACT_LOADERS, ONNX_FORMAT])}"
        )
    return loader(artifact)


def as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, list | tuple) else (outputs,)


def torch_runner(module: torch.nn.Module, device: torch.device) -> Runner:
    """One forward pass in inference mode per call, tensors moved to `device` and back."""
    import torch

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(array).to(device) for array in arrays]
        with torch.inference_mode():
            results = as_tuple(module(*tensors))
        return [result.detach().cpu().numpy() for result in results]

    return run


def load_onnx_session(artifact: Path, threads: int) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session over the graph, `threads` intra-op threads, one inter-op."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return onnxruntime.InferenceSession(
            str(artifact), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own exception types per failure
        raise ArtifactError(f"onnxruntime cannot load the graph: {error}") from error


def onnx_runner(session: onnxruntime.InferenceSession, input_names: Sequence[str],
                output_names: Sequence[str]) -> Runner:
    """Feeds the graph by the config's tensor names (the signature's), returns its outputs in
    the config's order; a graph whose names differ is refused at load, not per request."""
    graph_inputs = [value.name for value in session.get_inputs()]
    graph_outputs = {value.name for value in session.get_outputs()}
    missing = [name for name in input_names if name not in graph_inputs] + [
        name for name in output_names if name not in graph_outputs
    ]
    if missing or len(graph_inputs) != len(input_names):
        raise ArtifactError(
            f"the ONNX graph's inputs {graph_inputs} and outputs {sorted(graph_outputs)} do not "
            f"match the signature's {list(input_names)} and {list(output_names)}"
        )

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(input_names, arrays, strict=True))
        return list(session.run(list(output_names), feed))

    return run


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
        threads = int(parameters.get(TORCH_THREADS_PARAMETER, "1"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        artifact = version_dir / parameters[ARTIFACT_PATH_PARAMETER]
        artifact_format = parameters[ARTIFACT_FORMAT_PARAMETER]
        input_names = [tensor["name"] for tensor in config["input"]]
        output_names = [tensor["name"] for tensor in config["output"]]
        self.text_encoder: SentenceEncoder | None = None
        self.text_classifier: TextClassifier | None = None
        if _is_text_classifier(artifact, artifact_format):
            self._initialize_text_classifier(config, artifact, version_dir, artifact_format,
                                             threads, pb_utils)
            return
        if artifact_format == HF_TRANSFORMER_FORMAT:
            self._initialize_text(config, artifact, version_dir, threads, pb_utils)
            return
        if artifact_format == ONNX_FORMAT:
            self.runner = onnx_runner(load_onnx_session(artifact, threads), input_names, output_names)
        else:
            import torch

            torch.set_num_threads(threads)
            on_gpu = args.get("model_instance_kind") == "GPU"
            device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
            self.runner = torch_runner(load_artifact(artifact, artifact_format).to(device), device)
        self.batched = config.get("max_batch_size", 0) > 0
        self.input_names = input_names
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        self._warm_up(config["input"], pb_utils)

    def _initialize_text(self, config: dict, artifact: Path, version_dir: Path, threads: int,
                         pb_utils) -> None:
        from maas_text.directory import unzip_directory
        from maas_text.encoder import SentenceEncoder

        directory = unzip_directory(artifact, version_dir / "hf-model")
        encoder = SentenceEncoder.load(directory, threads, prefer_onnx=True)
        self.text_encoder = encoder
        self.input_names = [tensor["name"] for tensor in config["input"]]
        if len(self.input_names) != 1 or config["input"][0]["data_type"] != "TYPE_STRING":
            raise ArtifactError("a text model takes exactly one BYTES input (the texts)")
        self.max_batch = max(1, config.get("max_batch_size", 0))
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        encoder.embed(["warm up the tokenizer and the first forward pass"])

    def _initialize_text_classifier(self, config: dict, artifact: Path, version_dir: Path,
                                    artifact_format: str, threads: int, pb_utils) -> None:
        import torch
        from maas_text.directory import unzip_directory
        from maas_zoo.text_classifiers import LstmTextClassifier, SentenceHeadClassifier

        torch.set_num_threads(threads)
        if artifact_format == HF_TRANSFORMER_FORMAT:
            directory = unzip_directory(artifact, version_dir / "hf-model")
            self.text_classifier = SentenceHeadClassifier.load(directory, threads)
        else:
            self.text_classifier = LstmTextClassifier.load(artifact)
        self.input_names = [tensor["name"] for tensor in config["input"]]
        if len(self.input_names) != 1 or config["input"][0]["data_type"] != "TYPE_STRING":
            raise ArtifactError("a text classifier takes exactly one BYTES input (the texts)")
        self.max_batch = max(1, config.get("max_batch_size", 0))
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        self.text_classifier.classify(["warm up the tokenizer and the first forward pass"])

    def _text_outputs(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Every output a text model can give for `texts`, by name (the config picks)."""
        if self.text_classifier is not None:
            result = self.text_classifier.classify(texts)
            return {"label": np.array([label.encode("utf-8") for label in result.labels],
                                      dtype=np.object_).reshape(-1, 1),
                    "probabilities": result.probabilities,
                    "truncated": result.truncated.reshape(-1, 1)}
        if self.text_encoder is None:
            raise ArtifactError("no text model is loaded")
        vectors, truncated = self.text_encoder.embed_with_flags(texts, max_batch=len(texts))
        return {"embedding": vectors,
                "truncated": np.asarray(truncated, dtype=np.bool_).reshape(-1, 1)}

    def _execute_text(self, requests, pb_utils):
        """Embed every valid request's texts in one padded batch; bad requests fail alone."""
        from maas_runtime.errors import InvalidArgument
        from maas_text import decode_texts

        responses: list = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []
        for index, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, self.input_names[0]).as_numpy()
            try:
                decoded = decode_texts(raw.reshape(-1).tolist(), input_name=self.input_names[0],
                                       max_batch=self.max_batch)
            except InvalidArgument as error:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=_invalid_argument(pb_utils, error.message))
                continue
            spans.append((index, len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)
        if texts:
            by_name = self._text_outputs(texts)
            for index, start, stop in spans:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(by_name[name][start:stop].astype(dtype)))
                    for name, dtype in self.outputs
                ])
        return responses

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
        results = self.runner(arrays)
        if len(results) != len(self.outputs):
            raise ArtifactError(
                f"model returned {len(results)} outputs, the config declares {len(self.outputs)}"
            )
        return [
            np.asarray(result).astype(dtype, copy=False)
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
            if self.text_encoder is not None or self.text_classifier is not None:
                return self._execute_text(requests, pb_utils)
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
        # Frees the weights (and an onnxruntime session) before the stub exits.
        self.__dict__.pop("runner", None)
        self.text_encoder = None
        self.text_classifier = None
