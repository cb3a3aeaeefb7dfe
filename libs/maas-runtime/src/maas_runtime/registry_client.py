"""The one registry client every service uses: reads, verified downloads, uploads, alias moves.

Callers get domain values (dicts in the contract's shape) and the suite's errors (a registry
NOT_FOUND stays NOT_FOUND; an unreachable registry is UNAVAILABLE saying which transport was
tried), never `grpc` types, so domain code stays free of gRPC.

Every call has a deadline (`timeout_seconds`; a whole download or upload is one call). A
download goes to a private temporary file beside the destination (`tempfile.mkstemp`),
written and hashed off the event loop, checked against the recorded sha256 and size, and
renamed into place only then; on any error — a corrupt stream, a deadline, cancellation — the
temporary file is removed and the destination left as it was. Given a `DownloadRetry`, a
download cut short (the replica serving it died) goes on at the byte it reached, on the next
replica, within the same deadline: the download RPCs take a byte offset, and the digest is
computed over every byte as it arrives, so the check at the end covers the stitched file.

Publishing is idempotent per producing job: the version carries the job's id as a label, and
a publish repeated after a crash (upload done, outcome not yet recorded) finds that version
again — same label, same sha256 — instead of uploading a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from maas.registry.v1 import audit_pb2, model_pb2, registry_service_pb2 as rs
from maas.registry.v1.registry_service_pb2_grpc import RegistryServiceStub

from maas_runtime import errors
from maas_runtime.messages import to_dict, to_message
from maas_runtime.peers import PeerChannel

__all__ = ["DownloadRetry", "ModelPublication", "RegistryClient", "file_sha256"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSFER_CHUNK_BYTES = 1024 * 1024
ALIAS_EVENT_TYPES = (audit_pb2.EVENT_TYPE_ALIAS_MOVED, audit_pb2.EVENT_TYPE_ALIAS_DELETED)


@dataclass(frozen=True)
class ModelPublication:
    """A model file and everything the registry should record with it."""

    model_id: str
    package_path: Path
    job_label: tuple[str, str]
    """(label key, job id) marking the producing job; makes a repeated publish find its
    version instead of uploading a second one, e.g. ("training_job", "train-1")."""
    format: str = "MODEL_FORMAT_MAAS_PACKAGE"
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    """{"parents": [...], "operation": {"kind", "job", "parameters"}} in the contract's shape."""
    alias: str = ""
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    signature: dict[str, Any] = field(default_factory=dict)
    """The registry `Signature` (contract JSON shape); required for ONNX and TorchScript, and
    taken from the manifest of a maas-package when empty."""


@dataclass(frozen=True)
class DownloadRetry:
    """How a download cut short goes on: where, and after how long."""

    replicas: Callable[[], Awaitable[Sequence[RegistryServiceStub]]]
    """The registry replicas one download tries, in turn (attempt n takes the n-th, wrapping)."""
    backoff_seconds: Callable[[errors.MaasError, int], float | None]
    """Seconds to wait after failed attempt number n (1-based, counted since the download last
    moved forward) before the next, or None to give up and raise that error."""


