"""How the job manager runs a compression job: stage, launch, then gate and register.

`stage_inputs` downloads the source version, the fuse members and a registry dataset into
the job's `inputs/` (each verified against its recorded sha256, renamed into place only then;
a builtin dataset is generated), skipping what an earlier attempt already staged. `prepare`
stages, writes `run.json`, and launches `python -m maas_compressor.job_process <dir>`.

`complete` enforces the gate (a classifier over `max_accuracy_drop`, or a sentence encoder
under `min_mean_cosine` / `min_similarity_spearman`, fails the job with FAILED_PRECONDITION and
keeps its full report; nothing is registered) and registers the
result with the report's numbers as metrics and a lineage naming the parent versions, the
steps with their parameters and the job. The job's label on the version makes a repeated
registration (after a crash between upload and bookkeeping) find the first one.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas_formats.dataset_sources import write_builtin_dataset
from maas_jobs.executor import LaunchSpec
from maas_jobs.manager import JobFailedWithResult, JobRunner
from maas_jobs.records import JobRecord
from maas_runtime.contract_enums import MODEL_FORMAT_HF_TRANSFORMER, MODEL_FORMAT_ONNX
from maas_runtime.errors import FailedPrecondition, Internal
from maas_runtime.registry_client import ModelPublication, RegistryClient
from maas_runtime.telemetry import continued_trace
from maas_text.directory import LABEL_PREFIX as TEXT_LABELS

from maas_compressor.plan import (
    INPUTS_DIRECTORY,
    LOG_FILENAME,
    PYDOC_SENTENCES,
    RESULT_DIRECTORY,
    WORK_DIRECTORY,
    CompressionPlan,
    RunConfig,
    RunResult,
)

JOB_PROCESS_MODULE = "maas_compressor.job_process"
COMPRESSION_JOB_LABEL = "compression_job"
"""Label on every version the compressor registers: the id of the job that produced it."""
QUANTIZATION_LABEL = "quantization"
"""Label naming the precision a quantize step left the weights in, e.g. "int8"."""


@dataclass(frozen=True)
class RunnerConfig:
    """Runtime settings of job processes (from the service settings)."""

    python_executable: str
    torch_threads: int
    job_collection: str = "compressionJobs"


def encoder_report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """A sentence encoder's report as metrics: sizes (`compression_ratio` is how many times
    smaller the weights got), latency ratios, agreement with the source, the gate."""
    before, after = report["before"], report["after"]
    metrics = {
        "artifact_bytes": float(after["size_bytes"]),
        "artifact_bytes_before": float(before["size_bytes"]),
        "weights_bytes": float(after["weights_bytes"]),
        "weights_bytes_before": float(before["weights_bytes"]),
        "size_ratio": float(report["size_ratio"]),
        "compression_ratio": (float(before["weights_bytes"]) / float(after["weights_bytes"])
                              if after["weights_bytes"] else 0.0),
        "speedup_batch1": float(report["speedup_batch1"]),
        "speedup_batch32": float(report["speedup_batch32"]),
        "mean_cosine": float(report["mean_cosine"]),
        "similarity_spearman": float(report["similarity_spearman"]),
        "gate_passed": 1.0 if report["gate_passed"] else 0.0,
    }
    for side, measured in (("before", before), ("after", after)):
        for key, name in (("latency_ms", "b1"), ("latency_ms_batch32", "b32"),
                          ("latency_ms_all_threads", "b1_all_threads"),
                          ("latency_ms_batch32_all_threads", "b32_all_threads")):
            metrics[f"latency_ms_{name}_{side}"] = float(measured[key])
    return metrics


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as the registered version's metrics."""
    if "mean_cosine" in report:
        return encoder_report_metrics(report)
    before, after = report["before"], report["after"]
    return {
        "parameters": float(after["parameters"]),
        "nonzero_parameters": float(after["nonzero_parameters"]),
        "artifact_bytes": float(after["size_bytes"]),
        "size_ratio": float(report["size_ratio"]),
        "accuracy": float(after["accuracy"]),
        "accuracy_before": float(before["accuracy"]),
        "accuracy_after": float(after["accuracy"]),
        "accuracy_drop_points": float(report["accuracy_drop"]),
        "latency_ms_b1_before": float(before["latency_ms"]),
        "latency_ms_b1_after": float(after["latency_ms"]),
        "latency_ms_b32_before": float(before["latency_ms_batch32"]),
        "latency_ms_b32_after": float(after["latency_ms_batch32"]),
        "parameters_before": float(before["parameters"]),
        "artifact_bytes_before": float(before["size_bytes"]),
        "gate_passed": 1.0 if report["gate_passed"] else 0.0,
    }


