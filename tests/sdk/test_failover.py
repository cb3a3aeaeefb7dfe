"""The rules every repeatable SDK call shares (`maas_sdk.failover.Failover`), checked on their
own: which replica each attempt goes to, which failures are repeated and how often, that a
message handed to the caller counts (failures counted afresh; a generation no longer
repeated), the deadline, and that a stream the caller leaves early is closed.

The replicas are plain names and the attempts plain functions failing as told: the same
helper runs the real calls in tests/sdk/test_gateway_failover.py and
tests/sdk/test_registry_replica_loss.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import maas
import pytest
from maas_sdk.failover import Failover
from maas_sdk.retries import RetryPolicy

NO_WAIT = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.0, max_backoff_seconds=0.0)


class Refused(grpc.RpcError):
    """A failed RPC carrying the suite error `to_error` turns it into."""

    def __init__(self, error: maas.MaasError) -> None:
        super().__init__(error.message)
        self.error = error


def failover(method: str, policy: RetryPolicy = NO_WAIT, **options) -> Failover[str]:
    return Failover(method, policy, to_error=lambda rpc_error: rpc_error.error, **options)


class Replicas:
    """The replica orders a call asks for, each the next turn of `names` (as
    `maas_sdk.replicas` gives them), counted."""

    def __init__(self, *names: str) -> None:
        self.names = list(names)
        self.asked = 0

    def __call__(self) -> list[str]:
        start = self.asked % len(self.names)
        self.asked += 1
        return self.names[start:] + self.names[:start]


def failing(times: int, error: maas.MaasError, tried: list[str]):
    """An attempt that fails `times` times with `error` (as a failed RPC), then answers with
    the replica it reached; every replica it reached is appended to `tried`."""
    def attempt(replica: str) -> str:
        tried.append(replica)
        if len(tried) <= times:
            raise Refused(error)
        return replica
    return attempt


def test_each_attempt_goes_to_the_next_replica_of_the_order_the_call_took():
    replicas, tried = Replicas("a", "b", "c"), []
    assert failover("GetModel").call_blocking(
        replicas, failing(2, maas.Unavailable("gone"), tried)) == "c"
    assert tried == ["a", "b", "c"] and replicas.asked == 1  # one order for the whole call
    tried.clear()
    assert failover("GetModel").call_blocking(
        replicas, failing(0, maas.Unavailable("gone"), tried)) == "b"  # the next call's turn


def test_a_single_replica_is_asked_for_again_before_every_attempt():
    replicas, tried = Replicas("only"), []
    assert failover("GetModel").call_blocking(
        replicas, failing(2, maas.Unavailable("gone"), tried)) == "only"
    assert replicas.asked == 3  # replicas that appeared meanwhile would be used


def test_only_unavailable_or_cancelled_reads_are_repeated_and_at_most_max_attempts_times():
    tried: list[str] = []
    with pytest.raises(maas.Unavailable, match="gone"):
        failover("GetModel").call_blocking(Replicas("a", "b"),
                                           failing(9, maas.Unavailable("gone"), tried))
    assert tried == ["a", "b", "a"]  # NO_WAIT.max_attempts
    for method, error in (("GetModel", maas.InvalidArgument("bad")),
                          ("GetModel", maas.DeadlineExceeded("slow")),
                          ("CreateModel", maas.Unavailable("gone"))):
        tried.clear()
        with pytest.raises(type(error)):
            failover(method).call_blocking(Replicas("a", "b"), failing(9, error, tried))
        assert tried == ["a"], (method, error)
    tried.clear()
    assert failover("GetModel").call_blocking(
        Replicas("a", "b"), failing(1, maas.Cancelled("replica shutting down"), tried)) == "b"


def test_no_healthy_replica_known_is_a_failed_attempt_like_any_other():
    asked = 0

    async def replicas() -> list[str]:
        nonlocal asked
        asked += 1
        if asked == 1:
            raise maas.Unavailable("no healthy replica")  # as discovery says it
        return ["a", "b"]

    async def attempt(replica: str) -> str:
        return replica

    assert asyncio.run(failover("ListModels").call(replicas, attempt)) == "a"
    assert asked == 2


def test_a_delivered_message_counts_failures_afresh_and_ends_a_generations_retries():
    cuts = 0

    def events(replica: str) -> Iterator[str]:
        """Every attempt gives one event, then its stream is cut."""
        nonlocal cuts
        if cuts == 5:
            return
        cuts += 1
        yield f"{replica}{cuts}"
        raise Refused(maas.Unavailable("cut"))

    # Five cuts in a row, more than max_attempts, each after progress: the watch goes on.
    assert list(failover("WatchEvents").stream_blocking(Replicas("a", "b"), events)) == [
        "a1", "b2", "a3", "b4", "a5"]

    cuts = 0
    generation = failover("Generate")
    received = []
    with pytest.raises(maas.Unavailable, match="cut"):
        for chunk in generation.stream_blocking(Replicas("a", "b"), events):
            received.append(chunk)
    assert received == ["a1"] and generation.attempts == 1 and generation.delivered == 1

    cuts = 0
    tried: list[str] = []
    before_any_text = failover("Generate")
    assert before_any_text.call_blocking(
        Replicas("a", "b"), failing(2, maas.Unavailable("gone"), tried)) == "a"
    assert tried == ["a", "b", "a"]  # repeated while nothing reached the caller


def test_no_retry_waits_past_the_deadline_and_each_retry_is_announced():
    slow = RetryPolicy(max_attempts=5, initial_backoff_seconds=0.3, max_backoff_seconds=1.0,
                       backoff_multiplier=3.0)  # waits of 0.15-0.3 s, then 0.45-0.9 s
    tried: list[str] = []
    retries: list[tuple[str, int]] = []
    started = time.monotonic()
    with pytest.raises(maas.Unavailable):
        failover("GetModel", slow, deadline=started + 0.5,
                 on_retry=lambda error, attempt: retries.append((error.message, attempt))
                 ).call_blocking(Replicas("a", "b"), failing(9, maas.Unavailable("gone"), tried))
    assert tried == ["a", "b"]  # the first wait fits in 0.5 s, the second no longer
    assert retries == [("gone", 1)]
    assert time.monotonic() - started < 0.5


def test_a_stream_the_caller_leaves_early_is_closed():
    closed: list[str] = []

    def events(replica: str) -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            closed.append(replica)

    stream = failover("WatchEvents").stream_blocking(Replicas("a"), events)
    assert next(stream) == 0 and closed == []
    stream.close()
    assert closed == ["a"]
