"""Per-tenant limits on the data path: requests and tokens per minute, concurrent streams, and
daily quotas, read from a configuration file that may change while the service runs.

A call's tenant is the tenant its token names in the tokens file, else its principal
(`maas_inference.usage.tenant_of`). Limits come from a YAML or JSON file
(`MAAS_INFERENCE_TENANCY_FILE`):

    default:                       # every tenant; a limit left out (or null) is unlimited
      requests_per_minute: 600
      tokens_per_minute: 100000
      concurrent_streams: 8
      tokens_per_day: 5000000
      requests_per_day: 100000
    tenants:                       # per-tenant overrides, field by field over the default
      acme: {tokens_per_minute: 2000}
      batch-team: {requests_per_minute: null}     # null: unlimited for this tenant

The file is looked at (its mtime) at most once per `recheck_seconds` on use, and by
`TenancyConfigSource.watch`; a change applies to the next admission, without a restart. A
file that cannot be read or parsed keeps the last good configuration, and says why in the log.

Minute windows are sliding over 60 one-second buckets; days are UTC calendar days (seeded at
start from the usage ledger, so a restart does not hand out a fresh daily quota). Each tenant
has its own counters: one tenant over its limits never delays or refuses another.

One replica keeps minute windows and streams in memory. Replicas sharing a PostgreSQL database
pass a `SharedLimits` (`maas_inference.shared_limits`): the minute windows and concurrent
streams are then counted in that database, so a limit holds across all replicas together
(a call that a minute or stream limit concerns costs one statement there; calls no such limit
concerns never touch it). Daily quotas are shared through the usage ledger (`share_today`).
Should the database be unreachable, admission falls back to this replica's own counts (a
warning says so; the database is tried again `SHARED_RETRY_SECONDS` later) rather than
refusing every call. A minute or stream limit added to the file counts what the replicas
admitted under a minute or stream limit before: calls admitted while the tenant had none
were not counted in the database.

Usage from the Generate path (engineer B's generation module):

    async with limiter.admit(principal, deployment_id, prompt_tokens=len(prompt_ids)) as lease:
        lease.version = served.version               # once the route picked it
        async for token_group in stream:
            if not lease.charge(len(token_group)):   # over tokens/minute or tokens/day
                finish_reason = "limit"              # stop the stream; tokens so far are charged
                break
            yield token_group
    yield final_response(finish_reason, lease.prompt_tokens, lease.completion_tokens)
    # Leaving the block frees the stream slot and appends the usage record (outcome OK,
    # RESOURCE_EXHAUSTED when cut by a limit, CANCELLED on asyncio.CancelledError, the
    # MaasError's code, INTERNAL otherwise); a finished generation's record is committed
    # before the block is left, so send the final response after it.

and from Predict (`rows` = the request's batch size; the record is appended on exit):

    async with limiter.admit_request(principal, deployment_id, rows=rows) as call:
        call.version = served.version

Over a limit, entering raises `QuotaExceeded` (RESOURCE_EXHAUSTED with a RetryInfo of when
the window frees and a QuotaFailure naming the limit and its value).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from maas_runtime.auth import Principal
from maas_runtime.errors import MaasError, QuotaViolation, ResourceExhausted
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas_inference.shared_limits import Ask, SharedLimits
from maas_inference.usage import UsageLedger, UsageMetrics, UsageRecord, tenant_of

_log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
SECONDS_PER_DAY = 86400
SHARED_FALLBACK_LOG_SECONDS = 60.0
"""At most one warning this often while the shared database cannot be reached."""
SHARED_RETRY_SECONDS = 5.0
"""After the shared database failed an admission, admissions use this replica's own counts
for this long before trying it again (a database that does not answer would otherwise cost
every call its connect timeout)."""
CONCURRENCY_RETRY_SECONDS = 1.0
"""RetryInfo of a refused stream: a slot frees when one of the tenant's streams ends, which
cannot be foreseen; this is a polite first back-off."""


class LimitKind(enum.StrEnum):
    """One limit of a tenant; its value is the configuration key and the QuotaFailure text."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    CONCURRENT_STREAMS = "concurrent_streams"
    REQUESTS_PER_DAY = "requests_per_day"
    TOKENS_PER_DAY = "tokens_per_day"


