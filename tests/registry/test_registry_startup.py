"""Start-up order: the registry reports SERVING only once its start-up blob collection is
done, and an upload that arrives meanwhile (a client not waiting for health) keeps its blob,
even with a zero grace period."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading

from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_registry.blobs import BlobStore
from maas_registry.server import build_server
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel

from tests.registry.helpers import blob_files, download, mlp_package, model_upload_requests

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_is_serving_only_after_the_startup_collection_and_keeps_a_blob_committed_meanwhile(
        tmp_path, monkeypatch):
    collecting, release = threading.Event(), threading.Event()
    real_collect = BlobStore.collect

    def slow_collect(self, referenced, grace_seconds):
        collecting.set()
        assert release.wait(30), "the test never let the collection finish"
        return real_collect(self, referenced, grace_seconds)

    monkeypatch.setattr(BlobStore, "collect", slow_collect)
    # An orphan from "before the crash": the start-up collection must remove it.
    settings = RegistrySettings(state_dir=tmp_path, port=0, gc_grace_seconds=0)
    orphan = tmp_path / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left behind")

    server = build_server(settings)
    starting = asyncio.create_task(server.start())
    assert await asyncio.to_thread(collecting.wait, 30), "no start-up collection ran"
    channel = open_channel(f"127.0.0.1:{server.port}",
                           token=(tmp_path / "admin.token").read_text().strip())
    try:
        assert await health_of(channel, "") == NOT_SERVING
        assert await health_of(channel, "maas.registry.v1.RegistryService") == NOT_SERVING
        assert await health_of(channel, "liveness") == SERVING
        assert not starting.done()

        # A client that does not wait for health uploads during the collection.
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
        package = mlp_package()
        upload = asyncio.ensure_future(
            stub.UploadModelVersion(model_upload_requests("models/digits", package)))
        await asyncio.sleep(0.5)  # received and validated; waits to commit behind the collection
        assert not upload.done()
        assert await health_of(channel, "") == NOT_SERVING

        release.set()
        assert await asyncio.wait_for(starting, 30) == server.port
        assert await health_of(channel, "") == SERVING
        assert await health_of(channel, "maas.registry.v1.RegistryService") == SERVING
        version = await asyncio.wait_for(upload, 30)
        assert not orphan.exists(), "the start-up collection did its job"
        assert [p.name for p in blob_files(tmp_path)] == [version.artifact.sha256]
        _, data = await download(stub.DownloadModelVersion(
            rs.DownloadModelVersionRequest(name=version.name)))
        assert data == package
    finally:
        release.set()
        await channel.close()
        await server.stop(0)


def test_a_replica_sharing_the_blob_directory_never_sweeps_another_live_upload(tmp_path):
    """Two registries on one blob directory (replicas): a collection with no grace period removes
    the staging files of dead processes and of nobody, but never one a live process on this host
    is still writing (the scale drill lost an upload that way when a restarted replica swept)."""
    store = BlobStore(tmp_path)
    staging = tmp_path / "staging"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = socket.gethostname()
        live = staging / f"{host}-{writer.pid}-aaaa.part"
        abandoned = staging / f"{host}-{dead.pid}-bbbb.part"
        other_host = staging / f"elsewhere-{os.getpid()}-cccc.part"
        for path in (live, abandoned, other_host):
            path.write_bytes(b"partial upload")
        store.collect(referenced=set(), grace_seconds=0)
        assert live.exists(), "another live replica's upload was swept"
        assert not abandoned.exists()
        assert not other_host.exists(), "with no grace, another host's old file goes"
    finally:
        writer.kill()
        writer.wait()
