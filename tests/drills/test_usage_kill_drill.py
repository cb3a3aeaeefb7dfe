"""Drill: kill -9 of the inference service under Predict load, then a restart on the same state
directory. Predict usage written before the kill survives — what the native data plane served
and what the service admitted for a tenant with limits — and at most the last flush interval
(plus the data plane's counts since its last poll) is lost; limits and metering work again
after the restart, the daily quota counting what was used before it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel

from tests.inference.servers import register_digits_mlp
from tests.support.processes import RegistryProcess, inference_process

pytestmark = pytest.mark.triton

FLUSH_SECONDS = 0.5
SETTLED = 20
UNSETTLED = 5


def predict_request(rows: int) -> inf.PredictRequest:
    data = np.ones((rows, 64), np.float32)
    return inf.PredictRequest(deployment="deployments/digits", inputs=[tensor_pb2.Tensor(
        name="features", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[rows, 64],
        raw_data=data.tobytes())])


async def totals(inference) -> dict[str, tuple[int, int]]:
    async with inference.stub() as channel:
        reply = await usage_pb2_grpc.UsageServiceStub(channel).SummarizeUsage(
            usage_pb2.SummarizeUsageRequest(group_by=usage_pb2.USAGE_GROUPING_TENANT))
    return {t.tenant: (t.requests, t.rows) for t in reply.totals}


async def predict_as(inference, token: str, count: int, rows: int) -> None:
    async with open_channel(inference.target, token=token) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(count):
            await stub.Predict(predict_request(rows))


async def test_kill_9_under_predict_load_keeps_the_flushed_usage(tmp_path):
    registry = RegistryProcess(tmp_path / "registry")
    await registry.start()
    limits = tmp_path / "limits.yaml"
    limits.write_text("tenants:\n  metered: {requests_per_day: 1000}\n")
    inference = inference_process(tmp_path, registry, tenancy_file=str(limits),
                                  usage_flush_seconds=str(FLUSH_SECONDS))
    try:
        await register_digits_mlp(tmp_path, registry, hidden=16, seed=3)
        await inference.start(timeout=120)
        tokens_file = inference.state_dir / "tokens.json"
        free = add_token(tokens_file, "free", Role.VIEWER)  # served by the data plane
        metered = add_token(tokens_file, "metered", Role.VIEWER)  # admitted by the service
        async with inference.stub() as channel:
            await inference_service_pb2_grpc.InferenceServiceStub(channel).CreateDeployment(
                inf.CreateDeploymentRequest(deployment_id="digits", deployment=(
                    deployment_pb2.Deployment(model="models/digits/versions/1"))),
                timeout=300)
        await asyncio.sleep(1.5)  # the new tokens reach the data plane
        await asyncio.gather(predict_as(inference, free, SETTLED, 2),
                             predict_as(inference, metered, SETTLED, 3))
        await asyncio.sleep(4 * FLUSH_SECONDS)  # polled and flushed
        assert await totals(inference) == {"free": (SETTLED, 2 * SETTLED),
                                           "metered": (SETTLED, 3 * SETTLED)}
        await asyncio.gather(predict_as(inference, free, UNSETTLED, 2),
                             predict_as(inference, metered, UNSETTLED, 3))
        inference.kill()  # SIGKILL right away: the last interval may be lost

        await inference.start(timeout=120)
        survived = await totals(inference)
        for tenant, rows in (("free", 2), ("metered", 3)):
            requests, counted_rows = survived[tenant]
            assert SETTLED <= requests <= SETTLED + UNSETTLED, (tenant, survived)
            assert counted_rows == rows * requests
        async with inference.stub() as channel:
            await inference_service_pb2_grpc.InferenceServiceStub(channel).GetDeployment(
                inf.GetDeploymentRequest(name="deployments/digits"), timeout=60)
        await asyncio.sleep(1.5)
        await predict_as(inference, metered, 1, 1)
        await asyncio.sleep(4 * FLUSH_SECONDS)
        assert (await totals(inference))["metered"][0] == survived["metered"][0] + 1
    finally:
        inference.terminate()
        registry.terminate()
