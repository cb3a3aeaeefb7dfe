"""The request coalescer against a scripted Triton: who shares a call, and who gets which rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from maas_inference.coalescing import RequestCoalescer, sharing_key
from maas_runtime import errors
from tritonclient.grpc import service_pb2


def request(values: np.ndarray, request_id: str, *, outputs=("logits",), **fields):
    message = service_pb2.ModelInferRequest(model_name="m", id=request_id, **fields)
    message.inputs.add(name="x", datatype="FP32", shape=list(values.shape))
    message.raw_input_contents.append(values.astype(np.float32).tobytes())
    for name in outputs:
        message.outputs.add(name=name)
    return message


def rows_of(reply) -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))


class ScriptedTriton:
    """Doubles every value; each call waits until the test opens the gate."""

    def __init__(self, fail_with: Exception | None = None):
        self.calls: list[service_pb2.ModelInferRequest] = []
        self.gate = asyncio.Event()
        self.fail_with = fail_with

    async def send(self, message, *, timeout=None, metadata=None):
        self.calls.append(message)
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        values = np.frombuffer(message.raw_input_contents[0], np.float32).reshape(
            tuple(message.inputs[0].shape))
        reply = service_pb2.ModelInferResponse(model_name=message.model_name, model_version="1",
                                               id=message.id)
        reply.outputs.add(name="logits", datatype="FP32", shape=list(values.shape))
        reply.raw_output_contents.append((values * 2).tobytes())
        return reply


def sent(coalescer, values: np.ndarray, request_id: str, *, max_rows: int = 8, timeout=None,
         **fields) -> asyncio.Task:
    """A request under way through `coalescer` (one call open per model)."""
    return asyncio.create_task(coalescer.infer(
        request(values, request_id, **fields), rows=len(values), max_rows=max_rows,
        max_in_flight=1, timeout=timeout))


async def model_made_busy(coalescer, triton, max_rows: int = 8) -> asyncio.Task:
    """A request holding the model's only call slot until the test opens Triton's gate."""
    busy = sent(coalescer, np.zeros((1, 3)), "busy", max_rows=max_rows)
    await until(lambda: len(triton.calls) == 1)
    return busy


async def one_alone_then_the_rest_together(coalescer, triton, count: int) -> list:
    """`count` one-row requests: the first is sent alone, the others wait and share a call."""
    calls = [sent(coalescer, np.ones((1, 3)), f"r{i}") for i in range(count)]
    await until(lambda: len(triton.calls) == 1)
    await asyncio.sleep(0.01)
    triton.gate.set()
    return await asyncio.gather(*calls, return_exceptions=True)


async def until(predicate) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")


async def test_a_request_alone_goes_out_at_once_as_it_came():
    triton = ScriptedTriton()
    triton.gate.set()
    coalescer = RequestCoalescer(triton.send)
    sent = request(np.ones((2, 3)), "solo")
    reply = await coalescer.infer(sent, rows=2, max_rows=8, max_in_flight=1)
    assert triton.calls == [sent] and triton.calls[0] is sent
    np.testing.assert_array_equal(rows_of(reply), np.full((2, 3), 2.0))


async def test_requests_waiting_for_a_busy_model_share_one_call_and_get_their_own_rows():
    triton = ScriptedTriton()
    coalescer = RequestCoalescer(triton.send)
    data = {f"r{i}": np.arange(i * 10, i * 10 + 3 * (i % 3 + 1), dtype=np.float32).reshape(-1, 3)
            for i in range(5)}
    first = sent(coalescer, data["r0"], "r0", max_rows=32)
    await until(lambda: len(triton.calls) == 1)
    rest = [sent(coalescer, data[k], k, max_rows=32) for k in ("r1", "r2", "r3", "r4")]
    await asyncio.sleep(0.01)
    assert len(triton.calls) == 1, "the others wait while the model's only slot is busy"
    triton.gate.set()
    replies = await asyncio.gather(first, *rest)

    assert len(triton.calls) == 2
    merged = triton.calls[1]
    assert list(merged.inputs[0].shape) == [sum(len(data[k]) for k in ("r1", "r2", "r3", "r4")), 3]
    assert [o.name for o in merged.outputs] == ["logits"]
    for key, reply in zip(data, replies, strict=True):
        assert reply.id == key and reply.model_version == "1"
        np.testing.assert_array_equal(rows_of(reply), data[key] * 2)


async def test_a_shared_call_never_exceeds_max_batch_size():
    triton = ScriptedTriton()
    coalescer = RequestCoalescer(triton.send)
    busy = await model_made_busy(coalescer, triton, max_rows=4)
    waiting = [sent(coalescer, np.full((3, 3), i), f"w{i}", max_rows=4) for i in range(3)]
    await asyncio.sleep(0.01)
    triton.gate.set()
    replies = await asyncio.gather(busy, *waiting)
    assert [list(call.inputs[0].shape) for call in triton.calls] == [[1, 3], [3, 3], [3, 3], [3, 3]]
    for index, reply in enumerate(replies[1:]):
        np.testing.assert_array_equal(rows_of(reply), np.full((3, 3), 2.0 * index))


@pytest.mark.parametrize("different", [
    {"outputs": ()},                           # other requested outputs
    {"model_version": "2"},                    # another version
])
async def test_unalike_requests_do_not_share(different):
    triton = ScriptedTriton()
    coalescer = RequestCoalescer(triton.send)
    busy = await model_made_busy(coalescer, triton)
    same = sent(coalescer, np.ones((1, 3)), "same")
    other = sent(coalescer, np.ones((1, 3)), "other", **different)
    await asyncio.sleep(0.01)
    triton.gate.set()
    await asyncio.gather(busy, same, other)
    assert sorted(len(call.raw_input_contents[0]) // 12 for call in triton.calls) == [1, 1, 1]


def test_requests_with_parameters_or_typed_contents_always_go_alone():
    plain = request(np.ones((1, 3)), "a")
    assert sharing_key(plain) is not None
    with_parameters = request(np.ones((1, 3)), "b")
    with_parameters.parameters["priority"].int64_param = 1
    typed = service_pb2.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    assert sharing_key(with_parameters) is None and sharing_key(typed) is None


async def test_a_waiting_request_keeps_its_own_deadline():
    triton = ScriptedTriton()
    coalescer = RequestCoalescer(triton.send)
    busy = await model_made_busy(coalescer, triton)
    patient = sent(coalescer, np.ones((1, 3)), "patient")
    with pytest.raises(errors.DeadlineExceeded):
        await sent(coalescer, np.ones((1, 3)), "hurried", timeout=0.05)
    triton.gate.set()
    await asyncio.gather(busy, patient)
    assert [call.id for call in triton.calls] == ["busy", "patient"], "the late one was not sent"


@pytest.mark.parametrize("failure", [errors.Unavailable("Triton went away"), RuntimeError("bug")])
async def test_a_failed_shared_call_fails_each_of_its_requests(failure):
    triton = ScriptedTriton(fail_with=failure)
    coalescer = RequestCoalescer(triton.send)
    outcomes = await one_alone_then_the_rest_together(coalescer, triton, 4)
    assert all(isinstance(outcome, type(failure)) for outcome in outcomes), outcomes
    assert len(triton.calls) == 2


async def test_a_reply_that_is_not_batch_major_is_an_internal_error_not_a_wrong_answer():
    class ScalarTriton(ScriptedTriton):
        async def send(self, message, *, timeout=None, metadata=None):
            reply = await super().send(message, timeout=timeout, metadata=metadata)
            reply.outputs[0].shape[:] = [1, reply.outputs[0].shape[0] * 3]
            return reply

    triton = ScalarTriton()
    coalescer = RequestCoalescer(triton.send)
    outcomes = await one_alone_then_the_rest_together(coalescer, triton, 3)
    assert [type(outcome) for outcome in outcomes[1:]] == [errors.Internal, errors.Internal]


async def test_sharing_off_sends_everything_alone():
    triton = ScriptedTriton()
    triton.gate.set()
    coalescer = RequestCoalescer(triton.send)
    await asyncio.gather(*(coalescer.infer(request(np.ones((1, 3)), f"r{i}"), rows=1, max_rows=8,
                                           max_in_flight=0) for i in range(5)))
    assert [call.id for call in triton.calls] == [f"r{i}" for i in range(5)]


async def test_a_shared_call_is_traced_as_a_child_of_the_first_request_linked_to_all():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    triton = ScriptedTriton()
    metadata_seen = []
    send = triton.send

    async def recording_send(message, *, timeout=None, metadata=None):
        metadata_seen.append(dict(metadata or ()))
        return await send(message, timeout=timeout, metadata=metadata)

    coalescer = RequestCoalescer(recording_send, tracer=tracer)

    async def traced(request_id: str):
        with tracer.start_as_current_span(f"rpc {request_id}") as span:
            await coalescer.infer(request(np.ones((1, 3)), request_id), rows=1, max_rows=8,
                                  max_in_flight=1)
            return span.get_span_context()

    first = asyncio.create_task(traced("r0"))
    await until(lambda: len(triton.calls) == 1)
    waiting = [asyncio.create_task(traced(f"r{i}")) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    triton.gate.set()
    contexts = await asyncio.gather(first, *waiting)

    shared = next(s for s in exporter.get_finished_spans() if s.name == "triton.ModelInfer shared")
    assert shared.attributes["maas.shared.requests"] == 3 and shared.attributes["maas.shared.rows"] == 3
    waiting_spans = {c.span_id for c in contexts[1:]}
    assert shared.parent.span_id in waiting_spans and shared.context.trace_id == shared.parent.trace_id
    assert {link.context.span_id for link in shared.links} == waiting_spans
    members = [s for s in exporter.get_finished_spans() if s.context.span_id in waiting_spans]
    assert all(any(e.name == "shared Triton call" and e.attributes["maas.shared.span_id"] ==
                   format(shared.context.span_id, "016x") for e in s.events) for s in members)
    # Triton continues the shared span's trace.
    assert format(shared.context.span_id, "016x") in metadata_seen[1]["traceparent"]


async def test_requests_waiting_on_an_interrupted_call_are_told_to_retry():
    triton = ScriptedTriton()
    coalescer = RequestCoalescer(triton.send)
    busy = await model_made_busy(coalescer, triton)
    waiting = [sent(coalescer, np.ones((1, 3)), f"w{i}") for i in range(2)]
    await asyncio.sleep(0.01)
    busy.cancel()  # the alone call ends; the two waiting now share one call
    await until(lambda: len(triton.calls) == 2)
    for task in list(coalescer._tasks):
        task.cancel()  # as at shutdown
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(outcome, errors.Unavailable) for outcome in outcomes), outcomes
