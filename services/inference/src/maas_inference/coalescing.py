"""Request coalescing: concurrent requests for one Triton model share a call when Triton is busy.

Triton batches the requests that reach it together (dynamic batching). Behind a gateway they
reach it one at a time, each paying a gRPC hop and a Python-backend execution of its own, so
the gateway path costs Triton several times the CPU per request of direct traffic. The
coalescer keeps at most `max_in_flight` calls per model open to Triton (the service allows
one per model instance: Triton executes no more batches of a model at once):

- a request that finds a free slot goes out at once, alone: no added latency at light load;
- requests that arrive while every slot is busy wait, and leave together in the next call,
  concatenated along the batch dimension up to the model's max_batch_size;
- each caller gets exactly its own rows back, under its own request id.

Tensor bytes are concatenated and sliced, never decoded. Only alike requests share a call:
the same inputs (names, datatypes, per-row shapes) in the same order, the same requested
outputs, raw contents, and no request or tensor parameters; the caller says a request may
share at all (`rows` set: batched signature, fixed-size datatypes). Everything else goes alone.
Each waiting caller keeps its own deadline; a call that fails fails every request in it.

Traces stay whole: a shared call runs in a span of its own, a child of the first request's
span and linked to every request's span, and each request's span records an event naming the
shared call; Triton continues the shared span's trace.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from maas_runtime import errors
from maas_runtime.telemetry import trace_metadata
from opentelemetry import trace
from tritonclient.grpc import service_pb2

Send = Callable[..., Awaitable[service_pb2.ModelInferResponse]]
"""`send(request, timeout=..., metadata=...)`: one ModelInfer call to Triton."""


@dataclass
class _Waiting:
    request: service_pb2.ModelInferRequest
    rows: int
    deadline: float | None
    metadata: Sequence[tuple[str, str]] | None
    future: asyncio.Future
    span: trace.Span
    """The caller's current span (its trace joins the shared call's)."""


@dataclass
class _Lane:
    """Alike requests for one model: calls open to Triton and requests waiting for a slot."""

    max_rows: int
    max_in_flight: int
    in_flight: int = 0
    waiting: deque[_Waiting] = field(default_factory=deque)


def sharing_key(request: service_pb2.ModelInferRequest) -> tuple | None:
    """What requests must have in common to share a call; None when this one must go alone."""
    if request.parameters or not request.inputs or \
            len(request.raw_input_contents) != len(request.inputs):
        return None
    inputs = []
    for tensor in request.inputs:
        if tensor.parameters or not tensor.shape:
            return None
        inputs.append((tensor.name, tensor.datatype, tuple(tensor.shape[1:])))
    if any(output.parameters for output in request.outputs):
        return None
    return (request.model_name, request.model_version, tuple(inputs),
            tuple(output.name for output in request.outputs))


def merge_requests(requests: Sequence[service_pb2.ModelInferRequest],
                   rows: Sequence[int]) -> service_pb2.ModelInferRequest:
    """One request holding every row of `requests` (alike by `sharing_key`), in order."""
    first = requests[0]
    merged = service_pb2.ModelInferRequest(model_name=first.model_name,
                                           model_version=first.model_version)
    for index, tensor in enumerate(first.inputs):
        merged_tensor = merged.inputs.add(name=tensor.name, datatype=tensor.datatype)
        merged_tensor.shape.extend([sum(rows), *tensor.shape[1:]])
        merged.raw_input_contents.append(
            b"".join(request.raw_input_contents[index] for request in requests))
    merged.outputs.extend(first.outputs)
    return merged


def split_response(response: service_pb2.ModelInferResponse, rows: Sequence[int],
                   request_ids: Sequence[str]) -> list[service_pb2.ModelInferResponse]:
    """Each request's rows of a merged call's response, as if it had been sent alone."""
    total = sum(rows)
    for output in response.outputs:
        if not output.shape or output.shape[0] != total:
            raise errors.Internal(f"Triton answered {total} coalesced rows with output "
                                  f"{output.name!r} of shape {list(output.shape)}")
    if len(response.raw_output_contents) != len(response.outputs) or any(
            len(raw) % total for raw in response.raw_output_contents):
        raise errors.Internal("Triton's reply to coalesced requests cannot be split by rows")
    replies, start = [], 0
    for count, request_id in zip(rows, request_ids, strict=True):
        reply = service_pb2.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version, id=request_id)
        reply.parameters.MergeFrom(response.parameters)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
            row_bytes = len(raw) // total
            part = reply.outputs.add(name=output.name, datatype=output.datatype)
            part.shape.extend([count, *output.shape[1:]])
            part.parameters.MergeFrom(output.parameters)
            reply.raw_output_contents.append(raw[start * row_bytes:(start + count) * row_bytes])
        replies.append(reply)
        start += count
    return replies


class RequestCoalescer:
    """Sends ModelInfer requests to Triton, sharing calls between concurrent alike requests."""

    def __init__(self, send: Send, tracer: trace.Tracer | None = None):
        self._send = send
        self._tracer = tracer or trace.get_tracer(__name__)
        self._lanes: dict[tuple, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()

    async def infer(self, request: service_pb2.ModelInferRequest, *, rows: int | None,
                    max_rows: int, max_in_flight: int, timeout: float | None = None,
                    metadata: Sequence[tuple[str, str]] | None = None
                    ) -> service_pb2.ModelInferResponse:
        """Triton's response to `request`. `rows` (its batch size) may be given only when the
        request may share a call; `max_rows` is the model's max_batch_size; `max_in_flight`
        the calls to keep open for the model before requests wait and share (0: never)."""
        key = sharing_key(request) if rows and max_in_flight > 0 else None
        if key is None or not rows:
            return await self._send(request, timeout=timeout, metadata=metadata)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(max_rows, max_in_flight)
        if lane.in_flight < lane.max_in_flight and not lane.waiting:
            lane.in_flight += 1
            try:
                return await self._send(request, timeout=timeout, metadata=metadata)
            finally:
                lane.in_flight -= 1
                self._dispatch(key, lane)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, rows, None if timeout is None else loop.time() + timeout,
                           metadata, loop.create_future(), trace.get_current_span())
        lane.waiting.append(waiting)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiting.future)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                "the deadline passed while the request waited for Triton") from None
        finally:
            waiting.future.cancel()  # no-op once answered; otherwise it leaves the queue

    def _dispatch(self, key: tuple, lane: _Lane) -> None:
        """Start calls for waiting requests while slots are free; forget an idle lane."""
        while lane.in_flight < lane.max_in_flight and lane.waiting:
            batch: list[_Waiting] = []
            rows = 0
            while lane.waiting and (not batch or rows + lane.waiting[0].rows <= lane.max_rows):
                waiting = lane.waiting.popleft()
                if not waiting.future.done():  # its caller gave up meanwhile
                    batch.append(waiting)
                    rows += waiting.rows
            if not batch:
                break
            lane.in_flight += 1
            task = asyncio.create_task(self._call(key, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not lane.in_flight and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]

    async def _call(self, key: tuple, lane: _Lane, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        deadlines = [waiting.deadline for waiting in batch if waiting.deadline is not None]
        timeout = (max(0.001, max(deadlines) - loop.time()) if len(deadlines) == len(batch)
                   else None)
        try:
            if len(batch) == 1:
                replies = [await self._send(batch[0].request, timeout=timeout,
                                            metadata=batch[0].metadata)]
            else:
                replies = await self._shared_call(batch, timeout)
            for waiting, reply in zip(batch, replies, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(reply)
        except BaseException as error:  # every request of the call gets the call's error
            failure = error if isinstance(error, Exception) else errors.Unavailable(
                "the call to Triton was interrupted (the service is stopping); retry")
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(failure)
            if failure is not error:
                raise
        finally:
            lane.in_flight -= 1
            self._dispatch(key, lane)

    async def _shared_call(self, batch: list[_Waiting], timeout: float | None
                           ) -> list[service_pb2.ModelInferResponse]:
        rows = [waiting.rows for waiting in batch]
        links = [trace.Link(w.span.get_span_context()) for w in batch
                 if w.span.get_span_context().is_valid]
        with self._tracer.start_as_current_span(
                "triton.ModelInfer shared", context=trace.set_span_in_context(batch[0].span),
                links=links, attributes={"maas.shared.requests": len(batch),
                                         "maas.shared.rows": sum(rows)}) as span:
            shared = span.get_span_context()
            for waiting in batch:
                waiting.span.add_event("shared Triton call", {
                    "maas.shared.trace_id": trace.format_trace_id(shared.trace_id),
                    "maas.shared.span_id": trace.format_span_id(shared.span_id)})
            merged = await self._send(merge_requests([w.request for w in batch], rows),
                                      timeout=timeout, metadata=trace_metadata())
        return split_response(merged, rows, [w.request.id for w in batch])

    async def close(self) -> None:
        """Wait for the calls in flight (their callers get their answers)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
