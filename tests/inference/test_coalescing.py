"""The request coalescer in front of the session's real tritonserver: who shares a call, and
who gets which rows.

Triton answers every call; the test decides only when a call leaves (`GatedTriton` holds each
call at a gate until the test opens it), so that requests arriving meanwhile must wait for the
model's only call slot. The models are TorchScript archives written by the test: one doubles
every value, one answers with its rows flattened (not batch-major).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from maas_inference.coalescing import RequestCoalescer, sharing_key
from maas_inference.triton import (
    ArtifactFormat,
    BatchingPolicy,
    TensorSpec,
    TritonClient,
    TritonModelSpec,
)
from maas_inference.triton.model_repository import ModelRepository
from maas_runtime import errors
from tritonclient.grpc import service_pb2

from tests.inference.model_packages import save_torchscript
from tests.support.processes import free_port

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

DOUBLING = "coalescing-double"
FLATTENING = "coalescing-flat"


class Doubling(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Flattening(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).reshape(1, -1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def models(tmp_path_factory, triton_client: TritonClient,
                 model_repository: ModelRepository) -> AsyncIterator[None]:
    """Both models loaded in the session's Triton, unloaded after the module."""
    workdir: Path = tmp_path_factory.mktemp("coalescing")
    save_torchscript(workdir / "double.pt", Doubling(), torch.zeros(1, 3))
    model_repository.write_model(TritonModelSpec(
        DOUBLING, ArtifactFormat.TORCHSCRIPT, (TensorSpec("x", "FP32", (3,)),),
        (TensorSpec("logits", "FP32", (3,)),), batching=BatchingPolicy(max_batch_size=32)),
        workdir / "double.pt")
    # Batching off: the model sees the whole (rows, 3) input and answers one (1, rows*3) row.
    save_torchscript(workdir / "flat.pt", Flattening(), torch.zeros(2, 3))
    model_repository.write_model(TritonModelSpec(
        FLATTENING, ArtifactFormat.TORCHSCRIPT, (TensorSpec("x", "FP32", (3,)),),
        (TensorSpec("logits", "FP32", (-1,)),),
        batching=BatchingPolicy(max_batch_size=0, dynamic_batching=False)),
        workdir / "flat.pt")
    await asyncio.gather(*(triton_client.load_model(name) for name in (DOUBLING, FLATTENING)))
    yield
    for name in (DOUBLING, FLATTENING):
        await triton_client.unload_model(name)
        model_repository.remove_model(name)


class GatedTriton:
    """Sends each call to the real Triton once the test opens the gate; records every call
    as the coalescer makes it."""

    def __init__(self, triton: TritonClient):
        self.calls: list[service_pb2.ModelInferRequest] = []
        self.gate = asyncio.Event()
        self._triton = triton

    async def send(self, message, *, timeout=None, metadata=None):
        self.calls.append(message)
        await self.gate.wait()
        return await self._triton.infer_request(message, timeout=timeout, metadata=metadata)


@pytest.fixture
def gated(models, triton_client: TritonClient) -> GatedTriton:
    return GatedTriton(triton_client)


def request(values: np.ndarray, request_id: str, *, outputs=("logits",), model=DOUBLING,
            **fields):
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id, **fields)
    message.inputs.add(name="x", datatype="FP32", shape=list(values.shape))
    message.raw_input_contents.append(values.astype(np.float32).tobytes())
    for name in outputs:
        message.outputs.add(name=name)
    return message


def rows_of(reply) -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))


def sent(coalescer, values: np.ndarray, request_id: str, *, max_rows: int = 8, timeout=None,
         **fields) -> asyncio.Task:
    """A request under way through `coalescer` (one call open per model)."""
    return asyncio.create_task(coalescer.infer(
        request(values, request_id, **fields), rows=len(values), max_rows=max_rows,
        max_in_flight=1, timeout=timeout))


