"""Generation end to end on the real SmolLM2 (bf16, the cached fixture of tests/support/llm.py)
in a real Triton behind the inference service, loaded once for the whole module:

- Generate over gRPC: the greedy answer with its usage and ledger record, bad inputs naming
  their fields, text that is not UTF-8, a deployment that does not generate, the engine at
  capacity (RESOURCE_EXHAUSTED with RetryInfo), a caller disconnecting mid-stream (the
  engine's only slot is free again at once, the tokens produced are recorded as CANCELLED),
  and the per-deployment generation metrics;
- the SDK and `maas chat`;
- the OpenAI-compatible HTTP endpoint called with the official `openai` client: chat and text
  completions streamed and whole, /v1/models filtered by the token's scopes, 401/403/404,
  429 with Retry-After at capacity, a client leaving a stream, bad JSON and bad parameters
  answered 400 with OpenAI-style errors naming the parameter;
- KServe-v2 ModelStreamInfer through the gateway (tritonclient's own stream), with and
  without `sampling_parameters`;
- the decoupled generation model on Triton's own port (no gateway): text deltas then a final
  response with reason and cumulative usage, the model's own INVALID_ARGUMENT errors naming
  the field, and its queue bound.

The engine runs one stream and queues none (generation_max_running_streams=1,
generation_max_waiting_streams=0), so capacity and slot-freeing are observable with two
requests. Heavy (Triton, the model, real decoding on a shared machine): run by `make drills`;
`tests/inference/test_generation_smoke.py` keeps one fast real-Triton check in `make test`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import maas
import numpy as np
import openai
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
from google.rpc import error_details_pb2
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_cli.main import app as maas_cli
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_llm.prompts import PromptRenderer
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from maas_runtime.grpc_errors import status_details, unpack_detail
from maas_runtime.telemetry import Telemetry
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from typer.testing import CliRunner

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.registry.helpers import model_upload_requests
from tests.support.grpc_asserts import expect_error
from tests.support.llm import smollm2_causal_lm, upload_smollm2
from tests.support.registry_server import registry_in_process

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

QUESTION = "What is the capital of France?"
COUNTING = "Count from 1 to 1000, one number after another, separated by commas."


class Suite:
    """The registry and the inference service (its bundled Triton) with "chat" (SmolLM2) and
    "digits" (an MLP that does not generate) deployed, and its tokens."""

    inference: object
    app: object
    channel: grpc.aio.Channel
    target: str
    token: str
    team_token: str
    """viewer scoped to the model "smollm" (the deployment "chat")"""
    outsider_token: str
    """viewer scoped to the model "digits" only"""
    openai_port: int
    metrics: InMemoryMetricReader

    @property
    def stub(self) -> inference_service_pb2_grpc.InferenceServiceStub:
        return inference_service_pb2_grpc.InferenceServiceStub(self.channel)

    @property
    def triton_url(self) -> str:
        """Triton's own gRPC port (no gateway)."""
        return self.app.supervisor.server.grpc_url

    @property
    def triton_model(self) -> str:
        """The Triton model serving the deployment "chat"."""
        return self.app.routes.get("chat").route.targets[0][0].triton_model

    def openai(self, token: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.openai_port}/v1",
                                  api_key=token or self.token, max_retries=0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def suite(tmp_path_factory):
    started = time.monotonic()
    root: Path = tmp_path_factory.mktemp("generation")
    s = Suite()
    async with registry_in_process(root) as registry:
        await upload_smollm2(registry.target, registry.token)
        digits = root / "digits.safetensors"
        save_zoo_package(digits, zoo_model("mlp", {"hidden_sizes": [8]}, [64], seed=0),
                         kind="mlp", hyperparameters={"hidden_sizes": [8]}, input_shape=[64])
        async with open_channel(registry.target, token=registry.token) as channel:
            registry_stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await registry_stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
            await registry_stub.UploadModelVersion(model_upload_requests(
                "models/digits", digits.read_bytes()))
        settings = InferenceSettings(
            state_dir=root / "inference", port=0,
            client_token_file=root / "registry" / "admin.token", openai_port=0,
            generation_max_running_streams=1, generation_max_waiting_streams=0,
            usage_flush_seconds=0.2)
        s.metrics = InMemoryMetricReader()
        s.inference, s.app = build_inference(
            settings, Telemetry.create("inference", metric_readers=(s.metrics,)),
            discovery=StaticDiscovery({"registry": [registry.target]}))
        port = await s.inference.start()
        s.target = f"127.0.0.1:{port}"
        s.token = (root / "inference" / "admin.token").read_text().strip()
        tokens_file = settings.resolved_tokens_file
        s.team_token = add_token(tokens_file, "team", Role.VIEWER, ("smollm",))
        s.outsider_token = add_token(tokens_file, "outsider", Role.VIEWER, ("digits",))
        s.channel = open_channel(s.target, token=s.token)
        s.openai_port = s.app.openai.port
        for deployment_id, model in (("chat", "models/smollm/versions/1"),
                                     ("digits", "models/digits/versions/1")):
            await s.stub.CreateDeployment(inf.CreateDeploymentRequest(
                deployment_id=deployment_id, deployment=deployment_pb2.Deployment(model=model)),
                timeout=300)
        print(f"\nsuite ready in {time.monotonic() - started:.1f} s")
        yield s
        await s.channel.close()
        await s.inference.stop(0)


