"""Traffic routing: weighted, sticky canary splits, shadow sampling and in-flight tracking.

A `Route` is immutable; rollouts build a new one and swap it in with one assignment, so a
request sees either the old or the new split, never a mix. Stickiness comes from hashing
the request id: the same id lands on the same version for as long as the split holds.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from maas_runtime.errors import InvalidArgument

from maas_inference.tensors import ServingSignature

_BUCKETS = 100


@dataclass(frozen=True)
class ServedModel:
    """One registry version loaded in Triton, with what the gateway checks requests against."""

    version: str
    """Registry resource name, e.g. "models/digits/versions/3"."""
    triton_model: str
    signature: ServingSignature
    instances: int = 1
    """Model instances in Triton: how many batches it executes at once."""
    runtime: str = ""
    """What runs it, e.g. "onnxruntime in Triton's Python backend" (reported on the deployment)."""


@dataclass(frozen=True)
class Route:
    """Where a deployment's requests go."""

    targets: tuple[tuple[ServedModel, int], ...]
    """(model, percent) pairs; percents add up to 100."""
    shadow: ServedModel | None = None
    shadow_percent: int = 0
    _buckets: tuple[ServedModel, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if sum(percent for _, percent in self.targets) != _BUCKETS:
            raise InvalidArgument.for_field("traffic", "percents must add up to 100")
        buckets = []
        for model, percent in self.targets:
            buckets.extend([model] * percent)
        object.__setattr__(self, "_buckets", tuple(buckets))

    def pick(self, request_id: str) -> ServedModel:
        """The target for `request_id`: stable for the id, weighted by percent."""
        if len(self.targets) == 1:
            return self.targets[0][0]
        return self._buckets[zlib.crc32(request_id.encode()) % _BUCKETS]

    def mirrors(self, request_id: str) -> bool:
        """Whether this request is copied to the shadow (independent of the canary bucket)."""
        if self.shadow is None:
            return False
        return zlib.crc32(b"shadow:" + request_id.encode()) % _BUCKETS < self.shadow_percent

    @property
    def models(self) -> set[str]:
        names = {model.triton_model for model, _ in self.targets}
        if self.shadow is not None:
            names.add(self.shadow.triton_model)
        return names


class InFlight:
    """Counts requests per Triton model so a rollout can wait for the old one to drain."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._changed = asyncio.Condition()
        self._waiters = 0

    @contextmanager
    def track(self, triton_model: str):
        self._counts[triton_model] += 1
        try:
            yield
        finally:
            self._counts[triton_model] -= 1
            if not self._counts[triton_model]:
                del self._counts[triton_model]
                if self._waiters:  # only a rollout or delete waits: keep the hot path bare
                    asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def count(self, triton_model: str) -> int:
        return self._counts.get(triton_model, 0)

    async def drained(self, triton_models: set[str], timeout: float) -> bool:
        """Wait until none of `triton_models` has a request in flight; False on timeout."""

        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: not any(self.count(m) for m in triton_models))

        self._waiters += 1
        try:
            await asyncio.wait_for(wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1
