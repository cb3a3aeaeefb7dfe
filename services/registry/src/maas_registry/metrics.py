"""The registry's storage series: bytes stored, bytes moved, and room left on the blob disk.

`maas.registry.blob.stored` / `maas.registry.blobs` come from a walk of the blob store
every `poll_seconds` (off the event loop); upload and download bytes are counters of what
this process streamed (`rate()` gives bytes per second); free and total bytes of the file
system holding the blobs feed the "disk nearly full" alert. No grpc here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from opentelemetry.metrics import Observation

from maas_registry.blobs import BlobStore

_log = logging.getLogger(__name__)


class RegistryMetrics:
    """Observable series over one `BlobStore`; `start`/`stop` run the storage walk."""

    def __init__(self, blobs: BlobStore, meter, poll_seconds: float = 30.0):
        self._blobs = blobs
        self._poll_seconds = poll_seconds
        self._stored: tuple[int, int] | None = None
        self._disk: tuple[int, int] | None = None
        self._task: asyncio.Task | None = None
        meter.create_observable_gauge(
            "maas.registry.blob.stored", unit="By", callbacks=[self._observe_bytes],
            description="bytes of committed blobs (content-addressed, so shared ones once)")
        meter.create_observable_gauge(
            "maas.registry.blobs", unit="{blob}", callbacks=[self._observe_blobs],
            description="committed blobs")
        meter.create_observable_counter(
            "maas.registry.upload", unit="By", callbacks=[self._observe_upload],
            description="bytes uploaded (artifacts and datasets) into this replica")
        meter.create_observable_counter(
            "maas.registry.download", unit="By", callbacks=[self._observe_download],
            description="bytes downloaded from this replica")
        meter.create_observable_gauge(
            "maas.registry.disk.free", unit="By", callbacks=[self._observe_free],
            description="free bytes on the file system holding the blobs")
        meter.create_observable_gauge(
            "maas.registry.disk.size", unit="By", callbacks=[self._observe_size],
            description="size of the file system holding the blobs")

    async def refresh(self) -> None:
        self._stored = await asyncio.to_thread(self._blobs.stored_bytes)
        usage = await asyncio.to_thread(shutil.disk_usage, self._blobs.root)
        self._disk = (usage.free, usage.total)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except OSError:
                _log.warning("could not measure the blob store", exc_info=True)
            await asyncio.sleep(self._poll_seconds)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _observe_bytes(self, _options) -> list[Observation]:
        return [Observation(self._stored[1])] if self._stored else []

    def _observe_blobs(self, _options) -> list[Observation]:
        return [Observation(self._stored[0])] if self._stored else []

    def _observe_upload(self, _options) -> list[Observation]:
        return [Observation(self._blobs.bytes_received)]

    def _observe_download(self, _options) -> list[Observation]:
        return [Observation(self._blobs.bytes_sent)]

    def _observe_free(self, _options) -> list[Observation]:
        return [Observation(self._disk[0])] if self._disk else []

    def _observe_size(self, _options) -> list[Observation]:
        return [Observation(self._disk[1])] if self._disk else []
