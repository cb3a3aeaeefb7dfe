"""Tenant limits (domain, fake clocks): each limit kind refuses with RESOURCE_EXHAUSTED, the
limit named in a QuotaFailure and a RetryInfo delay until the window frees; one tenant over
its limits leaves another untouched; the limits file changes apply without a restart; a bad
file keeps the last good limits; every admitted call becomes a usage record."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from maas_inference.tenancy import (
    LimitKind,
    QuotaExceeded,
    TenancyConfigSource,
    TenantLimiter,
    parse_tenancy_config,
)
from maas_inference.usage import GENERATION, PREDICT, UsageRecord
from maas_runtime.auth import Principal, Role
from maas_runtime.grpc_errors import to_rpc_status

ALICE = Principal("alice", Role.VIEWER)
BOB = Principal("bob", Role.VIEWER)
DAY = 86400.0


class Clock:
    """Wall and monotonic time under the test's control."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class RecordingLedger:
    """What a ledger was given (the limiter's contract with it)."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.durable: list[UsageRecord] = []

    def append(self, record: UsageRecord) -> None:
        self.records.append(record)

    async def append_durable(self, record: UsageRecord) -> None:
        self.durable.append(record)
        self.records.append(record)


def write_limits(path: Path, text: str, bump: int = 0) -> None:
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + bump * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def limiter_for(tmp_path: Path, text: str, clock: Clock,
                ledger: RecordingLedger | None = None) -> tuple[TenantLimiter, Path]:
    path = tmp_path / "limits.yaml"
    write_limits(path, text)
    source = TenancyConfigSource(path, recheck_seconds=0, monotonic=clock)
    return TenantLimiter(source, ledger, clock=clock, monotonic=clock), path  # type: ignore[arg-type]


def details(error: QuotaExceeded) -> tuple[int, error_details_pb2.QuotaFailure,
                                            error_details_pb2.RetryInfo]:
    status = to_rpc_status(error)
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Is(quota.DESCRIPTOR):
            detail.Unpack(quota)
        if detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
    return status.code, quota, retry


def assert_refusal(error: QuotaExceeded, kind: LimitKind, value: int, retry_seconds: float,
                   tenant: str = "alice") -> None:
    code, quota, retry = details(error)
    assert code == code_pb2.RESOURCE_EXHAUSTED
    assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] == code
    assert [(v.subject, v.description) for v in quota.violations] == [
        (f"tenant:{tenant}", f"{kind.value}: {value}")]
    assert retry.retry_delay.ToNanoseconds() / 1e9 == pytest.approx(retry_seconds, abs=1.0)
    assert error.reason == "TENANT_QUOTA_EXCEEDED"


async def test_requests_per_minute_refused_until_the_window_frees(tmp_path):
    clock = Clock(1_800_000_000.0)
    limiter, _ = limiter_for(tmp_path, "default: {requests_per_minute: 3}", clock)
    for _ in range(3):
        async with limiter.admit_request(ALICE, "digits", rows=2):
            pass
        clock.now += 10
    with pytest.raises(QuotaExceeded) as refused:
        async with limiter.admit_request(ALICE, "digits", rows=2):
            pass
    # The first request (at t0) leaves the window at t0 + 60; it is t0 + 30 now.
    assert_refusal(refused.value, LimitKind.REQUESTS_PER_MINUTE, 3, 30.0)
    clock.now += 31
    async with limiter.admit_request(ALICE, "digits", rows=2):
        pass


async def test_tokens_per_minute_on_prompt_and_streamed_tokens(tmp_path):
    clock = Clock()
    limiter, _ = limiter_for(tmp_path, "default: {tokens_per_minute: 100}", clock)
    async with limiter.admit(ALICE, "chat", prompt_tokens=40) as lease:
        assert lease.charge(30)
        assert not lease.charge(40)  # 110 > 100: the stream must stop
        assert lease.exceeded is not None
        assert_refusal(lease.exceeded, LimitKind.TOKENS_PER_MINUTE, 100, 60.0)
    assert lease.completion_tokens == 70  # charged for what was produced
    with pytest.raises(QuotaExceeded) as refused:
        async with limiter.admit(ALICE, "chat", prompt_tokens=5):
            pass
    assert_refusal(refused.value, LimitKind.TOKENS_PER_MINUTE, 100, 60.0)
    clock.now += 61
    async with limiter.admit(ALICE, "chat", prompt_tokens=5) as lease:
        assert lease.charge(1)


async def test_concurrent_streams_freed_when_a_stream_ends(tmp_path):
    clock = Clock()
    limiter, _ = limiter_for(tmp_path, "default: {concurrent_streams: 2}", clock)
    first = limiter.admit(ALICE, "chat", prompt_tokens=1)
    second = limiter.admit(ALICE, "chat", prompt_tokens=1)
    await first.__aenter__()
    await second.__aenter__()
    with pytest.raises(QuotaExceeded) as refused:
        async with limiter.admit(ALICE, "chat", prompt_tokens=1):
            pass
    assert_refusal(refused.value, LimitKind.CONCURRENT_STREAMS, 2, 1.0)
    # Predict does not hold a stream: it is not refused by the stream limit.
    async with limiter.admit_request(ALICE, "digits", rows=1):
        pass
    await first.__aexit__(None, None, None)
    async with limiter.admit(ALICE, "chat", prompt_tokens=1):
        pass
    await second.__aexit__(asyncio.CancelledError, asyncio.CancelledError(), None)


async def test_a_cancelled_stream_frees_its_slot_and_is_recorded_cancelled(tmp_path):
    clock, ledger = Clock(), RecordingLedger()
    limiter, _ = limiter_for(tmp_path, "default: {concurrent_streams: 1}", clock, ledger)

    async def stream() -> None:
        async with limiter.admit(ALICE, "chat", prompt_tokens=3) as lease:
            lease.charge(2)
            await asyncio.sleep(3600)

    task = asyncio.create_task(stream())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with limiter.admit(ALICE, "chat", prompt_tokens=1):
        pass
    cancelled = ledger.records[0]
    assert (cancelled.outcome, cancelled.prompt_tokens, cancelled.completion_tokens) == (
        "CANCELLED", 3, 2)
    assert ledger.durable == [ledger.records[1]]  # the finished one was committed durably


async def test_daily_quotas_refused_until_utc_midnight(tmp_path):
    midnight = 86400.0 * 20834  # 00:00 UTC
    clock = Clock(midnight + DAY - 3600)  # 23:00 UTC
    limiter, _ = limiter_for(
        tmp_path, "default: {requests_per_day: 2, tokens_per_day: 50}", clock)
    async with limiter.admit_request(ALICE, "digits", rows=1):
        pass
    async with limiter.admit(ALICE, "chat", prompt_tokens=10) as lease:
        assert not lease.charge(45)
        assert lease.exceeded is not None
        assert_refusal(lease.exceeded, LimitKind.TOKENS_PER_DAY, 50, 3600)
    with pytest.raises(QuotaExceeded) as refused:
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass
    assert_refusal(refused.value, LimitKind.REQUESTS_PER_DAY, 2, 3600)
    clock.now = midnight + DAY + 1  # the next UTC day
    async with limiter.admit(ALICE, "chat", prompt_tokens=10):
        pass


async def test_daily_quota_seeded_from_earlier_usage(tmp_path):
    clock = Clock()
    limiter, _ = limiter_for(tmp_path, "default: {requests_per_day: 5}", clock)
    limiter.seed_today({"alice": (5, 100)})
    with pytest.raises(QuotaExceeded):
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass
    async with limiter.admit_request(BOB, "digits", rows=1):
        pass


async def test_one_tenant_over_its_limit_leaves_another_unaffected(tmp_path):
    clock = Clock()
    limiter, _ = limiter_for(tmp_path, """