def compression_lineage(plan: CompressionPlan, job_name: str) -> dict[str, Any]:
    """Parents (source, fuse members, a registry dataset) and the steps with parameters."""
    spec = plan.spec
    parents = [plan.source.name, *(member.name for member in plan.members)]
    if plan.dataset.registry_version:
        parents.append(plan.dataset.registry_version)
    kinds = [step.kind for step in spec.steps]
    parameters: dict[str, Any] = {
        "source": plan.source.reference,
        "steps": [{"kind": step.kind, "parameters": step.parameters} for step in spec.steps],
        "evaluation_dataset": spec.evaluation_dataset,
        "seed": spec.seed,
    }
    if spec.max_accuracy_drop is not None:
        parameters["max_accuracy_drop"] = spec.max_accuracy_drop
    parameters.update(spec.encoder_gates)
    return {"parents": list(dict.fromkeys(parents)),
            "operation": {"kind": kinds[0] if len(kinds) == 1 else "compress",
                          "job": job_name, "parameters": parameters}}


def _quantized_to(plan: CompressionPlan) -> str:
    """The precision the last quantize step left, or what the source already was."""
    dtypes = [step.parameters["dtype"] for step in plan.spec.steps if step.kind == "quantize"]
    return dtypes[-1] if dtypes else plan.source.labels.get(QUANTIZATION_LABEL, "")


def _describe_gates(gates: dict[str, float]) -> str:
    return " and ".join(f"{name} {value}" for name, value in gates.items())


def _quality(report: dict[str, Any]) -> str:
    if "mean_cosine" in report:
        return (f"mean cosine {report['mean_cosine']:.4f}, Spearman "
                f"{report['similarity_spearman']:.4f} to the source")
    return (f"accuracy {report['before']['accuracy']:.4f} → "
            f"{report['after']['accuracy']:.4f}")