class TenantLimits(BaseModel):
    """The limits of one tenant; None is unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    concurrent_streams: int | None = Field(default=None, ge=1)
    requests_per_day: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)

    @property
    def limits_requests(self) -> bool:
        """Whether plain requests (Predict) are limited at all."""
        return self.requests_per_minute is not None or self.requests_per_day is not None


class TenancyConfig(BaseModel):
    """The whole file: a default for every tenant and per-tenant overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: TenantLimits = TenantLimits()
    tenants: dict[str, TenantLimits] = {}

    def limits_for(self, tenant: str) -> TenantLimits:
        override = self.tenants.get(tenant)
        if override is None:
            return self.default
        # Only the fields the override names replace the default's (an explicit null too).
        return self.default.model_copy(update={name: getattr(override, name)
                                               for name in override.model_fields_set})

    def request_limited(self) -> tuple[bool, frozenset[str]]:
        """(every tenant's requests are limited, the tenants whose requests are): what the
        native data plane must leave to this service's admission."""
        limited = frozenset(name for name in self.tenants
                            if self.limits_for(name).limits_requests)
        return self.default.limits_requests, limited


def parse_tenancy_config(text: str) -> TenancyConfig:
    """A configuration from YAML or JSON text (JSON is YAML); ValueError says what is wrong."""
    try:
        document = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML or JSON: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ValueError("the top level must be a mapping with `default` and `tenants`")
    try:
        return TenancyConfig.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(problems) from None


