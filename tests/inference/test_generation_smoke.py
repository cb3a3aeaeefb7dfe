"""A fast real-Triton smoke of generation for `make test`: the real SmolLM2 (bf16, the cached
fixture of tests/support/llm.py) deployed through the inference service onto the session's
tritonserver (remote mode, so no second Triton starts), one greedy Generate streamed back
with its usage, and one bad input refused against the model's own context. The full
behaviour (OpenAI endpoint, capacity, disconnects, KServe, the model on Triton's own port)
is in tests/drills/test_generation_serving.py, run by `make drills`.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery

from tests.support.grpc_asserts import expect_error
from tests.support.llm import upload_smollm2
from tests.support.registry_server import registry_in_process

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chat(tmp_path_factory, triton):
    """An InferenceService stub with the deployment "chat" serving SmolLM2."""
    root: Path = tmp_path_factory.mktemp("generation-smoke")
    async with registry_in_process(root) as registry:
        version = await upload_smollm2(registry.target, registry.token)
        key_file = root / "triton.key"
        key_file.write_text(triton.control_key + "\n")
        inference, _ = build_inference(
            InferenceSettings(state_dir=root / "inference", port=0,
                              client_token_file=root / "registry" / "admin.token",
                              triton_url=triton.grpc_url,
                              triton_model_repository=str(triton.model_repository),
                              triton_control_key_file=str(key_file),
                              generation_max_running_streams=1,
                              generation_max_waiting_streams=0),
            discovery=StaticDiscovery({"registry": [registry.target]}))
        port = await inference.start()
        channel = open_channel(f"127.0.0.1:{port}",
                               token=(root / "inference" / "admin.token").read_text().strip())
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        await stub.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id="chat", deployment=deployment_pb2.Deployment(model=version)),
            timeout=300)
        yield stub
        # Unload from the session's Triton: the other tests share it.
        await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/chat"))
        await channel.close()
        await inference.stop(0)


def question(**sampling) -> inf.GenerateRequest:
    return inf.GenerateRequest(
        deployment="deployments/chat", conversation=inf.Conversation(messages=[
            inf.ChatMessage(role="user", content="What is the capital of France?")]), **sampling)


async def test_generate_streams_the_greedy_answer_then_its_usage(chat):
    responses = [r async for r in chat.Generate(question(max_tokens=8, temperature=0))]
    deltas, final = [r.delta for r in responses[:-1]], responses[-1].final
    assert "Paris" in "".join(d.text for d in deltas), deltas
    assert final.finish_reason in (inf.FINISH_REASON_STOP, inf.FINISH_REASON_LENGTH)
    assert final.usage.completion_tokens == sum(d.token_count for d in deltas) > 0
    assert final.usage.prompt_tokens > 5


async def test_max_tokens_beyond_the_models_context_is_invalid_argument(chat):
    async def first() -> None:
        async for _ in chat.Generate(question(max_tokens=8190)):
            return

    error = await expect_error(first(), grpc.StatusCode.INVALID_ARGUMENT, field="max_tokens")
    assert "8192" in error.details()
