"""Use cases of the compressor, one per RPC: create, get, list, cancel and watch jobs.

Create validates everything before anything is queued: the spec on its own, the caller's
scopes, the source and fuse members (resolved in the registry, an alias once and for all,
then downloaded verified into the job's directory), the dataset, and the checks of
`maas_compressor.inspection` on the staged files. A rejected request leaves no job and no
files behind.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

from maas_formats.dataset_sources import BUILTIN_DATASETS, DatasetFacts, facts_from_dataset_version
from maas_jobs.manager import JobManager
from maas_jobs.records import JobDraft, JobRecord
from maas_jobs.scoped import ScopedJobs, tenant_of
from maas_runtime import scopes
from maas_runtime.auth import Principal, Role
from maas_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceRef,
)
from maas_runtime.names import validate_id
from maas_runtime.registry_client import RegistryClient
from maas_runtime.telemetry import current_trace_carrier

from maas_compressor.inspection import check_format, check_plan
from maas_compressor.plan import INPUTS_DIRECTORY, PYDOC_SENTENCES, CompressionPlan, InputVersion
from maas_compressor.runner import CompressionJobRunner
from maas_compressor.spec import PYDOC, CompressionSpec, field_path, parse_compression_spec

COLLECTION = "compressionJobs"
JOB_ID_FIELD = "compression_job_id"
_EXTENSIONS = {"MODEL_FORMAT_ONNX": "onnx", "MODEL_FORMAT_MAAS_PACKAGE": "safetensors",
               "MODEL_FORMAT_HF_TRANSFORMER": "zip"}


class CompressionJobs(ScopedJobs):
    """The compressor's domain facade over the job manager, the runner and the registry."""

    def __init__(self, manager: JobManager, runner: CompressionJobRunner,
                 registry: RegistryClient, work_root: Path):
        super().__init__(manager, COLLECTION)
        self._runner = runner
        self._registry = registry
        self._work_root = work_root

    async def create(self, job_id: str, spec_fields: dict, principal: Principal) -> JobRecord:
        job_id = validate_id(job_id, JOB_ID_FIELD) if job_id else f"compress-{uuid.uuid4().hex[:12]}"
        spec = parse_compression_spec(spec_fields, default_tenant=tenant_of(principal))
        scopes.require_models(principal, _models_of(spec))
        if spec.resources.tenant != tenant_of(principal):
            # Fair share is per tenant: only an admin may account work to another team.
            principal.require(Role.ADMIN, "submit jobs for another tenant")
        try:
            await self._manager.get(job_id)
        except NotFound:
            pass
        else:
            raise AlreadyExists("compression job", f"{COLLECTION}/{job_id}")
        plan = CompressionPlan(
            spec=spec,
            source=await self._resolve(spec.source_model_version,
                                       field_path("source_model_version"), "source"),
            members=[await self._resolve(name, _member_field(spec, position), f"member-{position}")
                     for position, name in enumerate(spec.fuse_members)],
            dataset=await self._dataset_facts(spec),
            trace_context=current_trace_carrier())
        workdir = self._work_root.resolve() / job_id
        try:
            await self._runner.stage_inputs(plan, workdir)
            await asyncio.to_thread(check_plan, plan, workdir)
            draft = JobDraft(job_id=job_id, spec=plan.to_dict(), tenant=spec.resources.tenant,
                             creator=principal.name, workers=1, priority=spec.resources.priority)
            return await self._manager.submit(draft)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            raise

    async def _resolve(self, reference: str, where: str, stem: str) -> InputVersion:
        try:
            version = await self._registry.resolve(reference)
        except NotFound:
            description = f"{reference} does not exist in the registry"
            raise InvalidArgument(f"{where}: {description}", reason="SOURCE_NOT_FOUND",
                                  field_violations=[FieldViolation(where, description)],
                                  resource=ResourceRef("model version", reference)) from None
        except InvalidArgument as error:
            # The registry judged the name itself: say which field of ours held it.
            raise InvalidArgument(f"{where}: {error.message}", reason="SOURCE_NOT_FOUND",
                                  field_violations=[FieldViolation(where, error.message)]) from None
        input_version = InputVersion.from_version(
            reference, version,
            f"{INPUTS_DIRECTORY}/{stem}.{_EXTENSIONS.get(version.get('format', ''), 'bin')}")
        check_format(input_version, where)
        return input_version

    async def _dataset_facts(self, spec: CompressionSpec) -> DatasetFacts:
        if spec.evaluation_dataset in ("", PYDOC):  # check_plan says whether the source fits
            return PYDOC_SENTENCES
        if spec.dataset_version is None:
            return BUILTIN_DATASETS[spec.evaluation_dataset]
        where = field_path("evaluation_dataset")
        try:
            version = await self._registry.get_dataset_version(spec.dataset_version)
        except NotFound:
            description = f"{spec.dataset_version} does not exist in the registry"
            raise FailedPrecondition(
                f"{where}: {description}", reason="DATASET_NOT_FOUND",
                field_violations=[FieldViolation(where, description)],
                resource=ResourceRef("dataset version", spec.dataset_version)) from None
        return facts_from_dataset_version(version)

    def models_of(self, job: JobRecord) -> list[str]:
        return _models_of(CompressionPlan.from_dict(job.spec).spec)


def _member_field(spec: CompressionSpec, position: int) -> str:
    """The field of the `position`-th fuse member over all fuse steps."""
    seen = 0
    for index, step in enumerate(spec.steps):
        if step.kind != "fuse":
            continue
        count = len(step.parameters["model_versions"])
        if position < seen + count:
            return field_path(f"steps[{index}].fuse.model_versions[{position - seen}]")
        seen += count
    return field_path("steps")


def _models_of(spec: CompressionSpec) -> list[str]:
    """Every model the job reads or writes: a scoped token must cover them all."""
    names = [spec.source_model_version, *spec.fuse_members]
    return [spec.output.model_id, *(model for model in map(scopes.model_id_of, names) if model)]

