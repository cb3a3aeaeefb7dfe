"""Traffic routing: the route table, weighted sticky canary splits, shadows, in-flight counts.

A `Route` is immutable; rollouts build a new one and swap it in with one assignment, so a
request sees either the old or the new split, never a mix. Stickiness comes from hashing
the request id: the same id lands on the same version for as long as the split holds.

The `RouteTable` sits between the deployment controller (`maas_inference.controller`), the
only writer, and the predictor (`maas_inference.predictor`) and KServe views, which read it:
what is served under a deployment id right now, whether Triton serves at all, and which
Triton models still have requests in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from maas_runtime import errors, scopes
from maas_runtime.auth import Principal
from maas_runtime.errors import InvalidArgument
from maas_runtime.names import validate_deployment_id

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
    artifact: Path | None = None
    """The version's verified artifact on local disk (a generative version's prompt renderer
    reads its tokenizer and chat template from it)."""


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
    def track(self, triton_model: str) -> Iterator[None]:
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
            async with asyncio.timeout(timeout):
                await wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1


@dataclass
class ShadowStats:
    compared: int = 0
    argmax_agreed: int = 0
    max_abs_diff: float = 0.0
    errors: int = 0

    def as_dict(self) -> dict:
        return {"compared": self.compared, "argmax_agreed": self.argmax_agreed,
                "max_abs_diff": self.max_abs_diff, "errors": self.errors}


@dataclass
class LiveRoute:
    """A loaded deployment: its route and the shadow comparisons made on it so far."""

    route: Route
    shadow_stats: ShadowStats = field(default_factory=ShadowStats)


class RouteTable:
    """Every loaded deployment's live route, by deployment id.

    `record_of(deployment_id)` reads the deployment's stored record (NOT_FOUND when there is
    none): it tells a deployment that does not exist from one that is not loaded yet.
    `on_changed` is awaited after every switch or removal (the native data plane republishes
    its table then, before anything is drained).
    """

    def __init__(self, record_of: Callable[[str], dict], triton_ready: Callable[[], bool],
                 on_changed: Callable[[], Awaitable[None]] | None = None) -> None:
        self._record_of = record_of
        self._triton_ready = triton_ready
        self._on_changed = on_changed
        self._live: dict[str, LiveRoute] = {}
        self.in_flight = InFlight()

    def get(self, deployment_id: str) -> LiveRoute | None:
        return self._live.get(deployment_id)

    def live(self, deployment_id: str) -> LiveRoute:
        """The deployment's live route; UNAVAILABLE while it is known but not loaded,
        NOT_FOUND when it does not exist."""
        live = self._live.get(deployment_id)
        if live is None:
            record = self._record_of(deployment_id)  # NOT_FOUND when it really does not exist
            raise errors.Unavailable(
                f"deployments/{deployment_id} is not loaded ({record['state']}): "
                f"{record.get('message') or 'retry shortly'}", reason="DEPLOYMENT_NOT_LOADED")
        return live

    def served(self, deployment_id: str, principal: Principal) -> LiveRoute:
        """The live route of a deployment the token may see: NOT_FOUND when there is no such
        deployment, UNAVAILABLE while it is not loaded, PERMISSION_DENIED out of scope."""
        live = self.live(deployment_id)
        require_route_models(principal, live.route)
        return live

    def routes(self) -> dict[str, Route]:
        """Every loaded deployment's current route (what the data plane's table is built from)."""
        return {deployment_id: live.route for deployment_id, live in self._live.items()}

    def shadow_stats(self) -> dict[str, ShadowStats]:
        """Every loaded deployment's shadow comparisons so far (exported as metrics)."""
        return {deployment_id: live.shadow_stats for deployment_id, live in self._live.items()}

    def models_in_use(self) -> set[str]:
        return {name for live in self._live.values() for name in live.route.models}

    def is_ready(self, deployment_id: str) -> bool:
        return deployment_id in self._live and self._triton_ready()

    def triton_serving(self) -> bool:
        return self._triton_ready()

    def require_triton(self) -> None:
        if not self._triton_ready():
            raise errors.Unavailable("Triton is not serving right now; retry shortly",
                                     reason="TRITON_UNAVAILABLE")

    async def switch(self, deployment_id: str, live: LiveRoute) -> None:
        """Serve `live` under the deployment from now on: one assignment, then `on_changed`."""
        self._live[deployment_id] = live
        await self._changed()

    async def remove(self, deployment_id: str) -> LiveRoute | None:
        live = self._live.pop(deployment_id, None)
        await self._changed()
        return live

    async def _changed(self) -> None:
        if self._on_changed is not None:
            await self._on_changed()


def require_route_models(principal: Principal, route: Route) -> None:
    """A scoped token may only use a deployment whose every served model is in its scope:
    its shadow too (it is sent copies of the caller's requests), as Get and List count it."""
    # A generator: an unscoped token (the hot path) never builds the set.
    shadow = (route.shadow,) if route.shadow is not None else ()
    served = itertools.chain((model for model, _ in route.targets), shadow)
    scopes.require_models(principal, (model.version.split("/")[1] for model in served))


def parse_deployment_name(name: str, field_path: str) -> str:
    """The id in a `deployments/{id}` resource name, validated (INVALID_ARGUMENT naming
    `field_path` otherwise)."""
    if not name.startswith("deployments/"):
        raise errors.InvalidArgument.for_field(
            field_path, f"must look like 'deployments/{{id}}', got {name!r}")
    return validate_deployment_id(name.removeprefix("deployments/"), field_path)
