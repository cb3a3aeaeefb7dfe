"""One SDK call over a service's replicas: where each attempt goes, and whether another follows.

Every call the SDK may repeat (unary reads, `Predict`, `wait`'s and `watch_events`' Watch
streams, `Generate`) runs through a `Failover`, which owns the rules they share:

- Replicas: a call takes one order of the replicas when it starts (`maas_sdk.replicas`), and
  attempt n goes to the n-th replica of that order, wrapping around. An order of one stub (a
  single target, or discovery's balanced channel) is asked for again before every attempt.
- What is repeated: a failed attempt — a `grpc.RpcError`, or the `Unavailable` raised when
  discovery knows no healthy replica — is followed by another after the policy's backoff
  when `RetryPolicy.retry_after` says so (UNAVAILABLE, or a CANCELLED the caller did not ask
  for, of an idempotent method; at most `max_attempts` failures in a row), and never when the
  wait would pass the call's deadline. Otherwise the error is raised, converted by `to_error`.
- Streams: a message handed to the caller is reported (`deliver()`; `stream_blocking` reports
  each it yields). The failures are counted afresh after one (a resumed stream is not charged
  for attempts that moved it forward), and a stream that cannot be replayed (`Generate`) is no
  longer repeated once one reached the caller.

What a repeated attempt asks for — the byte, event or sequence it resumes after — stays with
the call site, in the attempt it passes. Three flavours share the rules: `call` on the event
loop, `call_blocking` and `stream_blocking` on the caller's thread (blocking channels, or a
stream read through the client's event loop one message at a time). A download keeps its own
loop in `maas_runtime.registry_client` (the services download without the SDK); the SDK gives
it the same replicas and `RetryPolicy.retry_after`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from typing import Generic, TypeVar

import grpc
from maas_runtime.errors import MaasError, Unavailable

from maas_sdk.retries import RetryPolicy

__all__ = ["Failover"]

_Stub = TypeVar("_Stub")
_T = TypeVar("_T")
_FAILED_ATTEMPT = (grpc.RpcError, Unavailable)
"""What ends one attempt and may lead to the next: a failed RPC, or no healthy replica."""


class Failover(Generic[_Stub]):
    """The attempts of one call of `method` (its short RPC name), each on the next replica.

    `to_error` turns a failed RPC into the suite's error; `deadline` (`time.monotonic()`) is
    never waited past; `on_retry(error, attempt)` is told before the wait that follows failed
    attempt number `attempt` (1-based, counting every attempt of the call)."""

    def __init__(self, method: str, policy: RetryPolicy, *,
                 to_error: Callable[[grpc.RpcError], MaasError], deadline: float | None = None,
                 on_retry: Callable[[MaasError, int], None] | None = None) -> None:
        self.method = method
        self._policy = policy
        self._to_error = to_error
        self._deadline = deadline
        self._on_retry = on_retry
        self._stubs: Sequence[_Stub] = ()
        self.attempts = 0
        """Attempts started."""
        self.delivered = 0
        """Messages of the call that reached the caller."""
        self._failures = 0
        """Failed attempts since the call started, or since it last delivered a message."""

    def deliver(self) -> None:
        """Count one message of the call handed to the caller."""
        self.delivered += 1
        self._failures = 0

    # The three flavours: each is the same loop, written for where it runs ---------------------

    async def call(self, replicas: Callable[[], Awaitable[Sequence[_Stub]]],
                   attempt: Callable[[_Stub], Awaitable[_T]]) -> _T:
        """`attempt` on one replica after another until it returns (on the event loop); a
        streaming attempt calls `deliver()` for each message it hands over."""
        while True:
            try:
                return await attempt(self._next_stub(
                    await replicas() if self._wants_replicas() else None))
            except _FAILED_ATTEMPT as failure:
                wait = self._wait_or_raise(failure)
            await asyncio.sleep(wait)

    def call_blocking(self, replicas: Callable[[], Sequence[_Stub]],
                      attempt: Callable[[_Stub], _T]) -> _T:
        """`attempt` on one replica after another until it returns (on the caller's thread)."""
        while True:
            try:
                return attempt(self._next_stub(replicas() if self._wants_replicas() else None))
            except _FAILED_ATTEMPT as failure:
                wait = self._wait_or_raise(failure)
            time.sleep(wait)

    def stream_blocking(self, replicas: Callable[[], Sequence[_Stub]],
                        attempt: Callable[[_Stub], Generator[_T, None, None]]) -> Iterator[_T]:
        """The messages of `attempt`'s stream, then of the next replica's after a failure,
        until one ends (on the caller's thread); each message yielded counts as delivered.
        Closing this iterator closes the attempt's."""
        while True:
            try:
                messages = attempt(self._next_stub(
                    replicas() if self._wants_replicas() else None))
                try:
                    for message in messages:
                        self.deliver()
                        yield message
                    return
                finally:
                    messages.close()
            except _FAILED_ATTEMPT as failure:
                wait = self._wait_or_raise(failure)
            time.sleep(wait)

    # The rules -------------------------------------------------------------------------------

    def _wants_replicas(self) -> bool:
        """Whether the next attempt asks for the replicas again: the first one, and every one
        while there is a single stub (replicas may have appeared since)."""
        return self.attempts == 0 or len(self._stubs) < 2

    def _next_stub(self, replicas: Sequence[_Stub] | None) -> _Stub:
        """The stub of the next attempt; `replicas`: the order just asked for (never empty),
        None to keep the call's."""
        if replicas is not None:
            self._stubs = replicas
        stub = self._stubs[self.attempts % len(self._stubs)]
        self.attempts += 1
        return stub

    def _wait_or_raise(self, failure: grpc.RpcError | Unavailable) -> float:
        """Seconds to wait before the next attempt after `failure`; raises its error when
        there is none."""
        error = self._to_error(failure) if isinstance(failure, grpc.RpcError) else failure
        self._failures += 1
        wait = self._policy.retry_after(self.method, error, self._failures,
                                        output_delivered=self.delivered > 0)
        if wait is not None and (self._deadline is None
                                 or time.monotonic() + wait < self._deadline):
            if self._on_retry is not None:
                self._on_retry(error, self.attempts)
            return wait
        raise error from None
