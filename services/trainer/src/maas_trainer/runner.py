"""How the job manager runs a training job: stage, launch, then gate and publish.

`prepare` stages the dataset in the job's directory (a builtin generated once, a registry
version downloaded and checked against its sha256), writes `run.json`, and launches
`python -m maas_trainer.job_process <dir>`; with `workers > 1` the same module runs under
torchrun's launcher (`torch.distributed.run --standalone`), which is the code path a
Kubernetes PyTorchJob takes at scale. A resumed job finds its staged data and checkpoint in
the same directory.

`complete` applies the `min_test_accuracy` gate and publishes the package to the registry
with metrics and lineage; the registry labels make a repeated publish find the first one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas_jobs.executor import LaunchSpec
from maas_jobs.manager import JobRunner
from maas_jobs.records import JobRecord
from maas_runtime.errors import FailedPrecondition, Internal
from maas_runtime.registry_client import ModelPublication, RegistryClient
from maas_runtime.telemetry import continued_trace

from maas_trainer.datasets import DatasetFacts, write_builtin_dataset
from maas_trainer.plan import (
    CHECKPOINT_FILENAME,
    HF_PACKAGE_FILENAME,
    LOG_FILENAME,
    PACKAGE_FILENAME,
    RunConfig,
    RunResult,
    TrainingPlan,
    artifact_of,
)
from maas_trainer.pretrained import PRETRAINED_ARCHITECTURES, classifier_signature

JOB_PROCESS_MODULE = "maas_trainer.job_process"
# Publishing outlasts about five minutes of registry outage (a restart, a failover) before a
# finished run is given up.
PUBLISH_ATTEMPTS = 25
PUBLISH_RETRY_SECONDS = 2.0
PUBLISH_RETRY_MAX_SECONDS = 15.0
TRAINING_JOB_LABEL = "training_job"
"""Label on every version the trainer registers: the id of the job that produced it."""


@dataclass(frozen=True)
class RunnerConfig:
    """Runtime settings of job processes (from the service settings)."""

    python_executable: str
    torch_threads: int
    """Threads per worker process; 1 keeps runs bit-for-bit reproducible across resumes."""
    job_collection: str = "trainingJobs"


def job_process_command(config: RunnerConfig, workers: int, workdir: Path) -> list[str]:
    """The command line of a job: one process, or `workers` processes under torchrun."""
    if workers == 1:
        return [config.python_executable, "-m", JOB_PROCESS_MODULE, str(workdir)]
    return [config.python_executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={workers}", "--max-restarts=0",
            # The launcher checks its workers this often: the delay between the last worker
            # exiting and the job finishing.
            "--monitor-interval=0.2", "-m", JOB_PROCESS_MODULE,
            str(workdir)]


def training_lineage(plan: TrainingPlan, job_name: str) -> dict[str, Any]:
    """Lineage of the registered version: the dataset version it learnt from (when it came
    from the registry) and the training operation with its full recipe."""
    spec = plan.spec
    recipe = spec.to_dict()
    parameters = {
        "architecture": spec.architecture.kind,
        "hyperparameters": spec.architecture.hyperparameters,
        "dataset": spec.data.dataset,
        "validation_fraction": spec.data.validation_fraction,
        "test_fraction": spec.data.test_fraction,
        "optimizer": recipe["optimizer"],
        "schedule": recipe["schedule"],
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "gradient_clip_norm": spec.gradient_clip_norm,
        "early_stopping": recipe["early_stopping"],
        "seed": spec.seed,
        "workers": spec.resources.workers,
    }
    parents = [plan.dataset.registry_version] if plan.dataset.registry_version else []
    return {"parents": parents,
            "operation": {"kind": "train", "job": job_name, "parameters": parameters}}


class TrainingJobRunner(JobRunner):
    """The trainer's `JobRunner`."""

    def __init__(self, registry: RegistryClient, config: RunnerConfig):
        self._registry = registry
        self._config = config

    def _job_name(self, job: JobRecord) -> str:
        return f"{self._config.job_collection}/{job.job_id}"

    async def prepare(self, job: JobRecord, workdir: Path) -> LaunchSpec | None:
        plan = TrainingPlan.from_dict(job.spec)
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        if await asyncio.to_thread(RunResult.read, workdir) is not None:
            return None  # trained before a restart; only publishing is left
        with continued_trace(plan.trace_context):
            await self._stage_dataset(plan.dataset, workdir / plan.dataset.staged_filename)
        await asyncio.to_thread(
            RunConfig(self._job_name(job), plan, self._config.torch_threads).write, workdir)
        return LaunchSpec(
            argv=job_process_command(self._config, plan.spec.resources.workers, workdir),
            cwd=workdir, log_path=workdir / LOG_FILENAME,
            env={"OMP_NUM_THREADS": str(self._config.torch_threads), "PYTHONUNBUFFERED": "1"})

    async def _stage_dataset(self, facts: DatasetFacts, destination: Path) -> None:
        if destination.exists():
            return  # staged by an earlier attempt; registry files were verified then
        if facts.registry_version is None:
            await asyncio.to_thread(write_builtin_dataset, facts.source, destination)
        else:
            await self._registry.download_dataset_version(
                facts.source, destination, sha256=facts.sha256,
                size_bytes=facts.size_bytes or None)

    async def complete(self, job: JobRecord, workdir: Path) -> dict[str, Any]:
        plan = TrainingPlan.from_dict(job.spec)
        result = await asyncio.to_thread(RunResult.read, workdir)
        if result is None:
            raise Internal("the job process exited successfully without writing its result")
        output = plan.spec.output
        test_accuracy = result.metrics.get("test_accuracy", 0.0)
        if output.min_test_accuracy and test_accuracy < output.min_test_accuracy:
            raise FailedPrecondition(
                f"test accuracy {test_accuracy:.4f} is below min_test_accuracy "
                f"{output.min_test_accuracy:.4f}; nothing was registered",
                reason="ACCURACY_BELOW_THRESHOLD",
                metadata={"test_accuracy": f"{test_accuracy:.6f}",
                          "min_test_accuracy": f"{output.min_test_accuracy:.6f}"})
        artifact_name, artifact_format = artifact_of(plan.spec)
        signature: dict[str, Any] = {}
        if plan.spec.architecture.kind in PRETRAINED_ARCHITECTURES:
            # An HF_TRANSFORMER carries no maas manifest the registry reads: declare it.
            signature = await asyncio.to_thread(classifier_signature, workdir / artifact_name)
        publication = ModelPublication(
            model_id=output.model_id, package_path=workdir / artifact_name,
            format=artifact_format, signature=signature,
            job_label=(TRAINING_JOB_LABEL, job.job_id),
            metrics=result.metrics, lineage=training_lineage(plan, self._job_name(job)),
            alias=output.alias,
            description=f"Trained by {self._job_name(job)}: {plan.spec.architecture.kind} on "
                        f"{plan.spec.data.dataset}, {result.epochs_completed} epochs.")
        with continued_trace(plan.trace_context):
            # A registry restart must not throw away a finished training run; publishing is
            # idempotent, so trying again cannot register the model twice.
            return {"model_version": await self._registry.publish_patiently(
                publication, attempts=PUBLISH_ATTEMPTS, retry_seconds=PUBLISH_RETRY_SECONDS,
                max_retry_seconds=PUBLISH_RETRY_MAX_SECONDS)}

    async def discard_work(self, job: JobRecord, workdir: Path) -> None:
        """Keep run.json, result.json and job.log as the job's record; the checkpoint, the
        staged data and the package (now in the registry, or rejected) only cost disk."""
        plan = TrainingPlan.from_dict(job.spec)
        for name in (CHECKPOINT_FILENAME, PACKAGE_FILENAME, HF_PACKAGE_FILENAME,
                     plan.dataset.staged_filename):
            await asyncio.to_thread((workdir / name).unlink, missing_ok=True)