def chat_request(question: str = QUESTION, **sampling) -> inf.GenerateRequest:
    return inf.GenerateRequest(
        deployment="deployments/chat", conversation=inf.Conversation(messages=[
            inf.ChatMessage(role="user", content=question)]), **sampling)


async def first_response(call) -> None:
    async for _ in call:
        return


async def usage_records(suite: Suite, outcome: str) -> list:
    await suite.app.ledger.flush()
    usage = usage_pb2_grpc.UsageServiceStub(suite.channel)
    reply = await usage.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        filter=f'kind = "generation" AND outcome = "{outcome}"', page_size=50))
    return list(reply.usage_records)


async def until_admitted(attempt, seconds: float = 60.0):
    """`attempt()`'s result once the engine's only slot is free (it is refused with
    RESOURCE_EXHAUSTED / 429 while another stream holds it)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await attempt()
        except (grpc.aio.AioRpcError, openai.RateLimitError) as error:
            if isinstance(error, grpc.aio.AioRpcError):
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert time.monotonic() < deadline, "the slot was not freed"
            await asyncio.sleep(0.1)


# --- Generate over gRPC ----------------------------------------------------------------------

async def test_generate_streams_a_greedy_answer_its_usage_and_its_ledger_record(suite):
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
    recorded = [(r.deployment, r.prompt_tokens, r.completion_tokens)
                for r in await usage_records(suite, "OK")]
    assert ("deployments/chat", usage.prompt_tokens, usage.completion_tokens) in recorded, recorded


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
    await expect_error(first_response(suite.stub.Generate(request_)),
                       grpc.StatusCode.INVALID_ARGUMENT, field=field_path)


async def test_text_that_is_not_utf8_is_invalid_argument_naming_the_field(suite):
    raw = chat_request("ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    generate = suite.channel.unary_stream("/maas.inference.v1.InferenceService/Generate",
                                          request_serializer=None,
                                          response_deserializer=inf.GenerateResponse.FromString)
    await expect_error(first_response(generate(raw)), grpc.StatusCode.INVALID_ARGUMENT,
                       field="conversation.messages[0].content")


async def test_a_deployment_that_does_not_generate_or_does_not_exist(suite):
    error = await expect_error(first_response(suite.stub.Generate(inf.GenerateRequest(
        deployment="deployments/digits", prompt="hi"))), grpc.StatusCode.FAILED_PRECONDITION)
    assert "does not generate" in error.details()
    await expect_error(first_response(suite.stub.Generate(inf.GenerateRequest(
        deployment="deployments/ghost", prompt="hi"))), grpc.StatusCode.NOT_FOUND)


async def test_at_capacity_generate_is_resource_exhausted_and_http_429_with_retry_after(suite):
    """A long stream holds the engine's only slot: gRPC callers get RESOURCE_EXHAUSTED with a
    RetryInfo, HTTP callers 429 with Retry-After; once it is cancelled the next one gets in."""
    holder = suite.stub.Generate(chat_request(COUNTING, max_tokens=4000, temperature=0))
    async for response in holder:
        if response.delta.token_count:
            break
    try:
        error = await expect_error(first_response(suite.stub.Generate(chat_request(max_tokens=3))),
                                   grpc.StatusCode.RESOURCE_EXHAUSTED)
        retry = unpack_detail(status_details(error), error_details_pb2.RetryInfo)
        assert retry is not None and retry.retry_delay.ToSeconds() >= 1, error.details()
        async with suite.openai() as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.completions.create(model="chat", prompt="hi", max_tokens=2)
        assert caught.value.response.headers["Retry-After"] == "1"
        assert caught.value.body["code"] == "GENERATION_QUEUE_FULL"
    finally:
        holder.cancel()
    answer = await until_admitted(lambda: _collect(suite.stub.Generate(chat_request(max_tokens=3))))
    assert answer[-1].final.usage.completion_tokens >= 1


async def _collect(call) -> list:
    return [r async for r in call]


async def test_a_caller_leaving_mid_stream_frees_the_slot_and_is_charged(suite):
    """The engine runs one stream and queues none: a second generation only gets in once the
    first one's slot is free."""
    call = suite.stub.Generate(chat_request(COUNTING, max_tokens=4000, temperature=0))
    seen = 0
    async for response in call:
        seen += response.delta.token_count
        if seen >= 3:
            break
    call.cancel()
    started = time.monotonic()
    answer = await until_admitted(lambda: _collect(suite.stub.Generate(chat_request(max_tokens=3))))
    assert answer[-1].final.usage.completion_tokens >= 1
    assert time.monotonic() - started < 60  # 4000 tokens would take many minutes
    cancelled = await usage_records(suite, "CANCELLED")
    assert cancelled and max(r.completion_tokens for r in cancelled) >= 3


