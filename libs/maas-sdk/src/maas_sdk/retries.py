"""Which calls the SDK repeats when a replica is unreachable, how often, and how long it waits.

A call that fails UNAVAILABLE (the replica died, restarts, or its Triton is down), or
CANCELLED without the caller asking (a replica shutting down cancels the calls it still holds;
the SDK never cancels a call itself), is sent again after a short jittered backoff to the next
replica (`maas_sdk.replicas`). Only calls that can run twice without changing the outcome are
repeated: reads (`Get…`, `List…`, `Watch…` streams resumed after their last event, and
`Download…` streams resumed at the byte they reached) and `Predict`. A `Generate` stream is
repeated only while no text of it has reached the caller: after that, the text already
produced cannot be replayed, and the caller gets UNAVAILABLE saying so. Creates, updates,
deletes, uploads and cancels are not: the suite keeps no request ids to recognise a repeated
write, so a create whose reply was lost could run twice (or answer ALREADY_EXISTS for its own
first attempt); their UNAVAILABLE reaches the caller, who knows whether repeating is safe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from maas_runtime.errors import Cancelled, MaasError, Unavailable

__all__ = ["RetryPolicy", "is_idempotent"]

_IDEMPOTENT_PREFIXES = ("Get", "List", "Watch", "Download")
_IDEMPOTENT_METHODS = frozenset({"Predict"})
_REPEATABLE_BEFORE_OUTPUT = frozenset({"Generate"})
"""Streams that may start again elsewhere as long as the caller has seen nothing of them."""


def is_idempotent(method: str) -> bool:
    """Whether the RPC `method` (its short name, e.g. "GetModelVersion") may run twice."""
    return method.startswith(_IDEMPOTENT_PREFIXES) or method in _IDEMPOTENT_METHODS


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts of an idempotent call on UNAVAILABLE (or a CANCELLED the caller did
    not ask for), with exponential backoff.

    The n-th retry waits a random time between half and all of
    `min(max_backoff_seconds, initial_backoff_seconds * backoff_multiplier ** (n - 1))`,
    so clients that lost the same replica do not all come back at once.
    `RetryPolicy(max_attempts=1)` turns retries off.
    """

    max_attempts: int = 5
    """Attempts of one call in all, the first included."""
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 1.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("backoff needs 0 <= initial_backoff_seconds <= max_backoff_seconds")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be at least 1, "
                             f"got {self.backoff_multiplier}")

    def should_retry(self, method: str, error: MaasError, attempt: int, *,
                     output_delivered: bool = False) -> bool:
        """Whether attempt number `attempt` (1-based) of `method`, failed with `error`, is
        followed by another; `output_delivered`: part of a `Generate` stream's output
        already reached the caller."""
        if attempt >= self.max_attempts or not isinstance(error, Unavailable | Cancelled):
            return False
        if method in _REPEATABLE_BEFORE_OUTPUT:
            return not output_delivered
        return is_idempotent(method)

    def retry_after(self, method: str, error: MaasError, attempt: int, *,
                    output_delivered: bool = False) -> float | None:
        """Seconds to wait after failed attempt number `attempt` of `method` before the next
        (`backoff_seconds`), or None when `should_retry` says none follows."""
        if not self.should_retry(method, error, attempt, output_delivered=output_delivered):
            return None
        return self.backoff_seconds(attempt)

    def backoff_seconds(self, attempt: int) -> float:
        """How long to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff_seconds,
                      self.initial_backoff_seconds * self.backoff_multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)
