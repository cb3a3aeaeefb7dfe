"""The trainer's view of the registry: read dataset versions, publish trained models.

An adapter over the registry's gRPC API; callers get domain values and domain errors
(a registry NOT_FOUND stays NOT_FOUND, an unreachable registry is UNAVAILABLE), never
`grpc` types.

Publishing is idempotent per training job: each version is labelled with the job id, and a
job that crashed after uploading but before recording the outcome finds its version again
(same label and same artifact sha256, so a version someone else labelled does not count)
instead of uploading a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from maas.registry.v1 import model_pb2, registry_service_pb2
from maas.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from maas_runtime.errors import AlreadyExists, FailedPrecondition, MaasError
from maas_runtime.grpc_errors import from_rpc_error
from maas_runtime.messages import to_dict, to_message

UPLOAD_CHUNK_BYTES = 1024 * 1024
TRAINING_JOB_LABEL = "training_job"
"""Label on every version the trainer registers: the id of the job that produced it."""


@dataclass(frozen=True)
class ModelPublication:
    """A trained model package and everything the registry should record with it."""

    model_id: str
    package_path: Path
    job_id: str
    metrics: dict[str, float]
    lineage: dict[str, Any]
    """{"parents": [...], "operation": {"kind", "job", "parameters"}} in the contract's shape."""
    alias: str = ""
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)


async def _registry_call(awaitable):
    try:
        return await awaitable
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None


class RegistryGateway:
    """Registry calls the trainer makes; `stub` returns a stub on the current channel."""

    def __init__(self, stub: Callable[[], RegistryServiceStub], *, timeout_seconds: float = 60.0):
        self._stub = stub
        self._timeout = timeout_seconds

    async def get_dataset_version(self, name: str) -> dict[str, Any]:
        """The `DatasetVersion` as a dict; NOT_FOUND when it does not exist."""
        version = await _registry_call(self._stub().GetDatasetVersion(
            registry_service_pb2.GetDatasetVersionRequest(name=name), timeout=self._timeout))
        return to_dict(version)

    async def download_dataset_version(self, name: str, expected_sha256: str,
                                       destination: Path) -> None:
        """Stream the artifact to `destination`; FAILED_PRECONDITION when the digest differs."""
        partial = destination.with_name(destination.name + ".partial")
        digest = hashlib.sha256()
        stream = self._stub().DownloadDatasetVersion(
            registry_service_pb2.DownloadDatasetVersionRequest(name=name), timeout=self._timeout)
        try:
            with partial.open("wb") as handle:
                async for message in stream:
                    if message.WhichOneof("content") == "chunk":
                        digest.update(message.chunk)
                        await asyncio.to_thread(handle.write, message.chunk)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        if digest.hexdigest() != expected_sha256:
            partial.unlink(missing_ok=True)
            raise FailedPrecondition(
                f"{name} downloaded with sha256 {digest.hexdigest()}, but the registry records "
                f"{expected_sha256}; refusing to train on it", reason="DATASET_DIGEST_MISMATCH")
        partial.replace(destination)

    async def publish(self, publication: ModelPublication) -> str:
        """Register the package as a new version (creating the model if needed), set the
        alias if asked; returns the version's resource name."""
        stub = self._stub()
        parent = f"models/{publication.model_id}"
        try:
            await _registry_call(stub.CreateModel(registry_service_pb2.CreateModelRequest(
                model_id=publication.model_id), timeout=self._timeout))
        except AlreadyExists:
            pass
        sha256 = await asyncio.to_thread(_file_sha256, publication.package_path)
        version_name = await self._version_of_job(parent, publication.job_id, sha256)
        if version_name is None:
            version_name = await self._upload(stub, parent, publication, sha256)
        if publication.alias:
            await _registry_call(stub.SetModelAlias(registry_service_pb2.SetModelAliasRequest(
                name=f"{parent}/aliases/{publication.alias}", version=version_name),
                timeout=self._timeout))
        return version_name

    async def _version_of_job(self, parent: str, job_id: str, sha256: str) -> str | None:
        """The version this job already registered: its label and its exact bytes."""
        listing = await _registry_call(self._stub().ListModelVersions(
            registry_service_pb2.ListModelVersionsRequest(
                parent=parent, page_size=100,
                filter=f'labels.{TRAINING_JOB_LABEL} = "{job_id}"'), timeout=self._timeout))
        return next((version.name for version in listing.model_versions
                     if version.artifact.sha256 == sha256), None)

    async def _upload(self, stub: RegistryServiceStub, parent: str,
                      publication: ModelPublication, sha256: str) -> str:
        data_path = publication.package_path
        version = to_message({
            "format": "MODEL_FORMAT_MAAS_PACKAGE",
            "metrics": publication.metrics,
            "labels": {**publication.labels, TRAINING_JOB_LABEL: publication.job_id},
            "lineage": publication.lineage,
            "description": publication.description,
        }, model_pb2.ModelVersion)
        header = registry_service_pb2.UploadModelVersionHeader(
            parent=parent, model_version=version, expected_sha256=sha256,
            size_bytes=data_path.stat().st_size)

        async def requests() -> AsyncIterator[registry_service_pb2.UploadModelVersionRequest]:
            yield registry_service_pb2.UploadModelVersionRequest(header=header)
            with data_path.open("rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, UPLOAD_CHUNK_BYTES):
                    yield registry_service_pb2.UploadModelVersionRequest(chunk=chunk)

        try:
            created = await _registry_call(stub.UploadModelVersion(requests(),
                                                                   timeout=self._timeout))
        except MaasError as error:
            # Say where it happened: a rejected upload is the trainer's result, not the caller's.
            error.message = f"the registry rejected the trained model: {error.message}"
            raise
        return created.name


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(UPLOAD_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()
