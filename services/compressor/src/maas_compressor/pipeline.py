"""A compression pipeline: measure the source, apply the steps in order, measure the result.

Steps are found by kind in `step_function` (a name → function table, imported on use so a
torch-only pipeline never loads onnxruntime and the other way round). The pipeline lends each
step a `JobStepContext` that turns its logs and metrics into the job's event stream; a step's
`MaasError` fails the job with its code, the message saying which step it was.

The report compares the source with the result as measured in this one process (one thread,
same data), and judges the gate: an accuracy drop of more than `max_accuracy_drop` points
fails. The pipeline only reports the verdict; the service enforces it (nothing registered).

A sentence encoder (HF_TRANSFORMER) source runs `run_encoder_compression` instead: no dataset,
the fixed held-out pydoc sentences; `measure_encoder` before and after (size, p50 at batch 1
and 32 on one and all threads, mean cosine and Spearman to the source's embeddings), and the
gate is `min_mean_cosine` / `min_similarity_spearman`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas_jobs.progress import ProgressReporter
from maas_jobs.records import LogLevel
from maas_runtime.errors import MaasError

from maas_compressor.measure import Measurement
from maas_compressor.plan import RESULT_DIRECTORY, WORK_DIRECTORY, RunConfig, RunResult
from maas_compressor.spec import StepSpec
from maas_compressor.steps.base import DataSplits, ModelUnderCompression, Step, StepResult


def step_function(kind: str) -> Step:
    """The step implementing `kind` (the spec allows only these)."""
    if kind == "prune":
        from maas_compressor.steps.prune import prune
        return prune
    if kind == "quantize":
        from maas_compressor.steps.quantize import quantize
        return quantize
    if kind == "distill":
        from maas_compressor.steps.distill import distill
        return distill
    if kind == "fuse":
        from maas_compressor.steps.fuse import fuse
        return fuse
    if kind == "convert":
        from maas_compressor.steps.convert import convert
        return convert
    raise ValueError(f"no step {kind!r}")


@dataclass
class JobStepContext:
    """The `StepContext` of a job process: events go to the service over stdout."""

    data: DataSplits
    workdir: Path
    seed: int
    reporter: ProgressReporter
    versions: Mapping[str, Callable[[], ModelUnderCompression]]
    """Loaders of the versions the job was given (fuse members), by requested and resolved name."""
    phase: str = ""
    _epoch: int = field(default=0)

    def log(self, message: str) -> None:
        self.reporter.log(LogLevel.INFO, f"{self.phase}: {message}" if self.phase else message)

    def metrics(self, values: Mapping[str, float]) -> None:
        epochs = [value for name, value in values.items() if name.endswith("epoch")]
        if epochs:
            self._epoch = int(epochs[0])
        self.reporter.metrics(self._epoch, self.phase, dict(values))

    def load_version(self, name: str) -> ModelUnderCompression:
        loader = self.versions.get(name)
        if loader is None:
            raise KeyError(f"{name} was not given to this job")
        return loader()


def measurement_report(measurement: Measurement) -> dict[str, Any]:
    """A `ModelMeasurement` in the contract's JSON shape."""
    return {"size_bytes": measurement.artifact_bytes, "parameters": measurement.parameters,
            "nonzero_parameters": measurement.nonzero_parameters,
            "accuracy": measurement.accuracy, "latency_ms": measurement.latency_ms_batch1,
            "latency_ms_batch32": measurement.latency_ms_batch32,
            "runtime": measurement.runtime}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _json_safe(value: Any) -> Any:
    """Step details as Struct-friendly JSON: no NaN/infinity, paths as text, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return str(value)


def compression_report(before: Measurement, after: Measurement, steps: list[dict[str, Any]],
                       max_accuracy_drop: float | None) -> dict[str, Any]:
    """The `CompressionReport`; `gate_passed` is the gate's verdict (true with no gate)."""
    drop = (before.accuracy - after.accuracy) * 100.0
    # A hair of tolerance: measured accuracies are ratios of counts, and 0.3 - 0.1 is not 0.2.
    gate_passed = max_accuracy_drop is None or drop <= max_accuracy_drop + 1e-9
    return {
        "before": measurement_report(before), "after": measurement_report(after),
        "gate_passed": gate_passed,
        "size_ratio": _ratio(after.artifact_bytes, before.artifact_bytes),
        "accuracy_drop": drop, "steps": steps,
        "speedup_batch1": _ratio(before.latency_ms_batch1, after.latency_ms_batch1),
        "speedup_batch32": _ratio(before.latency_ms_batch32, after.latency_ms_batch32),
    }