class RegistryClient:
    """Registry calls over one `PeerChannel`; open it with `open()`, end with `close()`."""

    def __init__(self, peer: PeerChannel, *, timeout_seconds: float = 120.0,
                 watch_period_seconds: float = 300.0):
        self._peer = peer
        self._timeout = timeout_seconds
        self._watch_period = watch_period_seconds

    async def open(self) -> None:
        await self._peer.open()

    async def close(self) -> None:
        await self._peer.close()

    def _stub(self) -> RegistryServiceStub:
        return self._peer.stub(RegistryServiceStub)

    async def _call(self, method: Callable[[RegistryServiceStub], Callable[..., Any]],
                    request: Message) -> Any:
        try:
            return await method(self._stub())(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise self._peer.error(error) from None

    # Reads ---------------------------------------------------------------------------------

    async def get_dataset_version(self, name: str) -> dict[str, Any]:
        """The `DatasetVersion` as a dict; NOT_FOUND when it does not exist."""
        return to_dict(await self._call(lambda stub: stub.GetDatasetVersion,
                                        rs.GetDatasetVersionRequest(name=name)))

    async def resolve(self, reference: str) -> dict[str, Any]:
        """`models/m@alias` or `models/m/versions/n` → the `ModelVersion` as a dict."""
        return to_dict(await self._call(lambda stub: stub.GetModelVersion,
                                        rs.GetModelVersionRequest(name=reference)))

    # Verified downloads ----------------------------------------------------------------------

    async def download_model_version(self, version: dict[str, Any], destination: Path, *,
                                     retry: DownloadRetry | None = None) -> None:
        """The artifact of `version` (a resolved `ModelVersion` dict) at `destination`,
        verified against its recorded sha256 and size; FAILED_PRECONDITION otherwise."""
        artifact = version.get("artifact", {})
        await self._download(
            lambda stub, offset, timeout: stub.DownloadModelVersion(
                rs.DownloadModelVersionRequest(name=version["name"], offset=offset),
                timeout=timeout),
            version["name"], Path(destination), artifact.get("sha256", ""),
            int(artifact.get("size_bytes", 0)), reason="ARTIFACT_CORRUPT", retry=retry)

    async def download_dataset_version(self, name: str, destination: Path, *, sha256: str,
                                       size_bytes: int | None = None,
                                       retry: DownloadRetry | None = None) -> None:
        """The dataset file at `destination`, verified against `sha256` (and `size_bytes`
        when given); FAILED_PRECONDITION otherwise."""
        await self._download(
            lambda stub, offset, timeout: stub.DownloadDatasetVersion(
                rs.DownloadDatasetVersionRequest(name=name, offset=offset), timeout=timeout),
            name, Path(destination), sha256, size_bytes, reason="DATASET_DIGEST_MISMATCH",
            retry=retry)

    async def _download(self, open_stream: Callable[[RegistryServiceStub, int, float], Any],
                        name: str, destination: Path, sha256: str, size_bytes: int | None, *,
                        reason: str, retry: DownloadRetry | None) -> None:
        if not sha256:
            raise errors.FailedPrecondition(f"{name} records no sha256; refusing to download "
                                            "what cannot be verified", reason=reason)
        handle, temporary = tempfile.mkstemp(dir=destination.parent,
                                             prefix=f".{destination.name}.", suffix=".part")
        sink = _VerifyingFile(handle)
        kept = False
        try:
            await self._receive(open_stream, name, sink, sha256, size_bytes, reason=reason,
                                retry=retry)
            digest = await _off_loop(sink.finish)
            if size_bytes and sink.size != size_bytes:
                raise _corrupt(name, f"{sink.size} bytes, but the registry records "
                               f"{size_bytes}", reason)
            if digest != sha256:
                raise _corrupt(name, f"sha256 {digest}, but the registry records {sha256}",
                               reason)
            await _off_loop(os.replace, temporary, destination)
            kept = True
        finally:
            sink.close()
            if not kept:
                Path(temporary).unlink(missing_ok=True)

    async def _receive(self, open_stream: Callable[[RegistryServiceStub, int, float], Any],
                       name: str, sink: _VerifyingFile, sha256: str, size_bytes: int | None, *,
                       reason: str, retry: DownloadRetry | None) -> None:
        """Every byte of the artifact into `sink`: one stream, or with `retry` as many as it
        takes, each starting at the byte the last one reached."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        attempt, failed_attempts, replicas = 0, 0, list[RegistryServiceStub]()
        while True:
            offset, stream = sink.size, None
            try:
                if retry is None:
                    replicas = [self._stub()]
                elif attempt == 0 or len(replicas) < 2:  # one order per download
                    replicas = list(await retry.replicas()) or [self._stub()]
                stream = open_stream(replicas[attempt % len(replicas)], offset,
                                     max(deadline - loop.time(), 0.001))
                attempt += 1
                async for message in stream:
                    content = message.WhichOneof("content")
                    if content == "header":
                        recorded = message.header.artifact.sha256
                        if recorded and recorded != sha256:  # never stitch two artifacts
                            raise _corrupt(name, f"an artifact of sha256 {recorded}", reason)
                        continue
                    await _off_loop(sink.write, message.chunk)
                    if size_bytes and sink.size > size_bytes:
                        raise _corrupt(name, f"more than the {size_bytes} bytes recorded",
                                       reason)
                return
            except grpc.aio.AioRpcError as rpc_error:
                error = self._peer.error(rpc_error)
            except errors.Unavailable as unavailable:  # no replica is healthy (discovery)
                error = unavailable
            finally:
                if stream is not None:  # a no-op once it ended; frees the call stopped early
                    stream.cancel()
            failed_attempts = 1 if sink.size > offset else failed_attempts + 1
            wait = None if retry is None else retry.backoff_seconds(error, failed_attempts)
            if wait is None or loop.time() + wait >= deadline:
                raise error
            _log.warning("download of %s cut short at byte %d of %s (%s); resuming there on "
                         "the next replica", name, sink.size, size_bytes or "?", error.message)
            await asyncio.sleep(wait)

    # Uploads -------------------------------------------------------------------------------

    async def publish(self, publication: ModelPublication) -> str:
        """Register the file as a version of `publication.model_id` (creating the model if
        needed) unless this job already did, set the alias if asked; the version's name."""
        parent = f"models/{publication.model_id}"
        try:
            await self._call(lambda stub: stub.CreateModel,
                             rs.CreateModelRequest(model_id=publication.model_id))
        except errors.AlreadyExists:
            pass
        sha256 = await _off_loop(file_sha256, publication.package_path)
        version_name = await self._version_of_job(parent, publication.job_label, sha256)
        if version_name is None:
            version_name = await self.upload_model_version(parent, publication, sha256)
        if publication.alias:
            await self._call(lambda stub: stub.SetModelAlias, rs.SetModelAliasRequest(
                name=f"{parent}/aliases/{publication.alias}", version=version_name))
        return version_name

    async def publish_patiently(self, publication: ModelPublication, *, attempts: int = 25,
                                retry_seconds: float = 2.0,
                                max_retry_seconds: float = 15.0) -> str:
        """`publish`, tried again while the registry is unreachable (a restart, a failover):
        a finished job's result must not be thrown away for an outage of a few minutes (the
        defaults outlast about five). Idempotent publishing makes the retries safe."""
        for attempt in range(1, attempts + 1):
            try:
                return await self.publish(publication)
            except (errors.Unavailable, errors.DeadlineExceeded):
                if attempt == attempts:
                    raise
                await asyncio.sleep(min(retry_seconds * attempt, max_retry_seconds))
        raise AssertionError("unreachable")

    async def _version_of_job(self, parent: str, job_label: tuple[str, str],
                              sha256: str) -> str | None:
        """The version this job already registered: its label and its exact bytes."""
        key, job_id = job_label
        listing = await self._call(lambda stub: stub.ListModelVersions,
                                   rs.ListModelVersionsRequest(
                                       parent=parent, page_size=100,
                                       filter=f'labels.{key} = "{job_id}"'))
        return next((version.name for version in listing.model_versions
                     if version.artifact.sha256 == sha256), None)

    async def upload_model_version(self, parent: str, publication: ModelPublication,
                                   sha256: str) -> str:
        """Stream the file as a new version of `parent`; the created version's name."""
        data_path = publication.package_path
        key, job_id = publication.job_label
        version = to_message({
            "format": publication.format,
            "metrics": publication.metrics,
            "labels": {**publication.labels, key: job_id},
            "lineage": publication.lineage,
            "description": publication.description,
            **({"signature": publication.signature} if publication.signature else {}),
        }, model_pb2.ModelVersion)
        header = rs.UploadModelVersionHeader(
            parent=parent, model_version=version, expected_sha256=sha256,
            size_bytes=data_path.stat().st_size)

        async def requests() -> AsyncIterator[rs.UploadModelVersionRequest]:
            yield rs.UploadModelVersionRequest(header=header)
            with data_path.open("rb") as handle:
                while chunk := await _off_loop(handle.read, TRANSFER_CHUNK_BYTES):
                    yield rs.UploadModelVersionRequest(chunk=chunk)

        try:
            created = await self._call(lambda stub: stub.UploadModelVersion, requests())
        except errors.MaasError as error:
            # Say where it happened: a rejected upload is the publisher's result, not its
            # caller's request.
            error.message = f"the registry rejected the model: {error.message}"
            raise
        return created.name

    # Alias moves ---------------------------------------------------------------------------

    async def alias_changes(self, retry_seconds: float = 1.0) -> AsyncIterator[str]:
        """Yield `models/{m}@{alias}` whenever an alias moves or is deleted, forever.

        Each watch call ends after `watch_period_seconds` (its deadline, so a half-open
        connection is noticed) and resumes after the last event seen, as after an outage.
        """
        last_event_id = 0
        while True:
            try:
                async for event in self._stub().WatchEvents(
                        rs.WatchEventsRequest(after_event_id=last_event_id,
                                              types=list(ALIAS_EVENT_TYPES)),
                        timeout=self._watch_period):
                    last_event_id = event.event_id
                    _, model_id, _, alias = event.resource.split("/")
                    yield f"models/{model_id}@{alias}"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the period ended; watch on from the last event
                _log.warning("registry event stream ended (%s); reconnecting",
                             self._peer.error(error).message)
                await asyncio.sleep(retry_seconds)
            except Exception as error:  # no healthy replica and the like: keep following
                _log.warning("registry event stream ended (%s); reconnecting", error)
                await asyncio.sleep(retry_seconds)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(TRANSFER_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(name: str, found: str, reason: str) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"{name} downloaded as {found}; refusing to use it (nothing was kept)", reason=reason,
        metadata={"resource": name})


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread. If the caller is cancelled meanwhile, the thread
    is still waited for before the cancellation goes on, so no cleanup (closing or removing
    the file) races a write that is still running."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})
        raise


class _VerifyingFile:
    """A download in progress: bytes appended and hashed; fsynced on finish."""

    def __init__(self, handle: int):
        self._file = os.fdopen(handle, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._file.write(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._digest.hexdigest()

    def close(self) -> None:
        self._file.close()