class TenancyConfigSource:
    """The current configuration of a file, re-read when its mtime changes; no file → none."""

    def __init__(self, path: Path | None, recheck_seconds: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._recheck_seconds = recheck_seconds
        self._monotonic = monotonic
        self._config = TenancyConfig()
        self._loaded_mtime: int | None = None
        self._checked_at = -math.inf
        self.version = 0
        """Bumped on every configuration change that was applied."""
        self.last_error = ""
        """Why the newest file was not applied; "" when it was."""

    def current(self) -> TenancyConfig:
        now = self._monotonic()
        if now - self._checked_at >= self._recheck_seconds:
            self._checked_at = now
            self._reload_if_changed()
        return self._config

    def reload(self) -> TenancyConfig:
        """Look at the file now, whatever the recheck delay."""
        self._checked_at = self._monotonic()
        self._reload_if_changed()
        return self._config

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime_ns
        except OSError as exc:
            self._refuse(mtime=None, why=f"cannot be read ({exc.strerror})")
            return
        if mtime == self._loaded_mtime:
            return
        try:
            config = parse_tenancy_config(self._path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._refuse(mtime, str(exc))
            return
        self._config, self._loaded_mtime, self.last_error = config, mtime, ""
        self.version += 1
        _log.info("tenant limits loaded from %s (%d tenant override(s))", self._path,
                  len(config.tenants))

    def _refuse(self, mtime: int | None, why: str) -> None:
        if self.last_error != why:  # once per distinct problem, not on every look
            _log.error("tenant limits file %s %s; keeping the last good limits", self._path,
                       why if mtime is None else f"is invalid: {why}")
        self.last_error = why
        self._loaded_mtime = mtime

    async def watch(self, on_change: Callable[[], Any], poll_seconds: float = 1.0) -> None:
        """Re-read the file every `poll_seconds` and call `on_change` (maybe a coroutine
        function) after each applied change; runs until cancelled."""
        seen = self.version
        while True:
            self.reload()
            if self.version != seen:
                seen = self.version
                result = on_change()
                if asyncio.iscoroutine(result):
                    await result
            await asyncio.sleep(poll_seconds)


class QuotaExceeded(ResourceExhausted):
    """A tenant is over one of its limits; `retry_delay_seconds` says when it frees."""

    def __init__(self, tenant: str, kind: LimitKind, limit: int, retry_delay_seconds: float,
                 detail: str = "") -> None:
        super().__init__(
            f"tenant {tenant!r} is over its {kind.value} limit of {limit}{detail}; retry in "
            f"{retry_delay_seconds:.1f} s",
            reason="TENANT_QUOTA_EXCEEDED",
            metadata={"tenant": tenant, "limit": kind.value, "limit_value": str(limit)},
            quota_violations=[QuotaViolation(f"tenant:{tenant}", f"{kind.value}: {limit}")],
            retry_delay_seconds=retry_delay_seconds)
        self.tenant = tenant
        self.kind = kind


class _MinuteWindow:
    """Amounts over the last 60 seconds, in one-second buckets (at most 60 kept)."""

    def __init__(self, buckets: Iterable[tuple[int, int]] = ()) -> None:
        self._buckets: deque[list[int]] = deque(
            [second, amount] for second, amount in buckets if amount)  # oldest first
        self.total = sum(amount for _, amount in self._buckets)

    def _expire(self, now: float) -> None:
        horizon = int(now) - WINDOW_SECONDS
        while self._buckets and self._buckets[0][0] <= horizon:
            self.total -= self._buckets.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self.total

    def add(self, now: float, amount: int) -> None:
        if amount <= 0:
            return
        self._expire(now)
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([second, amount])
        self.total += amount

    def seconds_until_room(self, now: float, needed: int, limit: int) -> float:
        """How long until `needed` more fits under `limit` (a full window when it never fits)."""
        self._expire(now)
        if needed > limit:
            return float(WINDOW_SECONDS)
        excess = self.total + needed - limit
        for second, amount in self._buckets:
            excess -= amount
            if excess <= 0:
                return max(second + WINDOW_SECONDS - now, 0.0)
        return 0.0


@dataclass
class _TenantState:
    requests_minute: _MinuteWindow = field(default_factory=_MinuteWindow)
    tokens_minute: _MinuteWindow = field(default_factory=_MinuteWindow)
    day: int = -1
    requests_today: int = 0
    """Admitted here today (and, without a shared ledger, seeded from it at start)."""
    tokens_today: int = 0
    others_requests: int = 0
    """Today's requests of the tenant that other replicas recorded in the shared ledger."""
    others_tokens: int = 0
    own_written_requests: int = 0
    """Today's requests this replica has written to the shared ledger."""
    own_written_tokens: int = 0
    streams: int = 0
    shared_tokens_minute: _MinuteWindow | None = None
    """With shared limits: the tenant's tokens of the last minute on every replica, as last
    read (at an admission or a charge flush) plus what was charged here since."""

    @property
    def day_requests(self) -> int:
        return self.requests_today + self.others_requests

    @property
    def day_tokens(self) -> int:
        return self.tokens_today + self.others_tokens


@dataclass
class Lease:
    """One admitted call: what it is, and (for a generation) the tokens charged so far."""

    tenant: str
    principal: str
    deployment: str
    kind: str
    start_time: datetime
    started_monotonic: float
    version: str = ""
    """The model version that served the call, set by the caller once it is known."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rows: int = 0
    exceeded: QuotaExceeded | None = None
    """Set when `charge` took the tenant over a token limit: the stream must stop."""
    outcome: str = ""
    """Overrides the outcome recorded on exit ("" derives it from how the block ended)."""
    _limiter: TenantLimiter | None = None
    _shared_lease: str | None = None
    """With shared limits: the stream's lease in the shared table, released on exit."""

    def charge(self, completion_tokens: int) -> bool:
        """Charge tokens as they stream; False once the tenant is over a token limit (the
        tokens are charged all the same: they were produced)."""
        if self._limiter is None:
            raise RuntimeError("charge() outside the `async with limiter.admit(...)` block")
        self.completion_tokens += completion_tokens
        self.exceeded = self._limiter._charge(self, completion_tokens)
        return self.exceeded is None


class _Admission:
    """The async context manager `TenantLimiter.admit`/`admit_request` return."""

    def __init__(self, limiter: TenantLimiter, lease: Lease, stream: bool) -> None:
        self._limiter = limiter
        self._lease = lease
        self._stream = stream

    async def __aenter__(self) -> Lease:
        if self._limiter._shared is None:
            self._limiter._enter(self._lease, self._stream)
        else:
            await self._limiter._enter_shared(self._lease, self._stream)
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        record = self._limiter._leave(self._lease, self._stream, exc)
        if self._lease._shared_lease is not None:
            await self._limiter._release_shared(self._lease._shared_lease)
        ledger = self._limiter._ledger
        if ledger is None:
            return
        if self._stream and exc is None:
            # A finished generation is committed before its caller sends the final response.
            await ledger.append_durable(record)
        else:
            ledger.append(record)


class TenantLimiter:
    """Admission of calls against their tenant's limits, and the usage record of each.

    `ledger` (optional) receives a `UsageRecord` per admitted call when it ends; `metrics`
    (optional) counts usage and rejections with a bounded tenant label; `shared` (optional,
    replicas on one PostgreSQL) counts minute windows and streams across replicas — then
    `close` ends its background work (lease renewal, writing charged tokens).
    """

    def __init__(self, config: TenancyConfigSource, ledger: UsageLedger | None = None,
                 metrics: UsageMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 shared: SharedLimits | None = None) -> None:
        self._config = config
        self._ledger = ledger
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._tenants: dict[str, _TenantState] = {}
        self._shared = shared
        self._shared_task: asyncio.Task[None] | None = None
        self._fallback_logged_at = -math.inf
        self._shared_retry_at = -math.inf

    @property
    def config(self) -> TenancyConfig:
        return self._config.current()

    def admit(self, principal: Principal, deployment: str, prompt_tokens: int = 0) -> _Admission:
        """A generation: one concurrent stream, one request and its prompt tokens, with
        completion tokens charged by `Lease.charge` as they stream."""
        return _Admission(self, self._lease(principal, deployment, "generation",
                                            prompt_tokens=prompt_tokens), stream=True)

    def admit_request(self, principal: Principal, deployment: str, rows: int) -> _Admission:
        """A plain request (Predict, KServe ModelInfer): one request of `rows` rows."""
        return _Admission(self, self._lease(principal, deployment, "predict", rows=rows),
                          stream=False)

    def seed_today(self, totals: Mapping[str, tuple[int, int]]) -> None:
        """Today's (requests, tokens) per tenant so far, e.g. from the ledger at start."""
        today = self._day(self._clock())
        for tenant, (requests, tokens) in totals.items():
            state = self._state(tenant, today)
            state.requests_today += requests
            state.tokens_today += tokens

    def written(self, records: Sequence[UsageRecord]) -> None:
        """This replica's records now in the shared ledger (the ledger's `on_written`)."""
        today = self._day(self._clock())
        for record in records:
            if self._day(record.start_time.timestamp()) == today:
                state = self._state(record.tenant, today)
                state.own_written_requests += record.requests
                state.own_written_tokens += record.prompt_tokens + record.completion_tokens

    def share_today(self, totals: Mapping[str, tuple[int, int]]) -> None:
        """Today's (requests, tokens) per tenant in the ledger replicas share (PostgreSQL):
        what the other replicas recorded counts against the daily quotas here too (minute
        windows and concurrent streams are shared through `SharedLimits`)."""
        today = self._day(self._clock())
        for tenant, (requests, tokens) in totals.items():
            state = self._state(tenant, today)
            state.others_requests = max(requests - state.own_written_requests, 0)
            state.others_tokens = max(tokens - state.own_written_tokens, 0)

    def _lease(self, principal: Principal, deployment: str, kind: str, *,
               prompt_tokens: int = 0, rows: int = 0) -> Lease:
        return Lease(tenant_of(principal), principal.name, deployment, kind,
                     datetime.fromtimestamp(self._clock(), UTC), self._monotonic(),
                     prompt_tokens=prompt_tokens, rows=rows, _limiter=self)

    @staticmethod
    def _day(now: float) -> int:
        return int(now // SECONDS_PER_DAY)

    def _state(self, tenant: str, today: int) -> _TenantState:
        state = self._tenants.setdefault(tenant, _TenantState())
        if state.day != today:
            state.day, state.requests_today, state.tokens_today = today, 0, 0
            state.others_requests = state.others_tokens = 0
            state.own_written_requests = state.own_written_tokens = 0
        return state

    def _enter(self, lease: Lease, stream: bool) -> None:
        now = self._clock()
        limits = self.config.limits_for(lease.tenant)
        state = self._state(lease.tenant, self._day(now))
        tokens = lease.prompt_tokens
        try:
            self._check(lease.tenant, limits, state, now, stream, tokens)
        except QuotaExceeded as refusal:
            self._count_rejection(refusal)
            raise
        self._account(state, now, tokens, stream)

    def _count_rejection(self, refusal: QuotaExceeded) -> None:
        if self._metrics is not None:
            self._metrics.rejected(refusal.tenant, refusal.kind.value)

    @staticmethod
    def _concerns_shared(limits: TenantLimits, stream: bool) -> bool:
        """Whether a minute or stream limit concerns this call (else no shared count is
        needed: the daily quotas are shared through the ledger)."""
        if limits.requests_per_minute is not None:
            return True
        return stream and (limits.tokens_per_minute is not None
                           or limits.concurrent_streams is not None)

    async def _enter_shared(self, lease: Lease, stream: bool) -> None:
        """Admission against the counts every replica shares (`SharedLimits`): the same
        checks as `_enter`, on the tenant's shared window and live streams, under its lock."""
        assert self._shared is not None
        now = self._clock()
        limits = self.config.limits_for(lease.tenant)
        if not self._concerns_shared(limits, stream) or (
                self._monotonic() < self._shared_retry_at):
            self._enter(lease, stream)
            return
        self._start_shared_work()
        state = self._state(lease.tenant, self._day(now))
        tokens = lease.prompt_tokens
        ask = Ask(limits.requests_per_minute, limits.tokens_per_minute if stream else None,
                  limits.concurrent_streams if stream else None, tokens,
                  uuid.uuid4().hex if stream else None,
                  refuse=self._over_a_daily_quota(limits, state, stream, tokens))
        try:
            admitted, window = await self._shared.admit(lease.tenant, now, ask)
        except Exception as exc:  # the database is away: this replica's own counts decide
            self._warn_fallback(exc)
            self._shared_retry_at = self._monotonic() + SHARED_RETRY_SECONDS
            self._enter(lease, stream)
            return
        # The answer is the in-memory checks' on what the database read: the same refusal
        # (limit named, RetryInfo) a single replica gives.
        view = dataclasses.replace(
            state, requests_minute=_MinuteWindow(window.requests()),
            tokens_minute=_MinuteWindow(window.tokens()),
            streams=window.live_streams)
        try:
            self._check(lease.tenant, limits, view, now, stream, tokens)
        except QuotaExceeded as refusal:
            self._count_rejection(refusal)
            if admitted:  # cannot be: the database applied these checks; say so, loudly
                _log.error("the shared admission admitted what the limiter refuses (%s)",
                           refusal)
            raise
        if not admitted:
            raise RuntimeError("the shared admission refused what the limiter admits")
        view.tokens_minute.add(now, tokens)
        state = self._state(lease.tenant, self._day(self._clock()))
        state.shared_tokens_minute = view.tokens_minute
        self._account(state, now, tokens, stream)
        lease._shared_lease = ask.lease_id

    def _over_a_daily_quota(self, limits: TenantLimits, state: _TenantState, stream: bool,
                            tokens: int) -> bool:
        """Whether `_check` refuses the call on a daily quota (decided here, not in the
        database: the days are shared through the ledger)."""
        rpd, tpd = limits.requests_per_day, limits.tokens_per_day
        if rpd is not None and state.day_requests + 1 > rpd:
            return True
        return stream and tpd is not None and state.day_tokens + max(tokens, 1) > tpd

    def _warn_fallback(self, exc: BaseException) -> None:
        now = self._monotonic()
        if now - self._fallback_logged_at >= SHARED_FALLBACK_LOG_SECONDS:
            self._fallback_logged_at = now
            _log.warning("the shared tenant limits cannot be reached (%s: %s); this replica "
                         "admits on its own counts meanwhile", type(exc).__name__, exc)

    async def _release_shared(self, lease_id: str) -> None:
        assert self._shared is not None
        try:
            await self._shared.release(lease_id)
        except Exception as exc:  # it lapses after the lease time instead
            self._warn_fallback(exc)

    def _start_shared_work(self) -> None:
        if self._shared_task is None or self._shared_task.done():
            self._shared_task = asyncio.get_running_loop().create_task(self._share_forever())

    async def _share_forever(self) -> None:
        """Renew this replica's stream leases every third of the lease time (and forget the
        shared rows nobody counts any more), and write charged tokens to the shared windows as
        they come."""
        assert self._shared is not None
        renew_every = self._shared.lease_seconds / 3
        renewed_at = self._monotonic()
        while True:
            await self._shared.wait_for_charges(renew_every)
            try:
                await self.flush_charges()
                if self._monotonic() - renewed_at >= renew_every:
                    renewed_at = self._monotonic()
                    await self.renew_leases()
                    await self._shared.forget_stale(self._clock())
            except Exception as exc:
                self._warn_fallback(exc)
                await asyncio.sleep(min(renew_every, 1.0))

    async def flush_charges(self) -> None:
        """Write the completion tokens charged here to the shared windows, and read those
        tenants' windows back (what the next `charge` compares with its limit)."""
        if self._shared is None:
            return
        now = self._clock()
        for tenant, window in (await self._shared.flush(now)).items():
            state = self._tenants.get(tenant)
            if state is not None:
                tokens = _MinuteWindow(window.tokens())
                for second, amount in self._shared.unwritten(tenant):
                    tokens.add(second, amount)  # charged while the flush was under way
                state.shared_tokens_minute = tokens

    async def renew_leases(self) -> None:
        """Push this replica's running streams' leases `lease_seconds` ahead now."""
        if self._shared is not None:
            await self._shared.renew(self._clock())

    async def close(self) -> None:
        """Stop the shared background work, after writing what was charged (best effort);
        streams still running keep their leases until they lapse."""
        if self._shared_task is not None:
            self._shared_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shared_task
            self._shared_task = None
        if self._shared is not None:
            try:
                await self.flush_charges()
            except Exception as exc:
                self._warn_fallback(exc)
            await self._shared.close()

    def _account(self, state: _TenantState, now: float, tokens: int, stream: bool) -> None:
        """An admitted call's share of this replica's counts."""
        state.requests_minute.add(now, 1)
        state.tokens_minute.add(now, tokens)
        state.requests_today += 1
        state.tokens_today += tokens
        if stream:
            state.streams += 1

    def _check(self, tenant: str, limits: TenantLimits, state: _TenantState, now: float,
               stream: bool, tokens: int) -> None:
        until_tomorrow = (self._day(now) + 1) * SECONDS_PER_DAY - now
        if stream and limits.concurrent_streams is not None and (
                state.streams >= limits.concurrent_streams):
            raise QuotaExceeded(tenant, LimitKind.CONCURRENT_STREAMS, limits.concurrent_streams,
                                CONCURRENCY_RETRY_SECONDS)
        rpm = limits.requests_per_minute
        if rpm is not None and state.requests_minute.used(now) + 1 > rpm:
            raise QuotaExceeded(tenant, LimitKind.REQUESTS_PER_MINUTE, rpm,
                                state.requests_minute.seconds_until_room(now, 1, rpm))
        rpd = limits.requests_per_day
        if rpd is not None and state.day_requests + 1 > rpd:
            raise QuotaExceeded(tenant, LimitKind.REQUESTS_PER_DAY, rpd, until_tomorrow)
        if not stream:
            return  # a plain request spends no tokens
        # A stream needs room for its prompt and at least one completion token.
        needed = max(tokens, 1)
        tpm = limits.tokens_per_minute
        if tpm is not None and state.tokens_minute.used(now) + needed > tpm:
            raise QuotaExceeded(tenant, LimitKind.TOKENS_PER_MINUTE, tpm,
                                state.tokens_minute.seconds_until_room(now, needed, tpm),
                                f" ({tokens} prompt tokens asked)")
        tpd = limits.tokens_per_day
        if tpd is not None and state.day_tokens + needed > tpd:
            raise QuotaExceeded(tenant, LimitKind.TOKENS_PER_DAY, tpd, until_tomorrow)

    def _charge(self, lease: Lease, tokens: int) -> QuotaExceeded | None:
        now = self._clock()
        state = self._state(lease.tenant, self._day(now))
        state.tokens_minute.add(now, tokens)
        state.tokens_today += max(tokens, 0)
        limits = self.config.limits_for(lease.tenant)
        exceeded: QuotaExceeded | None = None
        tpm, tpd = limits.tokens_per_minute, limits.tokens_per_day
        minute = state.tokens_minute
        if self._shared is not None and tpm is not None:
            self._shared.charge(lease.tenant, now, tokens)  # written by the background flush
            if state.shared_tokens_minute is not None:
                state.shared_tokens_minute.add(now, tokens)
                minute = state.shared_tokens_minute
        if tpm is not None and minute.used(now) > tpm:
            exceeded = QuotaExceeded(lease.tenant, LimitKind.TOKENS_PER_MINUTE, tpm,
                                     minute.seconds_until_room(now, 0, tpm))
        elif tpd is not None and state.day_tokens > tpd:
            exceeded = QuotaExceeded(lease.tenant, LimitKind.TOKENS_PER_DAY, tpd,
                                     (self._day(now) + 1) * SECONDS_PER_DAY - now)
        if exceeded is not None and lease.exceeded is None and self._metrics is not None:
            self._metrics.rejected(lease.tenant, exceeded.kind.value)
        return exceeded

    def _leave(self, lease: Lease, stream: bool, error: BaseException | None) -> UsageRecord:
        if stream:
            state = self._tenants.get(lease.tenant)
            if state is not None:
                state.streams = max(state.streams - 1, 0)
        record = UsageRecord(
            tenant=lease.tenant, principal=lease.principal, deployment=lease.deployment,
            version=lease.version, kind=lease.kind, prompt_tokens=lease.prompt_tokens,
            completion_tokens=lease.completion_tokens, requests=1, rows=lease.rows,
            start_time=lease.start_time,
            duration_seconds=max(self._monotonic() - lease.started_monotonic, 0.0),
            outcome=lease.outcome or outcome_of(error, lease))
        if self._metrics is not None:
            self._metrics.record(record)
        return record


def outcome_of(error: BaseException | None, lease: Lease | None = None) -> str:
    """The outcome a usage record keeps: OK, CANCELLED, or the error's canonical code."""
    if error is None:
        return "RESOURCE_EXHAUSTED" if lease is not None and lease.exceeded else "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(error, MaasError):
        return error.code
    return "INTERNAL"