def encoder_measurement_report(measurement: Any) -> dict[str, Any]:
    """An `EncoderMeasurement` as the contract's `ModelMeasurement` (no parameters counted)."""
    latency = measurement.latency_ms
    all_b1 = next((v for k, v in latency.items() if k.startswith("b1_t") and k != "b1_t1"),
                  latency["b1_t1"])
    all_b32 = next((v for k, v in latency.items() if k.startswith("b32_t") and k != "b32_t1"),
                   latency["b32_t1"])
    return {"size_bytes": measurement.artifact_bytes, "weights_bytes": measurement.weights_bytes,
            "latency_ms": latency["b1_t1"], "latency_ms_batch32": latency["b32_t1"],
            "latency_ms_all_threads": all_b1, "latency_ms_batch32_all_threads": all_b32,
            "runtime": measurement.runtime}


def encoder_report(before: Any, after: Any, steps: list[dict[str, Any]],
                   gates: Mapping[str, float]) -> dict[str, Any]:
    """The `CompressionReport` of a sentence encoder; `gate_passed` judges `gates`."""
    passed = (after.mean_cosine >= gates.get("min_mean_cosine", -math.inf) - 1e-12
              and after.similarity_spearman >= gates.get("min_similarity_spearman", -math.inf) - 1e-12)
    before_report, after_report = encoder_measurement_report(before), encoder_measurement_report(after)
    return {
        "before": before_report, "after": after_report, "gate_passed": passed,
        "size_ratio": _ratio(after.artifact_bytes, before.artifact_bytes),
        "accuracy_drop": 0.0, "steps": steps,
        "speedup_batch1": _ratio(before_report["latency_ms"], after_report["latency_ms"]),
        "speedup_batch32": _ratio(before_report["latency_ms_batch32"],
                                  after_report["latency_ms_batch32"]),
        "mean_cosine": after.mean_cosine, "similarity_spearman": after.similarity_spearman,
    }


ENCODER_LATENCY_REPEATS = 5
"""Timed runs per latency (after warm-up): batch 32 of MiniLM on one thread is ~0.35 s."""
ENCODER_QUANTIZE_MIN_COSINE = 0.99
"""What an encoder's accuracy-aware int8 search keeps (the job's gate is judged after)."""


def encoder_step(step: StepSpec) -> StepSpec:
    """A step as the encoder variant reads it: quantize is int8, accuracy-aware on cosine, in
    the format asked for (the ONNX graph by default, or the int8 torch encoder)."""
    if step.kind != "quantize":
        return step
    parameters = {"dtype": step.parameters["dtype"], "per_channel": step.parameters["per_channel"],
                  "accuracy_aware": True, "min_mean_cosine": ENCODER_QUANTIZE_MIN_COSINE}
    if "format" in step.parameters:
        parameters["format"] = step.parameters["format"]
    return StepSpec("quantize", parameters)


def run_encoder_compression(config: RunConfig, workdir: Path, reporter: ProgressReporter) -> RunResult:
    """The job for a sentence encoder source (see the module doc)."""
    import numpy as np
    from maas_text import HfDirectory

    from maas_compressor.hf_models import embed, load_hf, measure_encoder, probe_sentences
    from maas_compressor.measure import artifact_of
    from maas_compressor.steps.base import HfForm

    plan = config.plan
    spec = plan.spec
    work = workdir / WORK_DIRECTORY
    work.mkdir(parents=True, exist_ok=True)
    source = load_hf(workdir / plan.source.filename, work / "source")
    assert isinstance(source.form, HfForm)
    sentences = probe_sentences()
    reporter.log(LogLevel.INFO, f"loaded the sentence encoder {plan.source.name} "
                 f"({plan.source.reference}, {source.form.runtime}); measured on "
                 f"{len(sentences)} held-out pydoc sentences")
    reference = embed(source.form, sentences)
    before = measure_encoder(source.form, reference, sentences, work / "measure-source",
                             repeats=ENCODER_LATENCY_REPEATS)
    reporter.metrics(0, "measure source", {"latency_ms_b32": before.latency_ms["b32_t1"]})
    empty = np.zeros((0, 1), np.float32)
    context = JobStepContext(data=DataSplits(empty, empty, empty, empty), workdir=work / "steps",
                             seed=spec.seed, reporter=reporter, versions={})
    context.workdir.mkdir(parents=True, exist_ok=True)
    result, step_reports = run_steps(source, [encoder_step(step) for step in spec.steps], context)
    assert isinstance(result.form, HfForm)
    after = measure_encoder(result.form, reference, sentences, work / "measure-result",
                            repeats=ENCODER_LATENCY_REPEATS)
    reporter.metrics(0, "measure result", {"mean_cosine": after.mean_cosine,
                                           "similarity_spearman": after.similarity_spearman,
                                           "latency_ms_b32": after.latency_ms["b32_t1"]})
    report = encoder_report(before, after, step_reports, spec.encoder_gates)
    artifact, format_name = artifact_of(result, work / "artifact")
    final = workdir / RESULT_DIRECTORY / artifact.name
    final.parent.mkdir(parents=True, exist_ok=True)
    artifact.replace(final)
    # The result's own facts, as an import of its directory would label them.
    run_result = RunResult(report=report, artifact=str(final.relative_to(workdir)),
                           format=format_name, labels=HfDirectory.open(result.form.directory).labels())
    run_result.write(workdir)
    reporter.log(LogLevel.INFO, f"mean cosine {after.mean_cosine:.4f}, Spearman "
                 f"{after.similarity_spearman:.4f}, size ratio {report['size_ratio']:.3f}, "
                 f"gate {'passed' if report['gate_passed'] else 'FAILED'}")
    return run_result


