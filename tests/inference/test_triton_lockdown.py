"""Triton behind the gateway only: the bundled Triton refuses model control, shared memory,
trace and log settings to anyone without the inference service's key, and opens no HTTP port
unless asked to.

Uses the session's tritonserver (started by the fixtures exactly as the service starts it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import urllib.error
import urllib.request

import pytest
from maas_inference.triton import TritonClient, TritonServerProcess
from maas_inference.triton.lockdown import CONTROL_KEY_NAME, GRPC_HEADER_PREFIX
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.inference.servers import triton_process_config
from tests.inference.test_supervisor import write_digits_mlp

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

MODEL = "lockdown-mlp"


async def refused(call) -> str:
    with pytest.raises(InferenceServerException) as caught:
        await call
    assert "restricted" in caught.value.message(), caught.value.message()
    return caught.value.message()


async def test_a_direct_client_cannot_load_unload_or_administer_triton(
        triton, model_repository, tmp_path):
    write_digits_mlp(model_repository, tmp_path, MODEL)
    wrong_key = {GRPC_HEADER_PREFIX + CONTROL_KEY_NAME: "guessed"}
    async with InferenceServerClient(triton.grpc_url) as intruder:
        assert await intruder.is_server_ready(), "health stays open"
        await refused(intruder.load_model(MODEL))
        await refused(intruder.load_model(MODEL, headers=wrong_key))
        await refused(intruder.get_model_repository_index())
        await refused(intruder.get_system_shared_memory_status())
        await refused(intruder.get_cuda_shared_memory_status())
        await refused(intruder.get_trace_settings())
        await refused(intruder.get_log_settings())
        assert not await intruder.is_model_ready(MODEL), "nothing was loaded"

        # The service, holding the key, loads and unloads; the intruder still cannot unload.
        async with TritonClient(triton.grpc_url, control_key=triton.control_key) as service:
            await service.load_model(MODEL)
            await service.wait_model_ready(MODEL, timeout=60)
            await refused(intruder.unload_model(MODEL))
            assert await intruder.is_model_ready(MODEL)
            await service.unload_model(MODEL)
        for _ in range(100):
            if not await intruder.is_model_ready(MODEL):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the service's unload did not take")


async def test_the_key_is_random_per_start_and_never_logged(triton, tmp_path):
    other = TritonServerProcess(triton_process_config(tmp_path))
    assert len(triton.control_key) >= 32 and other.control_key != triton.control_key
    log = triton.log_file.read_text()
    assert "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:" in log
    assert triton.control_key not in log and "<redacted>" in log


async def test_http_is_off_unless_asked_for(triton):
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", triton.ports.http))


async def test_http_when_asked_for_is_restricted_the_same_way(tmp_path):
    config = dataclasses.replace(triton_process_config(tmp_path), allow_http=True)
    process = TritonServerProcess(config)
    await process.start()
    try:
        with urllib.request.urlopen(f"{process.http_url}/v2/health/ready", timeout=5) as reply:
            assert reply.status == 200
        index = urllib.request.Request(f"{process.http_url}/v2/repository/index", data=b"{}",
                                       method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(index, timeout=5)
        assert "restricted" in caught.value.read().decode()
        index.add_header(CONTROL_KEY_NAME, process.control_key)
        with urllib.request.urlopen(index, timeout=5) as reply:
            assert reply.status == 200
    finally:
        await process.stop()