async def test_generation_metrics_per_deployment(suite):
    """Time to first token, inter-token latency, tokens/s and tokens for the deployment; the
    waiting and running stream gauges are back to zero once no generation runs."""
    [r async for r in suite.stub.Generate(chat_request(max_tokens=6, temperature=0))]
    points = {metric.name: [p for p in metric.data.data_points
                            if dict(p.attributes).get("deployment") == "chat"]
              for resource in suite.metrics.get_metrics_data().resource_metrics
              for scope in resource.scope_metrics for metric in scope.metrics}
    [ttft] = points["maas.inference.generation.time_to_first_token"]
    assert ttft.count >= 1 and ttft.sum > 0
    [inter_token] = points["maas.inference.generation.inter_token_latency"]
    assert inter_token.count >= 1
    [rate] = points["maas.inference.generation.tokens_per_second"]
    assert rate.count >= 1 and rate.sum > 0
    assert sum(p.value for p in points["maas.inference.generation.tokens"]) > 0
    assert [p.value for p in points["maas.inference.generation.streams.waiting"]] == [0]
    assert [p.value for p in points["maas.inference.generation.streams.running"]] == [0]


# --- the SDK and the CLI ---------------------------------------------------------------------

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


# --- the OpenAI-compatible HTTP endpoint, with the official openai client --------------------

async def test_a_streamed_chat_completion_arrives_in_chunks_then_its_usage(suite):
    async with suite.openai() as client:
        chunks = [chunk async for chunk in await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": QUESTION}], stream=True,
            max_tokens=12, temperature=0, stream_options={"include_usage": True})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens > 5 and 0 < chunks[-1].usage.completion_tokens <= 12


async def test_whole_chat_and_text_completions(suite):
    async with suite.openai() as client:
        chat = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
            temperature=0)
        assert "Paris" in chat.choices[0].message.content
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
        completion = await client.completions.create(model="chat", prompt="1, 2, 3, 4,",
                                                     max_tokens=8, temperature=0, stop=[" 7"],
                                                     seed=3)
        assert completion.choices[0].text.startswith(" 5, 6,"), completion.choices[0].text
        assert completion.choices[0].finish_reason == "stop"
        assert " 7" not in completion.choices[0].text
        streamed = [c.choices[0].text async for c in await client.completions.create(
            model="chat", prompt="1, 2, 3, 4,", max_tokens=4, temperature=0, stream=True)]
        assert "".join(streamed).startswith(" 5,") and len(streamed) > 1