def run_steps(model: ModelUnderCompression, steps: list[StepSpec],
              context: JobStepContext) -> tuple[ModelUnderCompression, list[dict[str, Any]]]:
    """Apply `steps` in order; the final model and each step's report."""
    reports = []
    for index, step in enumerate(steps):
        context.phase = f"step {index + 1}/{len(steps)} {step.kind}"
        context.reporter.log(LogLevel.INFO, f"{context.phase} started: {step.parameters}")
        context.reporter.metrics(0, context.phase, {"step": float(index + 1)})
        started = time.monotonic()
        try:
            result: StepResult = step_function(step.kind)(model, step.parameters, context)
        except MaasError as error:
            error.message = f"steps[{index}] ({step.kind}): {error.message}"
            raise
        duration = time.monotonic() - started
        model = result.model
        reports.append({"kind": step.kind, "details": _json_safe(result.details),
                        "duration_seconds": duration})
        context.reporter.log(LogLevel.INFO, f"{context.phase} finished in {duration:.2f}s: "
                             f"{_json_safe(result.details)}")
    context.phase = ""
    return model, reports


def run_compression(config: RunConfig, workdir: Path, reporter: ProgressReporter) -> RunResult:
    """The whole job: load, measure, compress, measure, write the artifact and `result.json`."""
    import torch

    from maas_compressor.data import load_splits, signature_from_registry
    from maas_compressor.measure import artifact_of, measure
    from maas_compressor.plan import InputVersion

    torch.set_num_threads(config.torch_threads)
    plan = config.plan
    spec = plan.spec
    torch.manual_seed(spec.seed)
    if plan.source.is_encoder:
        return run_encoder_compression(config, workdir, reporter)
    work = workdir / WORK_DIRECTORY
    work.mkdir(parents=True, exist_ok=True)

    def load(version: InputVersion, directory: str) -> ModelUnderCompression:
        path = workdir / version.filename
        if version.is_onnx:
            from maas_compressor.onnx_models import load_onnx
            return load_onnx(path, signature_from_registry(version.signature), work / directory)
        from maas_compressor.torch_models import load_package
        return load_package(path)

    source = load(plan.source, "source")
    data = load_splits(plan.dataset, workdir / plan.dataset_filename, source.signature, spec.seed)
    reporter.log(LogLevel.INFO, f"loaded {plan.source.name} ({plan.source.reference}); "
                 f"{len(data.train_y)} training and {len(data.eval_y)} evaluation examples "
                 f"from {plan.dataset.source}")
    versions: dict[str, Callable[[], ModelUnderCompression]] = {}
    for index, member in enumerate(plan.members):
        def loader(member: InputVersion = member, index: int = index) -> ModelUnderCompression:
            return load(member, f"member-{index}")
        versions[member.reference] = versions[member.name] = loader
    # Steps see the members by their resolved names: what the lineage records.
    steps = [StepSpec(step.kind, {**step.parameters, "model_versions": [
        plan.member(name).name for name in step.parameters["model_versions"]]})
        if step.kind == "fuse" else step for step in spec.steps]

    before = measure(source, data, work / "measure-source")
    reporter.metrics(0, "measure source", {"accuracy": before.accuracy,
                                           "latency_ms_b1": before.latency_ms_batch1,
                                           "latency_ms_b32": before.latency_ms_batch32})
    context = JobStepContext(data=data, workdir=work / "steps", seed=spec.seed,
                             reporter=reporter, versions=versions)
    context.workdir.mkdir(parents=True, exist_ok=True)
    result, step_reports = run_steps(source, steps, context)
    after = measure(result, data, work / "measure-result")
    reporter.metrics(0, "measure result", {"accuracy": after.accuracy,
                                           "latency_ms_b1": after.latency_ms_batch1,
                                           "latency_ms_b32": after.latency_ms_batch32})
    report = compression_report(before, after, step_reports, spec.max_accuracy_drop)
    artifact, format_name = artifact_of(result, work / "artifact")
    final = workdir / RESULT_DIRECTORY / artifact.name
    final.parent.mkdir(parents=True, exist_ok=True)
    artifact.replace(final)
    run_result = RunResult(report=report, artifact=str(final.relative_to(workdir)),
                           format=format_name)
    run_result.write(workdir)
    reporter.log(LogLevel.INFO, f"accuracy {before.accuracy:.4f} → {after.accuracy:.4f}, size "
                 f"ratio {report['size_ratio']:.3f}, gate {'passed' if report['gate_passed'] else 'FAILED'}")
    return run_result