async def model_made_busy(coalescer, gated, max_rows: int = 8) -> asyncio.Task:
    """A request holding the model's only call slot until the test opens Triton's gate."""
    busy = sent(coalescer, np.zeros((1, 3)), "busy", max_rows=max_rows)
    await until(lambda: len(gated.calls) == 1)
    return busy


async def one_alone_then_the_rest_together(coalescer, gated, count: int, **fields) -> list:
    """`count` one-row requests: the first is sent alone, the others wait and share a call."""
    calls = [sent(coalescer, np.ones((1, 3)), f"r{i}", **fields) for i in range(count)]
    await until(lambda: len(gated.calls) == 1)
    await asyncio.sleep(0.01)
    gated.gate.set()
    return await asyncio.gather(*calls, return_exceptions=True)


async def until(predicate) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")


async def test_a_request_alone_goes_out_at_once_as_it_came(gated):
    gated.gate.set()
    coalescer = RequestCoalescer(gated.send)
    sent = request(np.ones((2, 3)), "solo")
    reply = await coalescer.infer(sent, rows=2, max_rows=8, max_in_flight=1)
    assert gated.calls == [sent] and gated.calls[0] is sent
    np.testing.assert_array_equal(rows_of(reply), np.full((2, 3), 2.0))


async def test_requests_waiting_for_a_busy_model_share_one_call_and_get_their_own_rows(gated):
    coalescer = RequestCoalescer(gated.send)
    data = {f"r{i}": np.arange(i * 10, i * 10 + 3 * (i % 3 + 1), dtype=np.float32).reshape(-1, 3)
            for i in range(5)}
    first = sent(coalescer, data["r0"], "r0", max_rows=32)
    await until(lambda: len(gated.calls) == 1)
    rest = [sent(coalescer, data[k], k, max_rows=32) for k in ("r1", "r2", "r3", "r4")]
    await asyncio.sleep(0.01)
    assert len(gated.calls) == 1, "the others wait while the model's only slot is busy"
    gated.gate.set()
    replies = await asyncio.gather(first, *rest)

    assert len(gated.calls) == 2
    merged = gated.calls[1]
    assert list(merged.inputs[0].shape) == [sum(len(data[k]) for k in ("r1", "r2", "r3", "r4")), 3]
    assert [o.name for o in merged.outputs] == ["logits"]
    for key, reply in zip(data, replies, strict=True):
        assert reply.id == key and reply.model_version == "1"
        np.testing.assert_array_equal(rows_of(reply), data[key] * 2)


async def test_a_shared_call_never_exceeds_max_batch_size(gated):
    coalescer = RequestCoalescer(gated.send)
    busy = await model_made_busy(coalescer, gated, max_rows=4)
    waiting = [sent(coalescer, np.full((3, 3), i), f"w{i}", max_rows=4) for i in range(3)]
    await asyncio.sleep(0.01)
    gated.gate.set()
    replies = await asyncio.gather(busy, *waiting)
    assert [list(call.inputs[0].shape) for call in gated.calls] == [[1, 3], [3, 3], [3, 3], [3, 3]]
    for index, reply in enumerate(replies[1:]):
        np.testing.assert_array_equal(rows_of(reply), np.full((3, 3), 2.0 * index))