async def test_models_and_scopes(suite):
    """/v1/models lists the generative deployments the token may see; a bad token is 401, a
    deployment out of the token's scopes 403, an unknown one 404."""
    async with suite.openai() as admin, suite.openai(suite.team_token) as team, \
            suite.openai(suite.outsider_token) as outsider, suite.openai("not-a-token") as nobody:
        assert [m.id async for m in admin.models.list()] == ["chat"]  # digits does not generate
        assert [m.id async for m in team.models.list()] == ["chat"]
        assert [m.id async for m in outsider.models.list()] == []
        with pytest.raises(openai.PermissionDeniedError):
            await outsider.completions.create(model="chat", prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            await nobody.models.list()
        with pytest.raises(openai.AuthenticationError):
            await nobody.completions.create(model="chat", prompt="hi", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            await admin.chat.completions.create(
                model="ghost", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as caught:
            await admin.completions.create(model="digits", prompt="hi")
        assert caught.value.body["code"] == "NOT_GENERATIVE"
        team_answer = await team.completions.create(model="chat", prompt="1, 2, 3,",
                                                    max_tokens=2, temperature=0)
        assert team_answer.usage.completion_tokens > 0


@pytest.mark.parametrize(("call", "param"), [
    ({"chat": True, "temperature": -1}, "temperature"),
    ({"chat": True, "top_p": 1.5}, "top_p"),
    ({"chat": True, "max_tokens": 100_000}, "max_tokens"),
    ({"chat": True, "max_tokens": 0}, "max_tokens"),
    ({"chat": True, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"chat": True, "n": 2}, "n"),
    ({"chat": False, "prompt": "", "stream": True}, "prompt"),
    ({"chat": False, "prompt": "word " * 9000}, "prompt"),
])
async def test_bad_parameters_are_400_naming_the_parameter(suite, call, param):
    call = dict(call)
    async with suite.openai() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            if call.pop("chat"):
                await client.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], **call)
            else:
                await client.completions.create(model="chat", **call)
    error = caught.value.body
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"]


@pytest.mark.parametrize(("body", "param", "code"), [
    (b"{not json", "body", "BODY_NOT_JSON"),
    (b"\xff\xfe", "body", "BODY_NOT_JSON"),
    (b"[1, 2]", "body", "BODY_NOT_JSON"),
    (b'{"model": "chat", "prompt": "hi", "max_tokens": "ten"}', "max_tokens", "FIELD_TYPE"),
    (b'{"model": "chat", "prompt": {"text": "hi"}}', "prompt", "FIELD_TYPE"),
    (b'{"prompt": "hi"}', "model", "FIELD_REQUIRED"),
])
async def test_bad_json_bodies_are_400_openai_errors(suite, body, param, code):
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{suite.openai_port}/v1/completions", data=body,
            headers={"Authorization": f"Bearer {suite.token}",
                     "Content-Type": "application/json"}) as reply:
        assert reply.status == 400, await reply.text()
        error = (await reply.json())["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code,
                                                              "invalid_request_error"), error


async def test_a_client_leaving_an_http_stream_frees_the_slot(suite):
    async with suite.openai() as client:
        stream = await client.completions.create(model="chat", prompt="1, 2, 3,",
                                                 max_tokens=4000, temperature=0, stream=True)
        async for chunk in stream:
            assert chunk.choices[0].text
            break
        await stream.close()  # the HTTP connection goes away
        started = time.monotonic()
        answer = await until_admitted(lambda: client.completions.create(
            model="chat", prompt="1, 2, 3,", max_tokens=2, temperature=0))
    assert answer.usage.completion_tokens > 0
    assert time.monotonic() - started < 60  # 4000 tokens would take many minutes


# --- KServe-v2 through the gateway -----------------------------------------------------------