class CompressionJobRunner(JobRunner):
    """The compressor's `JobRunner`."""

    def __init__(self, registry: RegistryClient, config: RunnerConfig):
        self._registry = registry
        self._config = config

    def _job_name(self, job: JobRecord) -> str:
        return f"{self._config.job_collection}/{job.job_id}"

    async def stage_inputs(self, plan: CompressionPlan, workdir: Path) -> None:
        """Everything the job process reads, in `workdir/inputs`, verified."""
        await asyncio.to_thread((workdir / INPUTS_DIRECTORY).mkdir, parents=True, exist_ok=True)
        for version in (plan.source, *plan.members):
            destination = workdir / version.filename
            if not destination.exists():  # verified when an earlier attempt staged it
                await self._registry.download_model_version(version.as_version(), destination)
        destination = workdir / plan.dataset_filename
        if destination.exists() or plan.dataset == PYDOC_SENTENCES:  # pydoc: the stdlib's
            return
        if plan.dataset.registry_version is None:
            await asyncio.to_thread(write_builtin_dataset, plan.dataset.source, destination)
        else:
            await self._registry.download_dataset_version(
                plan.dataset.source, destination, sha256=plan.dataset.sha256,
                size_bytes=plan.dataset.size_bytes or None)

    async def prepare(self, job: JobRecord, workdir: Path) -> LaunchSpec | None:
        plan = CompressionPlan.from_dict(job.spec)
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        if await asyncio.to_thread(RunResult.read, workdir) is not None:
            return None  # compressed before a restart; only the gate and registration remain
        with continued_trace(plan.trace_context):
            await self.stage_inputs(plan, workdir)
        await asyncio.to_thread(
            RunConfig(self._job_name(job), plan, self._config.torch_threads).write, workdir)
        return LaunchSpec(
            argv=[self._config.python_executable, "-m", JOB_PROCESS_MODULE, str(workdir)],
            cwd=workdir, log_path=workdir / LOG_FILENAME,
            env={"OMP_NUM_THREADS": str(self._config.torch_threads), "PYTHONUNBUFFERED": "1"})

    async def complete(self, job: JobRecord, workdir: Path) -> dict[str, Any]:
        plan = CompressionPlan.from_dict(job.spec)
        result = await asyncio.to_thread(RunResult.read, workdir)
        if result is None:
            raise Internal("the job process exited successfully without writing its result")
        report = result.report
        gate = plan.spec.max_accuracy_drop
        if not report["gate_passed"] and plan.source.is_encoder:
            raise JobFailedWithResult(FailedPrecondition(
                f"the result's embeddings are too far from the source's: mean cosine "
                f"{report['mean_cosine']:.6f}, Spearman {report['similarity_spearman']:.6f}; "
                f"the gate asks {_describe_gates(plan.spec.encoder_gates)}; nothing was registered",
                reason="EMBEDDING_AGREEMENT_UNDER_GATE",
                metadata={"mean_cosine": f"{report['mean_cosine']:.6f}",
                          "similarity_spearman": f"{report['similarity_spearman']:.6f}",
                          **{name: f"{value:.6f}" for name, value
                             in plan.spec.encoder_gates.items()}}), {"report": report})
        if not report["gate_passed"]:
            raise JobFailedWithResult(FailedPrecondition(
                f"accuracy dropped {report['accuracy_drop']:.2f} points "
                f"({report['before']['accuracy']:.4f} → {report['after']['accuracy']:.4f}), "
                f"more than max_accuracy_drop {gate:.2f}; nothing was registered",
                reason="ACCURACY_DROP_OVER_GATE",
                metadata={"accuracy_drop": f"{report['accuracy_drop']:.6f}",
                          "max_accuracy_drop": f"{gate:.6f}"}), {"report": report})
        labels = {}
        if result.format == MODEL_FORMAT_HF_TRANSFORMER:  # the tokenizer facts travel
            labels.update({key: value for key, value in plan.source.labels.items()
                           if key.startswith(TEXT_LABELS)})
            labels[f"{TEXT_LABELS}weights_format"] = (
                "onnx" if report["after"]["runtime"] == "onnxruntime" else "safetensors")
            # The result's own facts, as an import of its directory would label them (an int8
            # torch encoder: `text.quantization`); absent from results written before them.
            labels.update({key: value for key, value in result.labels.items()
                           if key.startswith(TEXT_LABELS)})
        quantized = _quantized_to(plan)
        if quantized:
            labels[QUANTIZATION_LABEL] = quantized
        publication = ModelPublication(
            model_id=plan.spec.output.model_id, package_path=workdir / result.artifact,
            job_label=(COMPRESSION_JOB_LABEL, job.job_id), format=result.format,
            metrics=report_metrics(report), lineage=compression_lineage(plan, self._job_name(job)),
            alias=plan.spec.output.alias, labels=labels,
            # An ONNX file or an encoder zip carries no manifest: it serves the source's
            # interface (an encoder: text in, embedding out).
            signature=(plan.source.signature if result.format in (
                MODEL_FORMAT_ONNX, MODEL_FORMAT_HF_TRANSFORMER) else {}),
            description=f"Compressed by {self._job_name(job)} from {plan.source.name}: "
                        f"{' → '.join(step.kind for step in plan.spec.steps)}; "
                        f"{_quality(report)}, size ×{report['size_ratio']:.3f}.")
        with continued_trace(plan.trace_context):
            version = await self._registry.publish_patiently(publication)
        return {"model_version": version, "report": report}

    async def discard_work(self, job: JobRecord, workdir: Path) -> None:
        """Keep run.json, result.json and job.log as the job's record; staged inputs, the
        steps' files and the artifact (now in the registry, or rejected) only cost disk."""
        for name in (INPUTS_DIRECTORY, WORK_DIRECTORY, RESULT_DIRECTORY):
            await asyncio.to_thread(shutil.rmtree, workdir / name, True)