default: {requests_per_minute: 2, concurrent_streams: 1, tokens_per_minute: 20}
tenants:
  bob: {requests_per_minute: 100}
""", clock)
    for _ in range(2):
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass
    with pytest.raises(QuotaExceeded):
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass
    alice_stream = limiter.admit(ALICE, "chat", prompt_tokens=1)
    with pytest.raises(QuotaExceeded):  # alice is over requests/minute
        await alice_stream.__aenter__()
    for _ in range(50):
        async with limiter.admit_request(BOB, "digits", rows=1):
            pass
    async with limiter.admit(BOB, "chat", prompt_tokens=5) as lease:
        assert lease.charge(10)  # bob's own 20 tokens/minute, untouched by alice


async def test_override_inherits_the_default_field_by_field_and_null_lifts_a_limit():
    config = parse_tenancy_config("""
default: {requests_per_minute: 10, tokens_per_minute: 1000}
tenants:
  acme: {tokens_per_minute: 5}
  batch: {requests_per_minute: null}
""")
    assert config.limits_for("acme").requests_per_minute == 10
    assert config.limits_for("acme").tokens_per_minute == 5
    assert config.limits_for("batch").requests_per_minute is None
    assert config.limits_for("someone").tokens_per_minute == 1000
    assert config.request_limited() == (True, frozenset({"acme"}))
    assert parse_tenancy_config('{"default": {"concurrent_streams": 3}}').default \
        .concurrent_streams == 3  # JSON works too


async def test_limits_file_change_applies_without_restart(tmp_path):
    clock = Clock()
    limiter, path = limiter_for(tmp_path, "default: {requests_per_minute: 1}", clock)
    async with limiter.admit_request(ALICE, "digits", rows=1):
        pass
    with pytest.raises(QuotaExceeded):
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass
    write_limits(path, "default: {requests_per_minute: 1}\ntenants: {alice: {requests_per_minute: 5}}",
                 bump=1)
    async with limiter.admit_request(ALICE, "digits", rows=1):
        pass


@pytest.mark.parametrize("bad", [
    "default: [1, 2",                                   # not YAML
    "default: {requests_per_minute: 0}",                # a limit below 1
    "default: {requests_per_hour: 5}",                  # an unknown limit
    "tenants: {alice: {tokens_per_minute: many}}",      # not a number
    "- just a list",                                    # not a mapping
])
async def test_a_bad_limits_file_keeps_the_last_good_limits_and_says_why(tmp_path, caplog, bad):
    clock = Clock()
    limiter, path = limiter_for(tmp_path, "default: {requests_per_minute: 1}", clock)
    assert limiter.config.default.requests_per_minute == 1  # loaded before it goes bad
    write_limits(path, bad, bump=1)
    with caplog.at_level(logging.ERROR, logger="maas_inference.tenancy"):
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass
        with pytest.raises(QuotaExceeded):  # still the last good limit of 1 a minute
            async with limiter.admit_request(ALICE, "digits", rows=1):
                pass
    assert "keeping the last good limits" in caplog.text
    assert str(path) in caplog.text


async def test_a_vanished_limits_file_keeps_the_last_good_limits(tmp_path):
    clock = Clock()
    limiter, path = limiter_for(tmp_path, "default: {requests_per_minute: 1}", clock)
    limiter.config  # noqa: B018 - loads it
    path.unlink()
    async with limiter.admit_request(ALICE, "digits", rows=1):
        pass
    with pytest.raises(QuotaExceeded):
        async with limiter.admit_request(ALICE, "digits", rows=1):
            pass


async def test_every_call_is_recorded_with_its_outcome(tmp_path):
    clock, ledger = Clock(), RecordingLedger()
    limiter, _ = limiter_for(tmp_path, "{}", clock, ledger)
    async with limiter.admit_request(ALICE, "digits", rows=7) as call:
        call.version = "models/digits/versions/3"
        clock.now += 0.25
    from maas_runtime.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        async with limiter.admit(BOB, "chat", prompt_tokens=4):
            raise InvalidArgument.for_field("max_tokens", "must be positive")
    ok, failed = ledger.records
    assert (ok.tenant, ok.principal, ok.deployment, ok.version, ok.kind, ok.rows, ok.requests,
            ok.outcome) == ("alice", "alice", "digits", "models/digits/versions/3", PREDICT,
                            7, 1, "OK")
    assert ok.duration_seconds == pytest.approx(0.25)
    assert (failed.kind, failed.prompt_tokens, failed.outcome) == (
        GENERATION, 4, "INVALID_ARGUMENT")
    assert ledger.durable == []  # only finished generations wait for the database


async def test_principals_of_one_tenant_share_its_limits(tmp_path):
    clock, ledger = Clock(), RecordingLedger()
    limiter, _ = limiter_for(tmp_path, "tenants: {acme: {requests_per_minute: 2}}", clock,
                             ledger)
    carol = Principal("carol", Role.VIEWER, tenant="acme")
    dave = Principal("dave", Role.VIEWER, tenant="acme")
    async with limiter.admit_request(carol, "digits", rows=1):
        pass
    async with limiter.admit_request(dave, "digits", rows=1):
        pass
    with pytest.raises(QuotaExceeded) as refused:
        async with limiter.admit_request(carol, "digits", rows=1):
            pass
    assert_refusal(refused.value, LimitKind.REQUESTS_PER_MINUTE, 2, 60, tenant="acme")
    async with limiter.admit_request(Principal("acme", Role.VIEWER, tenant="other-co"),
                                     "digits", rows=1):
        pass  # a principal named like the tenant, of another tenant: not acme's
    assert [(r.tenant, r.principal) for r in ledger.records] == [
        ("acme", "carol"), ("acme", "dave"), ("other-co", "acme")]