@dataclass
class Stream:
    """Every response (or error) of the requests sent on one tritonclient gRPC stream."""

    responses: queue.Queue = field(default_factory=queue.Queue)

    def callback(self, result, error) -> None:
        self.responses.put((result, error))

    def collect(self, count_final: int, timeout: float = 300.0) -> dict[str, list]:
        """Responses per request id until `count_final` requests have ended (final or error);
        errors under "errors"."""
        by_id: dict[str, list] = {}
        ended = 0
        deadline = time.monotonic() + timeout
        while ended < count_final:
            result, error = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                by_id.setdefault("errors", []).append(str(error))
                ended += 1
                continue
            response = result.get_response()
            by_id.setdefault(response.id, []).append(result)
            if response.parameters["triton_final_response"].bool_param:
                ended += 1
        return by_id


def request_inputs(prompt: str | bytes, sampling: dict | None) -> list:
    text = triton_grpc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt if isinstance(prompt, bytes) else prompt.encode()],
                                      dtype=np.object_))
    inputs = [text]
    if sampling is not None:
        parameters = triton_grpc.InferInput("sampling_parameters", [1], "BYTES")
        parameters.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        inputs.append(parameters)
    return inputs


def output_text(result, name: str) -> str:
    value = result.as_numpy(name)
    return b"".join(value.reshape(-1)).decode() if value is not None else ""


def stream_one_by_one(url: str, model: str, requests: list[tuple[str, list]],
                      headers: dict | None = None) -> dict[str, list]:
    """Send each (request id, inputs) on one stream after the previous one ended (the engine
    takes one at a time); the responses by request id."""
    stream = Stream()
    client = triton_grpc.InferenceServerClient(url)
    client.start_stream(callback=stream.callback, headers=headers)
    collected: dict[str, list] = {}
    try:
        for request_id, inputs in requests:
            client.async_stream_infer(model, inputs, request_id=request_id,
                                      enable_empty_final_response=True)
            for key, values in stream.collect(1).items():
                collected.setdefault(key, []).extend(values)
    finally:
        client.stop_stream()
        client.close()
    return collected


@pytest.fixture(scope="module")
def rendered_question() -> str:
    return PromptRenderer.from_directory(smollm2_causal_lm()).render(
        [{"role": "user", "content": QUESTION}])


def first_response_then_cancel(url: str, model: str, inputs: list,
                               headers: dict | None = None) -> tuple:
    """The first (result, error) of one request, whose stream is then cancelled."""
    stream = Stream()
    client = triton_grpc.InferenceServerClient(url)
    client.start_stream(callback=stream.callback, headers=headers)
    try:
        client.async_stream_infer(model, inputs, request_id="first",
                                  enable_empty_final_response=True)
        return stream.responses.get(timeout=120)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


async def until_short_request_admitted(url: str, model: str, prompt: str,
                                       headers: dict | None = None) -> dict[str, list]:
    """A 5-token request retried until the engine's only slot is free again (a cancelled
    stream leaves the engine within a step or two: seconds, not the minutes it would take
    to finish); its responses."""
    started = time.monotonic()
    while True:
        collected = await asyncio.to_thread(
            stream_one_by_one, url, model,
            [("after", request_inputs(prompt, {"max_tokens": 5}))], headers)
        if "errors" not in collected:
            return collected
        assert all("RESOURCE_EXHAUSTED" in e for e in collected["errors"]), collected
        assert time.monotonic() - started < 60, "the cancelled stream kept its slot"
        await asyncio.sleep(0.2)


async def test_kserve_model_stream_infer_through_the_gateway(suite, rendered_question):
    """tritonclient's own stream pointed at the gateway (model name = deployment id);
    `sampling_parameters` is optional (the model's defaults: sampled, up to 256 tokens, so
    only its first response is awaited)."""
    headers = {"authorization": f"Bearer {suite.token}"}
    collected = await asyncio.to_thread(
        stream_one_by_one, suite.target, "chat",
        [("k1", request_inputs("1, 2, 3, 4,", {"max_tokens": 6, "temperature": 0}))], headers)
    assert "errors" not in collected, collected.get("errors")
    counted = collected["k1"]
    assert "5" in "".join(output_text(r, "text_output") for r in counted)
    assert counted[0].get_response().model_name == "chat"
    assert output_text(counted[-1], "finish_reason") in ("stop", "length")
    result, error = await asyncio.to_thread(
        first_response_then_cancel, suite.target, "chat", request_inputs(rendered_question, None),
        headers)
    assert error is None, error
    assert output_text(result, "text_output") or output_text(result, "finish_reason")
    await until_short_request_admitted(suite.target, "chat", rendered_question, headers)


