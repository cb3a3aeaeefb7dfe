"""Composition root of the registry: settings → store, blobs, domain → gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from maas.registry.v1 import registry_service_pb2_grpc
from maas_formats import validate_dataset, validate_model_artifact
from maas_runtime.pagination import PageTokenCodec
from maas_runtime.server import ServiceBinding, ServiceServer, run_service
from maas_runtime.telemetry import Telemetry

from maas_registry.blobs import BlobStore
from maas_registry.database import create_database_engine, migrate
from maas_registry.metrics import RegistryMetrics
from maas_registry.registry import Registry, RegistryLimits
from maas_registry.servicer import RegistryServicer
from maas_registry.settings import RegistrySettings
from maas_registry.store import SqlRegistryStore

_log = logging.getLogger(__name__)
SERVICE_NAME = "maas.registry.v1.RegistryService"


def build_registry(settings: RegistrySettings
                   ) -> tuple[Registry, SqlRegistryStore, BlobStore]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    url = settings.database_url or f"sqlite:///{settings.state_dir.resolve() / 'registry.db'}"
    engine = create_database_engine(url)
    migrate(engine)
    store = SqlRegistryStore(engine)
    blobs = BlobStore(Path(settings.blob_dir) if settings.blob_dir else settings.state_dir / "blobs")
    limits = RegistryLimits(
        max_artifact_bytes=settings.max_artifact_bytes,
        download_chunk_bytes=settings.download_chunk_bytes,
        gc_grace_seconds=settings.gc_grace_seconds,
        event_poll_seconds=settings.event_poll_seconds)
    page_tokens = PageTokenCodec.from_secret_file(settings.resolved_page_token_secret_file)
    registry = Registry(store, blobs, page_tokens, limits, validate_model_artifact,
                        validate_dataset)
    return registry, store, blobs


def build_server(settings: RegistrySettings, telemetry: Telemetry | None = None,
                 discovery=None) -> ServiceServer:
    registry, store, blobs = build_registry(settings)
    servicer = RegistryServicer(registry)
    server = ServiceServer(
        "registry", settings,
        [ServiceBinding(SERVICE_NAME, lambda s:
                        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer,
                                                                                        s))],
        telemetry=telemetry, discovery=discovery)
    collector = _PeriodicCollection(registry, settings.gc_interval_seconds)
    # SERVING only after the start-up collection: it must not overlap the first uploads.
    server.warm_up.append(collector.collect_now)
    server.on_start.append(collector.start)
    server.on_stop.append(collector.stop)
    server.on_stop.append(store.close)
    if telemetry is not None:
        metrics = RegistryMetrics(blobs, telemetry.meter("maas.registry"),
                                  settings.storage_metrics_poll_seconds)
        server.on_start.append(metrics.start)
        server.on_stop.insert(0, metrics.stop)
    return server


class _PeriodicCollection:
    """Collects unreferenced blobs at start-up (after a crash), then periodically."""

    def __init__(self, registry: Registry, interval_seconds: float):
        self._registry = registry
        self._interval = interval_seconds
        self._task: asyncio.Task | None = None

    async def collect_now(self) -> None:
        try:
            await self._registry.collect_garbage()
        except Exception:
            _log.exception("blob collection failed")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.collect_now()


def main() -> None:
    run_service("registry", RegistrySettings(), build_server)


if __name__ == "__main__":
    main()
