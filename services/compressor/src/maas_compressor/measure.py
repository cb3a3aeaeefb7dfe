"""What a model costs and how well it does: the numbers of a compression report.

`measure` works on either form of a model under compression: parameters and non-zero
parameters (from the torch state dict, or the ONNX initializers), the size of the artifact
the model would be registered as, accuracy on the held-out evaluation split, and CPU p50
latency at batch 1 and batch 32 with ONE thread (the runtime named: "torch" or
"onnxruntime"), so a before/after pair measured in one process compares like with like.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from maas_runtime.contract_enums import (
    MODEL_FORMAT_HF_TRANSFORMER,
    MODEL_FORMAT_MAAS_PACKAGE,
    MODEL_FORMAT_ONNX,
)
from maas_runtime.errors import FailedPrecondition

from maas_compressor.steps.base import DataSplits, HfForm, ModelUnderCompression, OnnxForm, TorchForm
from maas_compressor.torch_models import (
    PACKAGE_FILENAME,
    count_parameters,
    predict_torch,
    write_package,
)

RUNTIME_TORCH = "torch"
RUNTIME_ONNXRUNTIME = "onnxruntime"
DEFAULT_LATENCY_REPEATS = 50
_WARM_UP_RUNS = 3


@dataclass(frozen=True)
class Measurement:
    """One model measured on this machine's CPU."""

    parameters: int
    nonzero_parameters: int
    artifact_bytes: int
    accuracy: float
    """Share of the evaluation split classified correctly, in [0, 1]."""
    latency_ms_batch1: float
    """Median wall time of one forward pass over one example, one thread."""
    latency_ms_batch32: float
    """Median wall time of one forward pass over 32 examples, one thread."""
    runtime: str
    """What ran the model: "torch" or "onnxruntime"."""

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def predict(model: ModelUnderCompression, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Logits for client inputs `x`, from whichever runtime serves the model's form."""
    if isinstance(model.form, TorchForm):
        return predict_torch(model.form, x, threads=threads, preprocessing=model.preprocessing)
    if isinstance(model.form, HfForm):
        raise _encoder_not_a_classifier()
    # Imported here: the ONNX side is optional for torch-only steps and their tests.
    from maas_compressor.onnx_models import predict_onnx

    return predict_onnx(model.form, x, threads=threads)


def accuracy(model: ModelUnderCompression, x: np.ndarray, y: np.ndarray) -> float:
    """Share of `x` whose arg-max logit is the label in `y`."""
    if len(y) == 0:
        return 0.0
    return float(np.mean(predict(model, x).argmax(axis=1) == y))


def parameter_counts(model: ModelUnderCompression) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model in its current form."""
    if isinstance(model.form, TorchForm):
        return count_parameters(model.form.module)
    if isinstance(model.form, HfForm):
        raise _encoder_not_a_classifier()
    from maas_compressor.onnx_models import onnx_parameter_counts

    return onnx_parameter_counts(model.form)


def _encoder_not_a_classifier() -> FailedPrecondition:
    return FailedPrecondition("a sentence encoder has no logits: it is measured by "
                              "maas_compressor.hf_models.measure_encoder (cosine, Spearman)",
                              reason="ENCODER_NOT_CLASSIFIER")


def runtime_of(model: ModelUnderCompression) -> str:
    if isinstance(model.form, HfForm):
        return model.form.runtime
    return RUNTIME_TORCH if isinstance(model.form, TorchForm) else RUNTIME_ONNXRUNTIME


def artifact_of(model: ModelUnderCompression, directory: Path) -> tuple[Path, str]:
    """The file the model would be registered as, and its registry format name.

    A torch form is written as a maas-package into `directory`; an ONNX form is its file; an
    encoder directory is zipped as HF_TRANSFORMER (tokenizer and configs included).
    """
    if isinstance(model.form, OnnxForm):
        return model.form.path, MODEL_FORMAT_ONNX
    if isinstance(model.form, HfForm):
        from maas_compressor.hf_models import hf_artifact

        return hf_artifact(model.form, directory), MODEL_FORMAT_HF_TRANSFORMER
    directory.mkdir(parents=True, exist_ok=True)
    return write_package(model, directory / PACKAGE_FILENAME), MODEL_FORMAT_MAAS_PACKAGE


def latency_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """`batch_size` examples from `x`, repeated when `x` holds fewer."""
    if len(x) == 0:
        raise ValueError("latency needs at least one example")
    repeats = -(-batch_size // len(x))
    return np.concatenate([x] * repeats)[:batch_size] if repeats > 1 else x[:batch_size]


def median_milliseconds(run: Callable[[], object], repeats: int) -> float:
    """p50 wall time of `run` in milliseconds, after a few untimed warm-up runs."""
    for _ in range(_WARM_UP_RUNS):
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)


def latency_ms(
    model: ModelUnderCompression, x: np.ndarray, batch_size: int,
    repeats: int = DEFAULT_LATENCY_REPEATS,
) -> float:
    """CPU p50 latency of one forward pass over `batch_size` examples, one thread."""
    batch = latency_batch(x, batch_size)
    return median_milliseconds(lambda: predict(model, batch, threads=1), repeats)


def measure(
    model: ModelUnderCompression,
    data: DataSplits,
    workdir: Path,
    repeats: int = DEFAULT_LATENCY_REPEATS,
) -> Measurement:
    """Measure `model` on `data`'s evaluation split; artifacts written go under `workdir`."""
    parameters, nonzero = parameter_counts(model)
    artifact, _ = artifact_of(model, workdir)
    return Measurement(
        parameters=parameters,
        nonzero_parameters=nonzero,
        artifact_bytes=artifact.stat().st_size,
        accuracy=accuracy(model, data.eval_x, data.eval_y),
        latency_ms_batch1=latency_ms(model, data.eval_x, 1, repeats),
        latency_ms_batch32=latency_ms(model, data.eval_x, 32, repeats),
        runtime=runtime_of(model),
    )
