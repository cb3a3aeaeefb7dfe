"""Session fixtures: ONE real tritonserver (from the nvidia-pytriton wheel) for the serving tests.

The server, its client and the tests share the session event loop, since grpc.aio channels
belong to the loop that created them. Tests that kill Triton start their own server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from maas_inference.triton import ModelRepository, TritonClient, TritonServerProcess

from tests.inference.servers import triton_process_config


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonServerProcess]:
    process = TritonServerProcess(triton_process_config(tmp_path_factory.mktemp("triton")))
    await process.start()
    yield process
    await process.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def triton_client(triton: TritonServerProcess) -> AsyncIterator[TritonClient]:
    async with TritonClient(triton.grpc_url, control_key=triton.control_key) as client:
        yield client


@pytest.fixture(scope="session")
def model_repository(triton: TritonServerProcess) -> ModelRepository:
    return ModelRepository(triton.model_repository)