# --- the decoupled generation model on Triton's own port (no gateway) ------------------------

async def test_the_model_streams_text_deltas_then_a_final_response_with_reason_and_usage(
        suite, rendered_question):
    collected = await asyncio.to_thread(
        stream_one_by_one, suite.triton_url, suite.triton_model,
        [("greedy", request_inputs(rendered_question, {"max_tokens": 30, "temperature": 0}))])
    greedy = collected["greedy"]
    assert len(greedy) > 2, "one response per token group, not one at the end"
    assert all(output_text(r, "finish_reason") == "" for r in greedy[:-1])
    last = greedy[-1]
    assert last.get_response().parameters["triton_final_response"].bool_param
    assert output_text(last, "finish_reason") == "stop"
    assert "Paris" in "".join(output_text(r, "text_output") for r in greedy)
    usage = json.loads(output_text(last, "usage"))
    assert usage["prompt_tokens"] == 37
    assert 0 < usage["completion_tokens"] <= 30
    assert usage["time_to_first_token_s"] > 0
    counts = [json.loads(output_text(r, "usage"))["completion_tokens"] for r in greedy]
    assert counts == sorted(counts), "usage is cumulative"


async def test_the_models_bad_input_is_an_error_naming_the_code_and_the_field(
        suite, rendered_question):
    bad = [("max0", request_inputs(rendered_question, {"max_tokens": 0})),
           ("cold", request_inputs(rendered_question, {"temperature": -1})),
           ("empty", request_inputs("", {"max_tokens": 4})),
           ("long", request_inputs(rendered_question, {"max_tokens": 9000})),
           ("utf8", request_inputs(b"\xff\xfe caf\xe9", None))]
    collected = await asyncio.to_thread(stream_one_by_one, suite.triton_url,
                                        suite.triton_model, bad)
    errors = collected["errors"]
    assert len(errors) == 5, collected
    assert any("INVALID_ARGUMENT: max_tokens: must be between 1" in e for e in errors), errors
    assert any("INVALID_ARGUMENT: temperature: " in e for e in errors), errors
    assert any("INVALID_ARGUMENT: text_input: the prompt is empty" in e for e in errors), errors
    assert any("INVALID_ARGUMENT: max_tokens: 9000 new tokens" in e for e in errors), errors
    assert any("INVALID_ARGUMENT: text_input: is not valid UTF-8" in e for e in errors), errors


async def test_past_the_models_queue_bound_requests_are_refused_until_a_cancel_frees_the_slot(
        suite, rendered_question):
    counting = PromptRenderer.from_directory(smollm2_causal_lm()).render(
        [{"role": "user", "content": COUNTING}])

    def refused_then_cancelled() -> str:
        stream = Stream()
        client = triton_grpc.InferenceServerClient(suite.triton_url)
        client.start_stream(callback=stream.callback)
        try:
            for index in range(2):  # 1 running + 0 waiting: the second is refused
                client.async_stream_infer(
                    suite.triton_model, request_inputs(counting, {"max_tokens": 4000,
                                                                  "temperature": 0}),
                    request_id=f"long-{index}", enable_empty_final_response=True)
            result, error = stream.responses.get(timeout=120)
            while error is None:
                result, error = stream.responses.get(timeout=120)
            return str(error)
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()

    assert "RESOURCE_EXHAUSTED:" in await asyncio.to_thread(refused_then_cancelled)
    collected = await until_short_request_admitted(suite.triton_url, suite.triton_model,
                                                   rendered_question)
    assert output_text(collected["after"][-1], "finish_reason") in ("stop", "length")
