"""Use cases of the trainer, one per RPC: create, get, list, cancel and watch training jobs.

Create validates everything before anything is queued: the spec on its own, the pool, the
dataset (looked up in the registry when it is a registry version) and whether the
architecture can read the dataset's features. A rejected request leaves no trace.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from maas_jobs.manager import JobManager
from maas_jobs.records import JobDraft, JobRecord
from maas_jobs.scoped import ScopedJobs, tenant_of
from maas_runtime import scopes
from maas_runtime.auth import Principal, Role
from maas_runtime.errors import FailedPrecondition, FieldViolation, NotFound, ResourceRef
from maas_runtime.names import validate_id
from maas_runtime.registry_client import RegistryClient
from maas_runtime.telemetry import current_trace_carrier

from maas_trainer.datasets import BUILTIN_DATASETS, DatasetFacts, facts_from_dataset_version
from maas_trainer.plan import TrainingPlan
from maas_trainer.spec import TrainingSpec, field_path, parse_training_spec
from maas_trainer.validation import (
    check_against_dataset,
    check_architecture_reads_dataset,
    check_fits_pool,
)

COLLECTION = "trainingJobs"
JOB_ID_FIELD = "training_job_id"


class TrainingJobs(ScopedJobs):
    """The trainer's domain facade over the job manager and the registry."""

    def __init__(self, manager: JobManager, registry: RegistryClient) -> None:
        super().__init__(manager, COLLECTION)
        self._registry = registry

    async def create(self, job_id: str, spec_fields: dict[str, Any],
                     principal: Principal) -> JobRecord:
        job_id = validate_id(job_id, JOB_ID_FIELD) if job_id else f"train-{uuid.uuid4().hex[:12]}"
        spec = parse_training_spec(spec_fields, default_tenant=tenant_of(principal))
        scopes.require_models(principal, [spec.output.model_id])
        if spec.resources.tenant != tenant_of(principal):
            # Fair share is per tenant: only an admin may account work to another team.
            principal.require(Role.ADMIN, "submit jobs for another tenant")
        check_fits_pool(spec, self._manager.pool_size)
        facts = await self._dataset_facts(spec)
        check_against_dataset(spec, facts)
        await asyncio.to_thread(check_architecture_reads_dataset, spec, facts)
        draft = JobDraft(job_id=job_id, spec=TrainingPlan(spec, facts, current_trace_carrier()).to_dict(),
                         tenant=spec.resources.tenant, creator=principal.name,
                         workers=spec.resources.workers, priority=spec.resources.priority)
        return await self._manager.submit(draft)

    async def _dataset_facts(self, spec: TrainingSpec) -> DatasetFacts:
        if spec.data.registry_version is None:
            return BUILTIN_DATASETS[spec.data.dataset]
        try:
            version = await self._registry.get_dataset_version(spec.data.dataset)
        except NotFound:
            description = f"{spec.data.dataset} does not exist in the registry"
            raise FailedPrecondition(
                f"{field_path('data.dataset')}: {description}", reason="DATASET_NOT_FOUND",
                field_violations=[FieldViolation(field_path("data.dataset"), description)],
                resource=ResourceRef("dataset version", spec.data.dataset)) from None
        return facts_from_dataset_version(version)

    def models_of(self, job: JobRecord) -> list[str]:
        """A training job involves one model: the one it trains."""
        return [TrainingPlan.from_dict(job.spec).spec.output.model_id]
