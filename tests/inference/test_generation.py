"""Generation as a domain object: validation with field paths, the Triton model's contract,
its errors, and a caller leaving mid-stream (the Triton call ends at once, what came is
charged and recorded). A fake Triton stream answers as the decoupled generation model does;
the end-to-end tests against the real model are in test_generation_serving.py.
"""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from maas.inference.v1 import inference_service_pb2 as inf
from maas_inference.generation import (
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    Generator,
    PromptFacts,
    PromptRenderers,
    TextDelta,
)
from maas_inference.tenancy import TenancyConfigSource, TenantLimiter
from maas_inference.usage import UsageLedger, UsageStore
from maas_llm.prompts import ChatMessage
from maas_runtime import errors
from maas_runtime.auth import ANONYMOUS_ADMIN
from maas_runtime.messages import parse_request
from tritonclient.grpc import service_pb2

from tests.inference.test_deployment_manager import FakeTriton, TwoModelRegistry, manager

IMPORTED_SIGNATURE = {  # what an imported causal LM's version says (the SDK's import)
    "inputs": [{"name": "text_input", "datatype": "DATA_TYPE_BYTES", "shape": [1]}],
    "outputs": [{"name": "text_output", "datatype": "DATA_TYPE_BYTES", "shape": [1]}],
}
CONTEXT = 64


