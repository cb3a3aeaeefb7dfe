"""Drill: kill -9 of the inference service while generations stream (SmolLM2 bf16 on its
bundled Triton). Every stream in flight ends with UNAVAILABLE at its client, never a hang or
a success; after a restart on the same state directory the usage ledger still holds every
generation that finished before the kill (committed before its final message was sent), and
the deployment generates again."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc

from tests.registry.helpers import model_upload_requests
from tests.support.llm import smollm2_causal_lm_zip
from tests.support.processes import RegistryProcess, inference_process

pytestmark = pytest.mark.triton

FINISHED = 3
IN_FLIGHT = 4


def question(text: str, max_tokens: int) -> inf.GenerateRequest:
    return inf.GenerateRequest(
        deployment="deployments/chat", max_tokens=max_tokens, temperature=0,
        conversation=inf.Conversation(messages=[inf.ChatMessage(role="user", content=text)]))


async def generated_records(inference, outcome: str) -> list[usage_pb2.UsageRecord]:
    async with inference.stub() as channel:
        reply = await usage_pb2_grpc.UsageServiceStub(channel).ListUsageRecords(
            usage_pb2.ListUsageRecordsRequest(
                filter=f'kind = "generation" AND outcome = "{outcome}"', page_size=100))
    return list(reply.usage_records)


async def test_kill_9_during_streams_keeps_every_finished_generation(tmp_path):
    archive = await asyncio.to_thread(smollm2_causal_lm_zip)
    registry = RegistryProcess(tmp_path / "registry")
    await registry.start()
    settings = {"generation_max_running_streams": "8", "usage_flush_seconds": "5"}
    inference = inference_process(tmp_path, registry, **settings)
    try:
        async with registry.stub() as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await stub.CreateModel(rs.CreateModelRequest(model_id="smollm"))
            signature = model_pb2.Signature()
            signature.inputs.add(name="text_input", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
            signature.outputs.add(name="text_output", datatype=tensor_pb2.DATA_TYPE_BYTES,
                                  shape=[1])
            await stub.UploadModelVersion(model_upload_requests(
                "models/smollm", archive.read_bytes(), chunk=1 << 20,
                fmt=model_pb2.MODEL_FORMAT_CAUSAL_LM, signature=signature))
        await inference.start(timeout=120)
        async with inference.stub() as channel:
            gateway = inference_service_pb2_grpc.InferenceServiceStub(channel)
            await gateway.CreateDeployment(inf.CreateDeploymentRequest(
                deployment_id="chat",
                deployment=deployment_pb2.Deployment(model="models/smollm/versions/1")),
                timeout=600)
            for index in range(FINISHED):
                answer = [r async for r in gateway.Generate(question(f"Count to {index + 3}.", 8))]
                assert answer[-1].WhichOneof("event") == "final"

            started = asyncio.Event()

            async def long_stream(index: int) -> grpc.StatusCode | None:
                try:
                    async for _ in gateway.Generate(question(f"Tell story {index}.", 400),
                                                    timeout=120):
                        started.set()
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return None

            streams = [asyncio.create_task(long_stream(index)) for index in range(IN_FLIGHT)]
            await asyncio.wait_for(started.wait(), timeout=60)
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            inference.kill()
            codes = await asyncio.wait_for(asyncio.gather(*streams), timeout=60)
            assert codes == [grpc.StatusCode.UNAVAILABLE] * IN_FLIGHT, codes
            assert time.monotonic() - killed_at < 30

        restarted = inference_process(tmp_path, registry, **settings)
        await restarted.start(timeout=120)
        inference = restarted
        finished = await generated_records(restarted, "OK")
        assert len(finished) == FINISHED, finished
        assert all(r.completion_tokens > 0 and r.prompt_tokens > 0 for r in finished)
        async with restarted.stub() as channel:
            gateway = inference_service_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(600):  # the deployment is loaded again after the restart
                try:
                    answer = [r async for r in gateway.Generate(question("Say hi.", 4))]
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    await asyncio.sleep(0.5)
            assert answer[-1].final.usage.completion_tokens > 0
    finally:
        inference.terminate()
        registry.terminate()
