"""Text generation in the SDK: `Client.generate` streams a generative deployment's text.

A `Generation` is iterated once, yielding the text as the model produces it; when the stream
ends, `finish_reason` ("stop", "length" or "cancelled") and `usage` (tokens read and written,
time to first token) are set. The gRPC call runs on the client's event loop thread and its
messages are handed over through a queue; `cancel()`, leaving a `with` block early, or
closing the generation ends the call at once, which ends the generation on the server (the
tokens produced so far are charged).

A generation whose stream fails UNAVAILABLE (its gateway died), or CANCELLED without the
caller asking, before any of its text reached the caller is started again on the next replica
as the client's retry policy says, within the same deadline; the caller sees one generation.
Once text was handed over it cannot be: another replica would generate from the start (and
with sampling, other text), and the text already produced cannot be replayed there. The
caller then gets `Unavailable` saying so, after the text it already has.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from maas.inference.v1 import inference_service_pb2 as inf
from maas_runtime.errors import Cancelled, MaasError, Unavailable

from maas_sdk.failover import Failover

_log = logging.getLogger(__name__)
FINISH_REASONS = {inf.FINISH_REASON_STOP: "stop", inf.FINISH_REASON_LENGTH: "length",
                  inf.FINISH_REASON_CANCELLED: "cancelled"}
_END = object()


@dataclass(frozen=True)
class GenerationUsage:
    """What one generation used."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    time_to_first_token: float | None
    """Seconds from the request's arrival at the gateway to the first token."""


def generate_request(deployment: str, prompt: str | None,
                     messages: Sequence[Mapping[str, str]] | None, *,
                     max_tokens: int | None, temperature: float | None, top_p: float | None,
                     top_k: int, stop: str | Sequence[str], seed: int | None,
                     repetition_penalty: float | None) -> inf.GenerateRequest:
    """The GenerateRequest of `Client.generate`'s arguments (exactly one of prompt/messages)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt= or messages=")
    request = inf.GenerateRequest(deployment=deployment, top_k=top_k,
                                  stop=[stop] if isinstance(stop, str) else list(stop))
    if prompt is not None:
        request.prompt = prompt
    else:
        request.conversation.messages.extend(
            inf.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ())
        if not request.conversation.messages:
            request.conversation.SetInParent()  # sent empty: the service names the field
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("seed", seed),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None:
            setattr(request, name, value)
    return request


class Generation:
    """The text chunks of one generation as they stream (iterate once), then its
    `finish_reason` and `usage`."""

    def __init__(self, start: Callable[[queue.Queue], Future]) -> None:
        self._messages: queue.Queue = queue.Queue()
        self._future = start(self._messages)
        self.finish_reason: str | None = None
        """"stop", "length" or "cancelled" once the stream ended; None before."""
        self.usage: GenerationUsage | None = None
        self._chunks: list[str] = []
        self._ended = False

    def __iter__(self) -> Iterator[str]:
        while not self._ended:
            message: Any = self._messages.get()
            if message is _END:
                self._ended = True
                return
            if isinstance(message, BaseException):
                raise message
            if message.WhichOneof("event") == "delta":
                self._chunks.append(message.delta.text)
                yield message.delta.text
            else:
                final = message.final
                self.finish_reason = FINISH_REASONS.get(final.finish_reason, "")
                usage = final.usage
                self.usage = GenerationUsage(
                    usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                    usage.time_to_first_token.ToNanoseconds() / 1e9
                    if usage.HasField("time_to_first_token") else None)

    def text(self) -> str:
        """All the text (waiting for the end of the stream)."""
        for _ in self:
            pass
        return "".join(self._chunks)

    def cancel(self) -> None:
        """End the generation now (the server stops generating)."""
        self._future.cancel()

    close = cancel

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


async def pump_generation(failover: Failover[Any],
                          replicas: Callable[[], Awaitable[Sequence[Any]]],
                          open_call: Callable[[Any], Any], messages: queue.Queue) -> None:
    """Read the Generate stream on the event loop thread into `messages`, opened with
    `open_call(stub)` on the `replicas` in turn as `failover` says (each message put is
    delivered: after one, a failure is the caller's); a cancelled pump cancels the call."""
    call: Any = None

    async def relay(stub: Any) -> None:
        nonlocal call
        call = open_call(stub)
        async for message in call:
            messages.put(message)
            failover.deliver()

    try:
        await failover.call(replicas, relay)
    except MaasError as error:
        messages.put(_cut_short(error, failover.delivered) if failover.delivered else error)
    except asyncio.CancelledError:
        if call is not None:
            call.cancel()
        raise
    except Exception as error:  # noqa: BLE001 - handed to the reading thread
        messages.put(error)
    finally:
        messages.put(_END)


def log_generation_restart(error: MaasError, attempt: int) -> None:
    """Say that a generation is started again (`Failover`'s `on_retry`)."""
    _log.warning("generation attempt %d failed before any text reached the caller "
                 "(%s); starting it again on the next replica", attempt, error.message)


def _cut_short(error: MaasError, delivered: int) -> MaasError:
    """The error of a generation that failed after `delivered` messages reached the caller:
    an unreachable gateway (or a call it cancelled) becomes UNAVAILABLE saying why it was not
    retried; any other error stays as it is."""
    if not isinstance(error, Unavailable | Cancelled):
        return error
    return Unavailable(
        f"the generation was cut short after {delivered} streamed message(s) had reached you "
        f"({error.message}); it was not started again on another replica because the text "
        "already produced cannot be replayed there: start a new generation",
        reason="GENERATION_INTERRUPTED")
