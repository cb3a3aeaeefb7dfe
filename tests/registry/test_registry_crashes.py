"""Kill -9 of registry processes mid-upload, and two replicas writing one PostgreSQL.

The registry runs as a real subprocess (`python -m maas_registry.server`); uploads are cut
off by SIGKILL at random points, repeatedly. After every restart: no partial version is
listed, collection leaves no orphan blob or staging file, and every listed version
downloads with its recorded sha256.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc

from tests.registry.helpers import (
    blob_files,
    digits_signature,
    download,
    model_upload_requests,
    sha256,
    staging_files,
)
from tests.support.artifacts import onnx_like
from tests.support.postgres import postgres_database_or_skip
from tests.support.processes import RegistryProcess


def _artifact(seed: int, size: int = 3 * 1024 * 1024) -> bytes:
    return onnx_like(os.urandom(16) + bytes([seed % 256]) * size)


async def _upload_some(stub, count: int, seed0: int):
    """Start `count` uploads, staggered and paced, so a kill lands mid-stream for some."""

    async def paced(requests, delay):
        for request in requests:
            yield request
            await asyncio.sleep(delay)

    async def one(index):
        await asyncio.sleep(0.12 * index)
        requests = model_upload_requests("models/m", _artifact(seed0 + index),
                                         fmt=model_pb2.MODEL_FORMAT_ONNX, chunk=256 * 1024,
                                         signature=digits_signature())
        try:
            await stub.UploadModelVersion(paced(requests, 0.01))
        except grpc.aio.AioRpcError:
            pass  # the kill cuts these off

    return [asyncio.create_task(one(i)) for i in range(count)]


async def _verify(stub, state_dir) -> int:
    versions = (await stub.ListModelVersions(rs.ListModelVersionsRequest(
        parent="models/m", page_size=1000))).model_versions
    for version in versions:
        header, body = await download(stub.DownloadModelVersion(
            rs.DownloadModelVersionRequest(name=version.name)))
        assert sha256(body) == version.artifact.sha256 == header.artifact.sha256
        assert len(body) == version.artifact.size_bytes
    referenced = {v.artifact.sha256 for v in versions}
    assert {p.name for p in blob_files(state_dir)} == referenced, "no orphan blob after collection"
    assert staging_files(state_dir) == [], "no abandoned staging file after collection"
    return len(versions)


@pytest.mark.slow
async def test_kill_9_mid_upload_repeatedly_leaves_no_partial_state(tmp_path):
    registry = RegistryProcess(tmp_path)
    await registry.start()
    try:
        async with registry.stub() as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await stub.CreateModel(rs.CreateModelRequest(model_id="m"))
        committed_before = 0
        for round_number in range(3):
            async with registry.stub() as channel:
                stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
                tasks = await _upload_some(stub, 4, round_number * 10)
                await asyncio.sleep(0.3 + 0.05 * round_number)
                registry.kill()
                await asyncio.gather(*tasks)
            await registry.start()  # start-up collection runs with grace 0
            await asyncio.sleep(0.5)
            async with registry.stub() as channel:
                stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
                committed = await _verify(stub, tmp_path)
                assert committed >= committed_before, "a committed version was lost"
                committed_before = committed
        assert 0 < committed_before < 12, "some uploads committed, some were cut off"
    finally:
        registry.terminate()


@pytest.mark.slow
async def test_two_replicas_on_postgres_allocate_distinct_versions(tmp_path):
    with postgres_database_or_skip() as url:
        shared = tmp_path / "shared"
        replicas = [RegistryProcess(shared, url) for _ in range(2)]
        for replica in replicas:
            await replica.start()
        try:
            async with replicas[0].stub() as channel:
                await registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModel(
                    rs.CreateModelRequest(model_id="m"))
            payloads = [onnx_like(os.urandom(2048)) for _ in range(20)]

            async def upload_through(replica, data):
                async with replica.stub() as channel:
                    return await registry_service_pb2_grpc.RegistryServiceStub(
                        channel).UploadModelVersion(model_upload_requests(
                            "models/m", data, fmt=model_pb2.MODEL_FORMAT_ONNX,
                            signature=digits_signature()))

            versions = await asyncio.gather(*(upload_through(replicas[i % 2], data)
                                              for i, data in enumerate(payloads)))
            assert sorted(v.version_id for v in versions) == list(range(1, 21))
            async with replicas[1].stub() as channel:
                stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
                listed = (await stub.ListModelVersions(rs.ListModelVersionsRequest(
                    parent="models/m", page_size=100))).model_versions
                assert {v.artifact.sha256 for v in listed} == {sha256(p) for p in payloads}
        finally:
            for replica in replicas:
                replica.terminate()