class WordRenderer:
    """A stand-in chat template and tokenizer: one token per word."""

    def render(self, messages, *, field_path: str = "messages") -> str:
        return "".join(f"<{m.role}> {m.content} " for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class GenerativeRegistry(TwoModelRegistry):
    async def resolve(self, reference: str) -> dict:
        version = await super().resolve(reference)
        if reference.startswith("models/llm"):
            version = {**version, "format": "MODEL_FORMAT_CAUSAL_LM",
                       "signature": IMPORTED_SIGNATURE}
        return version


def bytes_tensor(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def model_response(text: str, completion_tokens: int, finish: str = "",
                   error: str = "") -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelStreamInferResponse(error_message=error)
    reply = response.infer_response
    usage = {"prompt_tokens": 3, "completion_tokens": completion_tokens,
             "time_to_first_token_s": 0.01}
    for name, value in (("text_output", text.encode()), ("finish_reason", finish.encode()),
                        ("usage", json.dumps(usage).encode())):
        reply.outputs.add(name=name, datatype="BYTES", shape=[1])
        reply.raw_output_contents.append(bytes_tensor(value))
    reply.parameters["triton_final_response"].bool_param = bool(finish) or bool(error)
    return response


class ScriptedStream:
    """Answers a request with the scripted responses; waits forever after the last one
    unless it was final (a model still generating)."""

    def __init__(self, script: list[service_pb2.ModelStreamInferResponse]) -> None:
        self.script = list(script)
        self.sent: list[service_pb2.ModelInferRequest] = []
        self.closed = asyncio.Event()

    async def send(self, request) -> None:
        self.sent.append(request)

    async def receive(self):
        if self.script:
            await asyncio.sleep(0)
            return self.script.pop(0)
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.closed.set()


class GeneratingTriton(FakeTriton):
    def __init__(self) -> None:
        super().__init__()
        self.streams: list[ScriptedStream] = []
        self.script: list[service_pb2.ModelStreamInferResponse] = []

    def open_stream(self, *, timeout=None, metadata=None):
        stream = ScriptedStream(self.script)
        self.streams.append(stream)
        return stream


class ListStore(UsageStore):
    """The usage records written, in memory (`ledger` is the ledger writing them)."""

    def __init__(self) -> None:
        self.records = []
        self.ledger: UsageLedger | None = None

    def insert_many(self, records) -> None:
        self.records.extend(records)

    def list_records(self, query, limit, before_id):
        raise AssertionError("not read here")

    def summarize(self, *args, **kwargs):
        raise AssertionError("not read here")

    def close(self) -> None:
        pass


@pytest.fixture
async def served(tmp_path):
    triton = GeneratingTriton()
    deployments = manager(tmp_path, GenerativeRegistry(), triton)
    await deployments.controller.create("chat", {"model": "models/llm/versions/1"},
                                        ANONYMOUS_ADMIN)
    await deployments.controller.create("digits", {"model": "models/digits/versions/1"},
                                        ANONYMOUS_ADMIN)
    store = ListStore()
    store.ledger = UsageLedger(store, flush_seconds=0.05)
    await store.ledger.start()
    limiter = TenantLimiter(TenancyConfigSource(None), store.ledger)
    generator = Generator(deployments.routes, triton,
                          PromptRenderers(lambda _: PromptFacts(WordRenderer(), CONTEXT)),
                          limiter=limiter)
    yield generator, triton, store
    await store.ledger.close()
    await deployments.close()


async def collect(generator: Generator, request: GenerationRequest):
    return [event async for event in generator.generate(request, ANONYMOUS_ADMIN)]


async def test_a_prompt_streams_its_deltas_then_the_final_with_usage(served):
    generator, triton, store = served
    triton.script = [model_response("The capital", 2), model_response(" is Paris.", 5),
                     model_response("", 5, finish="stop")]
    events = await collect(generator, GenerationRequest(
        "deployments/chat", prompt="capital of France?", max_tokens=8, temperature=0,
        stop=("\n",), seed=7))

    assert events[:2] == [TextDelta("The capital", 2), TextDelta(" is Paris.", 3)]
    final = events[-1]
    assert isinstance(final, GenerationEnd) and final.finish_reason is FinishReason.STOP
    assert (final.prompt_tokens, final.completion_tokens, final.total_tokens) == (3, 5, 8)
    assert final.time_to_first_token is not None and final.time_to_first_token >= 0
    [stream] = triton.streams
    [sent] = stream.sent
    assert sent.model_name == "chat.llm.v1" and [i.name for i in sent.inputs] == [
        "text_input", "sampling_parameters"]
    assert sent.raw_input_contents[0] == bytes_tensor(b"capital of France?")
    sampling = json.loads(sent.raw_input_contents[1][4:])
    assert sampling == {"max_tokens": 8, "temperature": 0, "top_p": 1.0, "top_k": 0,
                        "stop": ["\n"], "seed": 7, "repetition_penalty": 1.0}
    assert stream.closed.is_set()
    assert [(r.outcome, r.prompt_tokens, r.completion_tokens, r.kind) for r in store.records
            ] == [("OK", 3, 5, "generation")]


async def test_a_conversation_is_rendered_and_max_tokens_defaults_to_the_room_left(served):
    generator, triton, _ = served
    triton.script = [model_response("Hi", 1, finish="length")]
    events = await collect(generator, GenerationRequest(
        "deployments/chat", messages=(ChatMessage("system", "Be brief."),
                                      ChatMessage("user", "Hello"))))
    assert events[-1].finish_reason is FinishReason.LENGTH
    sent = triton.streams[0].sent[0]
    assert sent.raw_input_contents[0][4:] == b"<system> Be brief. <user> Hello <assistant>"
    assert json.loads(sent.raw_input_contents[1][4:])["max_tokens"] == CONTEXT - 6


LONG_PROMPT = "word " * CONTEXT


@pytest.mark.parametrize(("fields", "field_path"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": LONG_PROMPT}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": CONTEXT}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
    ({"stop": ("x" * 65,)}, "stop[0]"),
    ({"stop": ("",)}, "stop[0]"),
    ({"prompt": None, "messages": ()}, "conversation.messages"),
    ({"prompt": None, "messages": (ChatMessage("robot", "hi"),)},
     "conversation.messages[0].role"),
])
async def test_bad_inputs_are_invalid_argument_naming_the_field(served, fields, field_path):
    generator, triton, store = served
    request = GenerationRequest("deployments/chat", **{"prompt": "hello", **fields})
    with pytest.raises(errors.InvalidArgument) as caught:
        await collect(generator, request)
    assert field_path in [v.field for v in caught.value.field_violations]
    assert triton.streams == [] and store.records == []  # refused before Triton and admission


async def test_text_that_is_not_utf8_is_refused_naming_its_field():
    cases = {
        "prompt": inf.GenerateRequest(deployment="deployments/chat", prompt="ab"),
        "stop[1]": inf.GenerateRequest(deployment="deployments/chat", prompt="x",
                                       stop=["x", "ab"]),
        "conversation.messages[0].content": inf.GenerateRequest(
            deployment="deployments/chat", conversation=inf.Conversation(
                messages=[inf.ChatMessage(role="user", content="ab")])),
    }
    for field_path, message in cases.items():
        broken = message.SerializeToString().replace(b"ab", b"\xff\xfe")
        with pytest.raises(errors.InvalidArgument) as caught:
            parse_request(inf.GenerateRequest, broken)
        assert [v.field for v in caught.value.field_violations] == [field_path]
        assert caught.value.reason == "TEXT_NOT_UTF8"


async def test_a_deployment_that_does_not_generate_is_failed_precondition(served):
    generator, _, _ = served
    with pytest.raises(errors.FailedPrecondition) as caught:
        await collect(generator, GenerationRequest("deployments/digits", prompt="hi"))
    assert caught.value.reason == "NOT_GENERATIVE"
    with pytest.raises(errors.NotFound):
        await collect(generator, GenerationRequest("deployments/ghost", prompt="hi"))


@pytest.mark.parametrize(("message", "error_type", "field_path"), [
    ("RESOURCE_EXHAUSTED: 32 streams are waiting", errors.ResourceExhausted, None),
    ("INVALID_ARGUMENT: top_k: must be below the vocabulary", errors.InvalidArgument, "top_k"),
    ("the engine crashed", errors.Unavailable, None),
])
async def test_the_models_errors_keep_their_codes(served, message, error_type, field_path):
    generator, triton, store = served
    triton.script = [model_response("", 0, error=message)]
    with pytest.raises(error_type) as caught:
        await collect(generator, GenerationRequest("deployments/chat", prompt="hi"))
    if field_path:
        assert [v.field for v in caught.value.field_violations] == [field_path]
    assert triton.streams[0].closed.is_set()
    await store.ledger.close()
    assert [r.outcome for r in store.records] == [error_type.code]


async def test_a_caller_leaving_mid_stream_ends_the_triton_call_and_is_charged(served):
    generator, triton, store = served
    triton.script = [model_response("one", 1), model_response(" two", 2)]  # then nothing more
    received: list = []

    async def consume() -> None:
        async for event in generator.generate(
                GenerationRequest("deployments/chat", prompt="count"), ANONYMOUS_ADMIN):
            received.append(event)

    task = asyncio.create_task(consume())
    while len(received) < 2:
        await asyncio.sleep(0.01)
    task.cancel()  # what grpc does when the caller disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    stream = triton.streams[0]
    assert stream.closed.is_set()  # the Triton call is cancelled: the model frees the slot
    await store.ledger.close()
    assert [(r.outcome, r.completion_tokens) for r in store.records] == [("CANCELLED", 2)]


async def test_kserve_stream_infer_reaches_the_generation_model_without_sampling_parameters(
        tmp_path):
    """KServe-v2 clients stream the same deployment; `sampling_parameters` is optional."""
    triton = GeneratingTriton()
    deployments = manager(tmp_path, GenerativeRegistry(), triton)
    await deployments.controller.create("chat", {"model": "models/llm/versions/1"},
                                        ANONYMOUS_ADMIN)
    triton.script = [model_response("Hi", 1), model_response("", 1, finish="stop")]
    request = service_pb2.ModelInferRequest(model_name="chat", id="r1")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(bytes_tensor(b"Hello"))

    async def one(message):
        yield message

    answers = [r async for r in deployments.predictor.kserve_stream_infer(
        one(request), None, ANONYMOUS_ADMIN)]
    assert [r.error_message for r in answers] == ["", ""]
    assert answers[0].infer_response.model_name == "chat"
    assert triton.streams[0].sent[0].model_name == "chat.llm.v1"
    await deployments.close()


async def test_generation_metrics_per_deployment(tmp_path):
    """Time to first token, inter-token latency, tokens/s and tokens per deployment; the
    waiting and running stream gauges go back to zero when the generation ends."""
    from maas_inference.generation import GenerationMetrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    triton = GeneratingTriton()
    deployments = manager(tmp_path, GenerativeRegistry(), triton)
    await deployments.controller.create("chat", {"model": "models/llm/versions/1"},
                                        ANONYMOUS_ADMIN)
    generator = Generator(
        deployments.routes, triton,
        PromptRenderers(lambda _: PromptFacts(WordRenderer(), CONTEXT)),
        metrics=GenerationMetrics(MeterProvider(metric_readers=[reader]).get_meter("t")))
    triton.script = [model_response("a", 1), model_response(" b c", 3),
                     model_response("", 3, finish="stop")]
    await collect(generator, GenerationRequest("deployments/chat", prompt="go"))
    metrics = {metric.name: metric.data.data_points
               for resource in reader.get_metrics_data().resource_metrics
               for scope in resource.scope_metrics for metric in scope.metrics}
    chat = {"deployment": "chat"}
    [ttft] = metrics["maas.inference.generation.time_to_first_token"]
    assert dict(ttft.attributes) == chat and ttft.count == 1
    [inter_token] = metrics["maas.inference.generation.inter_token_latency"]
    assert inter_token.count == 1  # one gap after the first token
    [rate] = metrics["maas.inference.generation.tokens_per_second"]
    assert rate.count == 1 and rate.sum > 0
    assert [p.value for p in metrics["maas.inference.generation.tokens"]] == [3]
    assert [p.value for p in metrics["maas.inference.generation.streams.waiting"]] == [0]
    assert [p.value for p in metrics["maas.inference.generation.streams.running"]] == [0]
    await deployments.close()
