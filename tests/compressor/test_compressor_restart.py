"""kill -9 of the compressor mid-job: the job's process dies with it, nothing is registered
half-way, and the restarted service resumes the job to exactly one registered version."""

from __future__ import annotations

import asyncio
import time

import pytest
from maas.common.v1 import job_pb2
from maas.registry.v1 import registry_service_pb2_grpc
from maas_registry.server import build_server as build_registry_server
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel

from tests.compressor.conftest import _package_bytes
from tests.compressor.service_helpers import (
    CompressorProcess,
    create_job,
    distill,
    spec,
    states_of,
    upload,
    versions_of,
    wait_for,
    wait_until_final,
    watch_events,
)
from tests.trainer.helpers import job_processes


@pytest.fixture
async def registry(tmp_path):
    settings = RegistrySettings(state_dir=tmp_path / "registry", port=0)
    server = build_registry_server(settings)
    port = await server.start()
    token_file = settings.state_dir / "admin.token"
    channel = open_channel(f"127.0.0.1:{port}", token=token_file.read_text().strip())
    yield f"127.0.0.1:{port}", token_file, registry_service_pb2_grpc.RegistryServiceStub(channel)
    await channel.close()
    await server.stop(0)


async def test_kill_9_mid_job_then_restart_resumes_to_one_registered_version(tmp_path, registry):
    from tests.compressor.torch_helpers import RecordingContext, digits_splits, train_in_place, zoo_model

    target, token_file, registry_stub = registry
    teacher = train_in_place(zoo_model("mlp", {"hidden_sizes": [64]}),
                             RecordingContext(digits_splits(), tmp_path), epochs=5)
    source = (await upload(registry_stub, "teacher",
                           _package_bytes(teacher, tmp_path / "teacher.safetensors"))).name
    compressor = CompressorProcess(tmp_path / "compressor", target, token_file)
    await compressor.start()
    try:
        channel = compressor.channel()
        stub = compressor.stub(channel)
        job = await create_job(stub, spec(source, distill(epochs=60), model_id="student"),
                               job_id="survivor")
        await wait_for(stub, job.name, lambda j: j.metrics.get("distill_epoch", 0) >= 2)
        workdir = str(tmp_path / "compressor" / "jobs" / "survivor")
        assert job_processes(workdir), "the job process should be running"
        await channel.close()

        compressor.kill()
        # The job's process watches the service through its stdin and dies with it.
        deadline = time.monotonic() + 15
        while job_processes(workdir) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not job_processes(workdir)
        assert await versions_of(registry_stub, "student") == []  # nothing half-registered

        await compressor.start()
        channel = compressor.channel()
        stub = compressor.stub(channel)
        finished = await wait_until_final(stub, job.name, timeout=180)
        assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error
        assert finished.resume_count == 1
        events = await watch_events(stub, job.name)
        assert states_of(events) == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING,
                                     job_pb2.JOB_STATE_SUCCEEDED]
        assert any("restarted" in e.log.message for e in events if e.WhichOneof("kind") == "log")
        versions = await versions_of(registry_stub, "student")
        assert [v.name for v in versions] == [finished.model_version]
        assert versions[0].labels["compression_job"] == "survivor"
        await channel.close()
    finally:
        compressor.terminate()


async def test_kill_9_while_publishing_to_an_unreachable_registry_registers_once_later(tmp_path):
    """The work is done but the registry is down: the job keeps retrying its registration;
    the compressor is killed meanwhile; after both restart, the finished result (not a rerun)
    is registered exactly once."""
    from maas.compressor.v1 import compressor_service_pb2 as cs
    from maas_cli.local_suite import free_port

    from tests.compressor.service_helpers import prune
    from tests.compressor.torch_helpers import RecordingContext, digits_splits, train_in_place, zoo_model

    settings = RegistrySettings(state_dir=tmp_path / "registry", port=free_port())
    registry = build_registry_server(settings)
    await registry.start()
    token_file = settings.state_dir / "admin.token"
    target = f"127.0.0.1:{settings.port}"
    registry_channel = open_channel(target, token=token_file.read_text().strip())
    registry_stub = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
    model = train_in_place(zoo_model("mlp", {"hidden_sizes": [32]}),
                           RecordingContext(digits_splits(), tmp_path), epochs=3)
    source = (await upload(registry_stub, "teacher",
                           _package_bytes(model, tmp_path / "m.safetensors"))).name
    await registry_channel.close()
    compressor = CompressorProcess(tmp_path / "compressor", target, token_file)
    await compressor.start()
    try:
        channel = compressor.channel()
        stub = compressor.stub(channel)
        job = await create_job(stub, spec(source, prune(0.3), model_id="pruned"), job_id="late")
        await registry.stop(0)  # inputs are staged: the job runs without the registry

        async for event in stub.WatchCompressionJob(cs.WatchCompressionJobRequest(name=job.name),
                                                    timeout=120):
            if event.WhichOneof("kind") == "log" and "publishing" in event.log.message:
                break  # the process finished; registration is being retried
        await asyncio.sleep(1.0)
        await channel.close()
        compressor.kill()
        result = tmp_path / "compressor" / "jobs" / "late" / "result.json"
        assert result.exists()
        finished_at = result.stat().st_mtime_ns

        registry = build_registry_server(settings)
        await registry.start()
        await compressor.start()
        channel = compressor.channel()
        stub = compressor.stub(channel)
        finished = await wait_until_final(stub, job.name, timeout=120)
        assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error
        assert finished.resume_count == 1
        assert result.stat().st_mtime_ns == finished_at  # registered, not compressed again
        await channel.close()
        registry_channel = open_channel(target, token=token_file.read_text().strip())
        versions = await versions_of(registry_service_pb2_grpc.RegistryServiceStub(
            registry_channel), "pruned")
        await registry_channel.close()
        assert [v.name for v in versions] == [finished.model_version]
    finally:
        compressor.terminate()
        await registry.stop(0)
