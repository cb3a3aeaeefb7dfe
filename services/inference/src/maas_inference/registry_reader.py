"""What the inference service reads from the registry: versions, artifacts, alias moves."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from maas.registry.v1 import audit_pb2, registry_service_pb2 as rs
from maas_runtime import errors
from maas_runtime.grpc_errors import from_rpc_error
from maas_runtime.messages import to_dict

_log = logging.getLogger(__name__)


class RegistryReader:
    """Resolves model references and fetches artifacts through the registry's gRPC API."""

    def __init__(self, stub):
        self._stub = stub

    async def resolve(self, reference: str) -> dict:
        """`models/m@alias` or `models/m/versions/n` → the ModelVersion as a dict."""
        try:
            version = await self._stub.GetModelVersion(rs.GetModelVersionRequest(name=reference))
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return to_dict(version)

    async def download(self, version: dict, destination: Path) -> None:
        """Stream the artifact to `destination`, verifying size and sha256 before keeping it.

        Each download writes its own temporary file (concurrent loads of one version do not
        interleave), off the event loop, and renames it into place only when verified.
        """
        expected_sha = version["artifact"]["sha256"]
        partial = destination.with_name(f"{destination.name}.{uuid.uuid4().hex}.part")
        sink = _VerifyingFile(partial)
        try:
            async for message in self._stub.DownloadModelVersion(
                    rs.DownloadModelVersionRequest(name=version["name"])):
                if message.WhichOneof("content") == "chunk":
                    await asyncio.to_thread(sink.write, message.chunk)
            digest = await asyncio.to_thread(sink.finish)
            if digest != expected_sha:
                raise errors.FailedPrecondition(
                    f"{version['name']} downloaded with sha256 {digest}, but the registry "
                    f"recorded {expected_sha}; refusing to serve it", reason="ARTIFACT_CORRUPT")
            os.replace(partial, destination)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            sink.close()
            partial.unlink(missing_ok=True)

    async def alias_changes(self, retry_seconds: float = 1.0) -> AsyncIterator[str]:
        """Yield `models/{m}@{alias}` whenever an alias moves or is deleted, forever.

        Reconnects after registry outages, resuming after the last event seen.
        """
        last_event_id = 0
        types = [audit_pb2.EVENT_TYPE_ALIAS_MOVED, audit_pb2.EVENT_TYPE_ALIAS_DELETED]
        while True:
            try:
                async for event in self._stub.WatchEvents(
                    rs.WatchEventsRequest(after_event_id=last_event_id, types=types)
                ):
                    last_event_id = event.event_id
                    _, model_id, _, alias = event.resource.split("/")
                    yield f"models/{model_id}@{alias}"
            except asyncio.CancelledError:
                raise
            except Exception as error:  # outages, no healthy replica: keep following
                _log.warning("registry event stream ended (%s); reconnecting", error)
                await asyncio.sleep(retry_seconds)


class _VerifyingFile:
    """A file being downloaded: bytes appended and hashed, fsynced on finish."""

    def __init__(self, path: Path):
        self._handle = path.open("xb")
        self._digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._handle.write(chunk)

    def finish(self) -> str:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return self._digest.hexdigest()

    def close(self) -> None:
        self._handle.close()
