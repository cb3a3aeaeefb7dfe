"""A fast real-Triton smoke of generation for `make test`: the real SmolLM2 (bf16, the cached
fixture of tests/support/llm.py) deployed through the inference service onto the session's
tritonserver (remote mode, so no second Triton starts), one greedy Generate streamed back
with its usage, one bad input refused against the model's own context, and a KServe-v2
ModelStreamInfer caller naming another tenant in `maas.tenant` overruled (what the gateway
sends Triton is recorded on its Triton client: the caller's own tenant). The full
behaviour (OpenAI endpoint, capacity, disconnects, KServe, the model on Triton's own port)
is in tests/drills/test_generation_serving.py, run by `make drills`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas_inference.server import InferenceApp, build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from maas_runtime.grpc_errors import status_details, unpack_detail
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.grpc_asserts import expect_error
from tests.support.llm import upload_smollm2
from tests.support.registry_server import registry_in_process

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]


@dataclass
class Served:
    """The inference service serving the deployment "chat" (SmolLM2)."""

    stub: inference_service_pb2_grpc.InferenceServiceStub
    app: InferenceApp
    target: str
    tokens_file: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(tmp_path_factory, triton):
    root: Path = tmp_path_factory.mktemp("generation-smoke")
    async with registry_in_process(root) as registry:
        version = await upload_smollm2(registry.target, registry.token)
        key_file = root / "triton.key"
        key_file.write_text(triton.control_key + "\n")
        settings = InferenceSettings(state_dir=root / "inference", port=0,
                                     client_token_file=root / "registry" / "admin.token",
                                     triton_url=triton.grpc_url,
                                     triton_model_repository=str(triton.model_repository),
                                     triton_control_key_file=str(key_file),
                                     generation_max_running_streams=1,
                                     generation_max_waiting_streams=0)
        inference, app = build_inference(
            settings, discovery=StaticDiscovery({"registry": [registry.target]}))
        port = await inference.start()
        channel = open_channel(f"127.0.0.1:{port}",
                               token=(root / "inference" / "admin.token").read_text().strip())
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        await stub.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id="chat", deployment=deployment_pb2.Deployment(model=version)),
            timeout=300)
        yield Served(stub, app, f"127.0.0.1:{port}", settings.resolved_tokens_file)
        # Unload from the session's Triton: the other tests share it.
        await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/chat"))
        await channel.close()
        await inference.stop(0)


@pytest.fixture(scope="module")
def chat(served: Served) -> inference_service_pb2_grpc.InferenceServiceStub:
    """An InferenceService stub with the deployment "chat" serving SmolLM2."""
    return served.stub


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


def kserve_generation(request_id: str, prompt: str, tenant_claimed: str
                      ) -> service_pb2.ModelInferRequest:
    """A KServe-v2 request for "chat" (greedy, 2 tokens) that claims `tenant_claimed` in the
    reserved `maas.tenant` parameter."""
    request = service_pb2.ModelInferRequest(model_name="chat", id=request_id)
    for name, value in (("text_input", prompt.encode()),
                        ("sampling_parameters", b'{"max_tokens": 2, "temperature": 0}')):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.parameters["maas.tenant"].string_param = tenant_claimed
    return request


async def test_a_kserve_stream_caller_cannot_claim_another_tenant(served, monkeypatch):
    """The engine shares its slots between the tenants `maas.tenant` names, so the gateway
    sends Triton the caller's own tenant (its token's) whatever the caller put there; the
    requests are still served. (`maas.tenant` is the only request parameter the model reads:
    the other `maas.*` names are its configuration's, read once when it loads.)"""
    sent: list[service_pb2.ModelInferRequest] = []
    open_stream = served.app.triton.open_stream

    def recording_open_stream(**kwargs):
        stream = open_stream(**kwargs)
        send = stream.send

        async def recording_send(request: service_pb2.ModelInferRequest) -> None:
            sent.append(service_pb2.ModelInferRequest.FromString(request.SerializeToString()))
            await send(request)

        monkeypatch.setattr(stream, "send", recording_send)
        return stream

    monkeypatch.setattr(served.app.triton, "open_stream", recording_open_stream)
    token = add_token(served.tokens_file, "mallory", Role.VIEWER, ("smollm",), tenant="acme")
    claims = {"victim": "globex", "empty": ""}
    async with open_channel(served.target, token=token) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        finished: dict[str, str] = {}
        for request_id, claimed in claims.items():
            await call.write(kserve_generation(request_id, "1, 2, 3, 4,", claimed))
            while True:
                response = await call.read()
                assert not response.error_message, response.error_message
                infer = response.infer_response
                assert infer.id == request_id
                outputs = dict(zip((o.name for o in infer.outputs), infer.raw_output_contents,
                                   strict=True))
                if "finish_reason" in outputs:
                    finished[request_id] = outputs["finish_reason"][4:].decode()
                if infer.parameters["triton_final_response"].bool_param:
                    break
        await call.done_writing()
    assert finished.keys() == claims.keys()
    assert set(finished.values()) <= {"stop", "length"}, finished
    assert [(r.id, r.parameters["maas.tenant"].string_param) for r in sent] == [
        ("victim", "acme"), ("empty", "acme")]


async def test_unary_calls_to_a_generative_deployment_are_told_to_stream(served):
    """A decoupled model answers in a stream: Predict and KServe ModelInfer are refused with
    FAILED_PRECONDITION naming the calls that carry it, not Triton's INTERNAL."""
    predict = served.stub.Predict(inf.PredictRequest(deployment="deployments/chat"))
    refused = await expect_error(predict, grpc.StatusCode.FAILED_PRECONDITION)
    assert error_reason(refused) == "STREAMING_REQUIRED" and "Generate" in refused.details()
    token = add_token(served.tokens_file, "reader", Role.VIEWER, ("smollm",))
    async with open_channel(served.target, token=token) as channel:
        kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        refused = await expect_error(
            kserve.ModelInfer(kserve_generation("unary", "1, 2,", "")),
            grpc.StatusCode.FAILED_PRECONDITION)
    assert error_reason(refused) == "STREAMING_REQUIRED"
    assert "ModelStreamInfer" in refused.details()


def error_reason(error: grpc.aio.AioRpcError) -> str:
    info = unpack_detail(status_details(error), error_details_pb2.ErrorInfo)
    assert info is not None, error.details()
    return info.reason
