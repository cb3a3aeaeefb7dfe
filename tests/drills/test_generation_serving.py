"""Generation end to end on the real SmolLM2 (bf16, A's cached fixture) in a real Triton behind
the inference service: Generate over gRPC (greedy answer, usage, bad inputs with their
fields, text that is not UTF-8), a caller disconnecting mid-stream (the engine's only slot is
free again at once, the ledger records the tokens produced as CANCELLED), the SDK and
`maas chat`, the official openai client on the HTTP endpoint, and tritonclient's KServe-v2
stream against the gateway."""

from __future__ import annotations

import asyncio
import json
import queue
from pathlib import Path

import grpc
import maas
import numpy as np
import openai
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_cli.main import app as maas_cli
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from typer.testing import CliRunner

from tests.registry.helpers import model_upload_requests
from tests.support.grpc_asserts import expect_error
from tests.support.llm import smollm2_causal_lm_zip

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

QUESTION = "What is the capital of France?"


class Suite:
    channel: grpc.aio.Channel
    target: str
    token: str
    openai_port: int

    @property
    def stub(self) -> inference_service_pb2_grpc.InferenceServiceStub:
        return inference_service_pb2_grpc.InferenceServiceStub(self.channel)


def causal_lm_signature() -> model_pb2.Signature:
    signature = model_pb2.Signature()
    signature.inputs.add(name="text_input", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
    signature.outputs.add(name="text_output", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
    return signature


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def suite(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("generation")
    archive = await asyncio.to_thread(smollm2_causal_lm_zip)
    s = Suite()
    s.registry = build_registry(RegistrySettings(state_dir=root / "registry", port=0))
    registry_port = await s.registry.start()
    async with open_channel(f"127.0.0.1:{registry_port}", token=(
            root / "registry" / "admin.token").read_text().strip(),
            max_message_bytes=64 << 20) as registry_channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
        await registry.CreateModel(rs.CreateModelRequest(model_id="smollm"))
        await registry.UploadModelVersion(model_upload_requests(
            "models/smollm", archive.read_bytes(), chunk=1 << 20,
            fmt=model_pb2.MODEL_FORMAT_CAUSAL_LM, signature=causal_lm_signature()))
    settings = InferenceSettings(
        state_dir=root / "inference", port=0, client_token_file=root / "registry" / "admin.token",
        openai_port=0, generation_max_running_streams=1, generation_max_waiting_streams=0,
        usage_flush_seconds=0.2)
    s.inference, s.app = build_inference(
        settings, discovery=StaticDiscovery({"registry": [f"127.0.0.1:{registry_port}"]}))
    port = await s.inference.start()
    s.target = f"127.0.0.1:{port}"
    s.token = (root / "inference" / "admin.token").read_text().strip()
    s.channel = open_channel(s.target, token=s.token)
    s.openai_port = s.app.openai.port
    await s.stub.CreateDeployment(inf.CreateDeploymentRequest(
        deployment_id="chat", deployment=deployment_pb2.Deployment(model="models/smollm/versions/1")),
        timeout=300)
    yield s
    await s.channel.close()
    await s.inference.stop(0)
    await s.registry.stop(0)


def chat_request(question: str = QUESTION, **sampling) -> inf.GenerateRequest:
    return inf.GenerateRequest(
        deployment="deployments/chat", conversation=inf.Conversation(messages=[
            inf.ChatMessage(role="user", content=question)]), **sampling)


async def test_generate_streams_a_greedy_answer_and_its_usage(suite):
    responses = [r async for r in suite.stub.Generate(chat_request(max_tokens=12, temperature=0))]
    deltas = [r.delta for r in responses[:-1]]
    final = responses[-1].final
    text = "".join(d.text for d in deltas)
    assert "Paris" in text, text
    assert final.finish_reason in (inf.FINISH_REASON_STOP, inf.FINISH_REASON_LENGTH)
    usage = final.usage
    assert usage.completion_tokens == sum(d.token_count for d in deltas) > 0
    assert usage.prompt_tokens > 5 and usage.total_tokens == (usage.prompt_tokens +
                                                              usage.completion_tokens)
    assert usage.time_to_first_token.ToNanoseconds() > 0


@pytest.mark.parametrize(("request_", "field_path"), [
    (inf.GenerateRequest(deployment="deployments/chat", prompt=""), "prompt"),
    (inf.GenerateRequest(deployment="deployments/chat", prompt="word " * 9000), "prompt"),
    (chat_request(max_tokens=0), "max_tokens"),
    (chat_request(max_tokens=100_000), "max_tokens"),
    (chat_request(temperature=-1), "temperature"),
    (chat_request(top_p=1.5), "top_p"),
    (chat_request(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat_request(stop=["x" * 100]), "stop[0]"),
])
async def test_bad_generations_are_invalid_argument_naming_the_field(suite, request_, field_path):
    async def first():
        async for _ in suite.stub.Generate(request_):
            return

    await expect_error(first(), grpc.StatusCode.INVALID_ARGUMENT, field=field_path)


async def test_text_that_is_not_utf8_is_invalid_argument_naming_the_field(suite):
    raw = chat_request("ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    generate = suite.channel.unary_stream("/maas.inference.v1.InferenceService/Generate",
                                          request_serializer=None,
                                          response_deserializer=inf.GenerateResponse.FromString)

    async def first():
        async for _ in generate(raw):
            return

    await expect_error(first(), grpc.StatusCode.INVALID_ARGUMENT,
                       field="conversation.messages[0].content")


async def test_a_caller_leaving_mid_stream_frees_the_slot_and_is_charged(suite):
    """The engine runs one stream and queues none: a second generation only gets in once the
    first one's slot is free."""
    call = suite.stub.Generate(chat_request("Write a long story about a cat.", max_tokens=200,
                                            temperature=0))
    seen = 0
    async for response in call:
        seen += response.delta.token_count
        if seen >= 3:
            break
    call.cancel()
    answer = None
    for _ in range(50):  # the cancellation reaches the engine within a step or two
        try:
            answer = [r async for r in suite.stub.Generate(chat_request(max_tokens=3))]
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            await asyncio.sleep(0.1)
    assert answer is not None and answer[-1].final.usage.completion_tokens >= 1
    await suite.app.ledger.flush()
    usage = usage_pb2_grpc.UsageServiceStub(suite.channel)
    reply = await usage.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        filter='kind = "generation" AND outcome = "CANCELLED"', page_size=10))
    assert reply.usage_records and reply.usage_records[0].completion_tokens >= 3


async def test_the_sdk_and_maas_chat_stream_answers(suite):
    with maas.Client(targets={"inference": suite.target}, token=suite.token) as client:
        generation = await asyncio.to_thread(
            client.generate, "chat", messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12, temperature=0)
        chunks = await asyncio.to_thread(list, generation)
        assert "Paris" in "".join(chunks) and len(chunks) > 1
        assert generation.finish_reason in ("stop", "length")
        assert generation.usage.completion_tokens > 0
        with pytest.raises(maas.InvalidArgument) as refused:
            await asyncio.to_thread(
                lambda: client.generate("chat", prompt="hi", temperature=-1).text())
        assert [v.field for v in refused.value.field_violations] == ["temperature"]

    def cli(*args: str, typed: str | None = None):
        result = CliRunner().invoke(maas_cli, ["--target", f"inference={suite.target}",
                                               "--token", suite.token, *args], input=typed,
                                    prog_name="maas")
        return result.exit_code, result.stdout, result.stderr

    code, out, err = await asyncio.to_thread(
        cli, "--json", "chat", "chat", "--prompt", QUESTION, "--max-tokens", "12",
        "--temperature", "0")
    assert code == 0, err
    answer = json.loads(out)
    assert "Paris" in answer["text"] and answer["usage"]["completion_tokens"] > 0
    code, out, err = await asyncio.to_thread(
        cli, "chat", "chat", "--prompt", QUESTION, "--max-tokens", "12", "--temperature", "0")
    assert code == 0 and "Paris" in out, err
    # Interactive: two turns (the second needs the first in the history), then /exit.
    code, out, err = await asyncio.to_thread(
        cli, "chat", "chat", "--max-tokens", "12", "--temperature", "0",
        typed=f"{QUESTION}\nRepeat the city's name only.\n/exit\n")
    assert code == 0, err
    assert out.count("you> ") == 3 and out.count("Paris") >= 2, out


async def test_the_openai_client_on_the_real_model(suite):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{suite.openai_port}/v1",
                                  api_key=suite.token, max_retries=0) as client:
        assert [m.id async for m in client.models.list()] == ["chat"]
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": QUESTION}], stream=True,
            max_tokens=12, temperature=0)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert "Paris" in text
        completion = await client.completions.create(model="chat", prompt="1, 2, 3,",
                                                     max_tokens=4, temperature=0)
        assert completion.usage.completion_tokens > 0


async def test_kserve_model_stream_infer_through_the_gateway(suite):
    """tritonclient's own stream, pointed at the gateway (model name = deployment id)."""
    responses: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(suite.target)
    prompt = triton_grpc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"1, 2, 3, 4,"], dtype=np.object_))
    sampling = triton_grpc.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(
        {"max_tokens": 6, "temperature": 0}).encode()], dtype=np.object_))

    def run() -> list:
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            headers={"authorization": f"Bearer {suite.token}"})
        client.async_stream_infer("chat", [prompt, sampling], request_id="k1",
                                  enable_empty_final_response=True)
        collected = []
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            collected.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
        client.close()
        return collected

    collected = await asyncio.to_thread(run)
    text = b"".join(b"".join(r.as_numpy("text_output").reshape(-1)) for r in collected
                    if r.as_numpy("text_output") is not None).decode()
    assert "5" in text
    assert collected[0].get_response().model_name == "chat"
    finishes = [b"".join(r.as_numpy("finish_reason").reshape(-1)) for r in collected
                if r.as_numpy("finish_reason") is not None]
    assert finishes[-1] in (b"stop", b"length")