@pytest.mark.parametrize("different", [
    {"outputs": ()},                           # other requested outputs
    {"model_version": "1"},                    # a version named (the others name none)
])
async def test_unalike_requests_do_not_share(gated, different):
    coalescer = RequestCoalescer(gated.send)
    busy = await model_made_busy(coalescer, gated)
    same = sent(coalescer, np.ones((1, 3)), "same")
    other = sent(coalescer, np.ones((1, 3)), "other", **different)
    await asyncio.sleep(0.01)
    gated.gate.set()
    await asyncio.gather(busy, same, other)
    assert sorted(len(call.raw_input_contents[0]) // 12 for call in gated.calls) == [1, 1, 1]


async def test_requests_with_parameters_or_typed_contents_always_go_alone():
    plain = request(np.ones((1, 3)), "a")
    assert sharing_key(plain) is not None
    with_parameters = request(np.ones((1, 3)), "b")
    with_parameters.parameters["priority"].int64_param = 1
    typed = service_pb2.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    assert sharing_key(with_parameters) is None and sharing_key(typed) is None


async def test_a_waiting_request_keeps_its_own_deadline(gated):
    coalescer = RequestCoalescer(gated.send)
    busy = await model_made_busy(coalescer, gated)
    patient = sent(coalescer, np.ones((1, 3)), "patient")
    with pytest.raises(errors.DeadlineExceeded):
        await sent(coalescer, np.ones((1, 3)), "hurried", timeout=0.05)
    gated.gate.set()
    await asyncio.gather(busy, patient)
    assert [call.id for call in gated.calls] == ["busy", "patient"], "the late one was not sent"


@pytest.mark.parametrize("failure", ["Triton gone", "client closed"])
async def test_a_failed_shared_call_fails_each_of_its_requests(models, triton, failure):
    """Triton gone (nothing listens on its port any more: UNAVAILABLE) or the client closed
    under the calls (a failure that is no suite error, as a bug would raise): each request
    of the shared call gets the failure of the call."""
    if failure == "Triton gone":
        client = TritonClient(f"127.0.0.1:{free_port()}")
    else:
        client = TritonClient(triton.grpc_url, control_key=triton.control_key)
        await client.close()
    gated = GatedTriton(client)
    coalescer = RequestCoalescer(gated.send)
    try:
        outcomes = await one_alone_then_the_rest_together(coalescer, gated, 4)
    finally:
        await client.close()
    assert all(isinstance(outcome, Exception) for outcome in outcomes), outcomes
    assert len({type(outcome) for outcome in outcomes}) == 1, outcomes
    if failure == "Triton gone":
        assert isinstance(outcomes[0], errors.Unavailable)
    else:
        assert isinstance(outcomes[0], grpc.aio.UsageError)  # "Channel is closed."
    assert len(gated.calls) == 2


async def test_a_reply_that_is_not_batch_major_is_an_internal_error_not_a_wrong_answer(gated):
    coalescer = RequestCoalescer(gated.send)
    outcomes = await one_alone_then_the_rest_together(coalescer, gated, 3, model=FLATTENING)
    np.testing.assert_array_equal(rows_of(outcomes[0]), np.full((1, 3), 2.0))  # alone: as is
    assert list(gated.calls[1].inputs[0].shape) == [2, 3]
    assert [type(outcome) for outcome in outcomes[1:]] == [errors.Internal, errors.Internal]


async def test_sharing_off_sends_everything_alone(gated):
    gated.gate.set()
    coalescer = RequestCoalescer(gated.send)
    await asyncio.gather(*(coalescer.infer(request(np.ones((1, 3)), f"r{i}"), rows=1, max_rows=8,
                                           max_in_flight=0) for i in range(5)))
    assert [call.id for call in gated.calls] == [f"r{i}" for i in range(5)]


async def test_a_shared_call_is_traced_as_a_child_of_the_first_request_linked_to_all(gated):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    metadata_seen = []
    send = gated.send

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
    await until(lambda: len(gated.calls) == 1)
    waiting = [asyncio.create_task(traced(f"r{i}")) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    gated.gate.set()
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


async def test_requests_waiting_on_an_interrupted_call_are_told_to_retry(gated):
    coalescer = RequestCoalescer(gated.send)
    busy = await model_made_busy(coalescer, gated)
    waiting = [sent(coalescer, np.ones((1, 3)), f"w{i}") for i in range(2)]
    await asyncio.sleep(0.01)
    busy.cancel()  # the alone call ends; the two waiting now share one call
    await until(lambda: len(gated.calls) == 2)
    for task in list(coalescer._tasks):
        task.cancel()  # as at shutdown
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(outcome, errors.Unavailable) for outcome in outcomes), outcomes
