"""Deployments: registry versions made into Triton models, routed, rolled out and reloaded.

Transport-free domain logic. A deployment's desired state (what it serves, its split, its
shadow, its Triton settings) lives in the deployment table; its live state is a `Route`
in memory. A rollout loads the new version first, swaps the route in one assignment, waits
for requests on the old version to drain, then unloads it: no request fails during it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import logging
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
    Set as AbstractSet,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from maas.common.v1 import tensor_pb2
from maas_formats import validate_hf_transformer
from maas_runtime import contract_enums, errors, scopes
from maas_runtime.auth import Principal
from maas_runtime.names import parse_version_name, validate_deployment_id
from maas_runtime.pagination import PageTokenCodec, clamp_page_size, query_fingerprint
from maas_runtime.registry_client import RegistryClient
from maas_runtime.telemetry import trace_metadata
from opentelemetry.metrics import Meter
from tritonclient.grpc import service_pb2

from maas_inference.coalescing import RequestCoalescer
from maas_inference.routing import InFlight, Route, ServedModel
from maas_inference.store import DeploymentStore
from maas_inference.tensors import (
    ServingSignature,
    TensorRule,
    check_output_names,
    check_text_inputs,
    infer_request_from_predict,
    kserve_shapes,
    predict_shapes,
)
from maas_inference.triton.client import TritonClient, TritonModelNotFound
from maas_inference.triton.model_repository import (
    ArtifactFormat,
    BatchingPolicy,
    ModelRepository,
    TensorSpec,
    TritonModelSpec,
    runtime_description,
)
from maas_inference.triton.runtimes import OnnxBackendProbe

_log = logging.getLogger(__name__)

READY, CREATING, ROLLING_OUT, FAILED, UNAVAILABLE = (
    contract_enums.DEPLOYMENT_STATE_READY, contract_enums.DEPLOYMENT_STATE_CREATING,
    contract_enums.DEPLOYMENT_STATE_ROLLING_OUT, contract_enums.DEPLOYMENT_STATE_FAILED,
    contract_enums.DEPLOYMENT_STATE_UNAVAILABLE)
SERVABLE_FORMATS = {contract_enums.MODEL_FORMAT_MAAS_PACKAGE: "maas-package",
                    contract_enums.MODEL_FORMAT_TORCHSCRIPT: "torchscript",
                    contract_enums.MODEL_FORMAT_ONNX: "onnx",
                    contract_enums.MODEL_FORMAT_HF_TRANSFORMER: "hf-transformer"}
UPDATABLE = frozenset({"model", "track_alias", "traffic", "shadow", "serving"})


@dataclass(frozen=True)
class ServingDefaults:
    max_batch_size: int = 32
    max_queue_delay_microseconds: int = 100
    drain_seconds: float = 30.0
    load_timeout_seconds: float = 120.0
    shadow_max_in_flight: int = 64
    coalesce_calls_per_instance: int = 1
    """Calls open per Triton model instance before concurrent requests share calls (0: never)."""


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
class Prediction:
    request_id: str
    version: str
    response: object
    """The Triton `ModelInferResponse`."""


@dataclass
class _Live:
    route: Route
    shadow_stats: ShadowStats = field(default_factory=ShadowStats)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def triton_model_name(deployment_id: str, version_name: str) -> str:
    """`{deployment}.{model}.v{n}`: deployment ids hold no '.', so names never collide."""
    _, model_id, _, version_id = version_name.split("/")
    if len(deployment_id) + len(model_id) + len(version_id) > 100:  # Triton caps names
        model_id = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return f"{deployment_id}.{model_id}.v{version_id}"


class DeploymentManager:
    """Use cases of the inference service, one method per RPC, plus reloads and alias tracking."""

    def __init__(self, store: DeploymentStore, registry: RegistryClient, triton: TritonClient,
                 repository: ModelRepository, artifact_dir: Path, defaults: ServingDefaults,
                 triton_ready: Callable[[], bool], page_tokens: PageTokenCodec,
                 meter: Meter | None = None,
                 on_routes_changed: Callable[[], Awaitable[None]] | None = None) -> None:
        self._store = store
        self._registry = registry
        self._triton = triton
        self._repository = repository
        self._onnx_backend = OnnxBackendProbe(triton, repository)
        self._artifacts = artifact_dir
        self._artifacts.mkdir(parents=True, exist_ok=True)
        self._defaults = defaults
        self._triton_ready = triton_ready
        self._on_routes_changed = on_routes_changed
        self._page_tokens = page_tokens
        self._live: dict[str, _Live] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._download_locks: dict[str, asyncio.Lock] = {}
        self._in_flight = InFlight()
        self._coalescer = RequestCoalescer(triton.infer_request)
        self._shadow_slots = asyncio.Semaphore(defaults.shadow_max_in_flight)
        self._background: set[asyncio.Task] = set()
        self._shadow_tasks: set[asyncio.Task] = set()
        self._shadow_counter = meter.create_counter(
            "maas.inference.shadow.compared", description="shadow comparisons by outcome"
        ) if meter is not None else None

    def live_routes(self) -> dict[str, Route]:
        """Every loaded deployment's current route (what the data plane's table is built from)."""
        return {deployment_id: live.route for deployment_id, live in self._live.items()}

    def shadow_stats(self) -> dict[str, ShadowStats]:
        """Every loaded deployment's shadow comparisons so far (exported as metrics)."""
        return {deployment_id: live.shadow_stats for deployment_id, live in self._live.items()}

    async def _routes_changed(self) -> None:
        if self._on_routes_changed is not None:
            await self._on_routes_changed()

    def _lock(self, deployment_id: str) -> asyncio.Lock:
        return self._locks.setdefault(deployment_id, asyncio.Lock())

    # -- validation -------------------------------------------------------------------------

    def _normalized_spec(self, fields: dict, field_prefix: str = "deployment") -> dict:
        violations = errors.ViolationCollector()
        model = fields.get("model", "")
        if violations.check(bool(model), f"{field_prefix}.model", "is required"):
            try:
                ref = parse_version_name(model, "models", f"{field_prefix}.model")
                if fields.get("track_alias") and ref.alias is None:
                    violations.add(f"{field_prefix}.track_alias",
                                   "needs `model` to name an alias (models/{m}@{alias})")
            except errors.InvalidArgument as exc:
                violations.violations.extend(exc.field_violations)
        traffic = []
        for index, target in enumerate(fields.get("traffic") or []):
            where = f"{field_prefix}.traffic[{index}]"
            percent = int(target.get("percent", 0))
            violations.check(0 <= percent <= 100, f"{where}.percent", "must be 0-100")
            try:
                parse_version_name(target.get("model_version", ""), "models",
                                   f"{where}.model_version")
            except errors.InvalidArgument as exc:
                violations.violations.extend(exc.field_violations)
            traffic.append({"model_version": target.get("model_version", ""),
                            "percent": percent})
        if traffic:
            violations.check(sum(t["percent"] for t in traffic) == 100,
                             f"{field_prefix}.traffic", "percents must add up to 100")
        shadow = fields.get("shadow") or None
        if shadow:
            percent = int(shadow.get("percent", 0))
            violations.check(1 <= percent <= 100, f"{field_prefix}.shadow.percent",
                             "must be 1-100")
            try:
                parse_version_name(shadow.get("model_version", ""), "models",
                                   f"{field_prefix}.shadow.model_version")
            except errors.InvalidArgument as exc:
                violations.violations.extend(exc.field_violations)
            shadow = {"model_version": shadow.get("model_version", ""), "percent": percent}
        serving = dict(fields.get("serving") or {})
        max_batch = int(serving.get("max_batch_size", self._defaults.max_batch_size) or
                        self._defaults.max_batch_size)
        violations.check(0 <= max_batch <= 4096, f"{field_prefix}.serving.max_batch_size",
                         "must be 0-4096")
        instances = int(serving.get("instance_count", 1) or 1)
        violations.check(1 <= instances <= 16, f"{field_prefix}.serving.instance_count",
                         "must be 1-16")
        delay = int(serving.get("max_queue_delay_microseconds",
                                self._defaults.max_queue_delay_microseconds) or
                    self._defaults.max_queue_delay_microseconds)
        violations.check(0 <= delay <= 1_000_000,
                         f"{field_prefix}.serving.max_queue_delay_microseconds",
                         "must be 0-1,000,000")
        preferred = [int(p) for p in serving.get("preferred_batch_sizes", [])]
        violations.check(all(1 <= p <= max_batch for p in preferred),
                         f"{field_prefix}.serving.preferred_batch_sizes",
                         "must be between 1 and max_batch_size")
        violations.raise_if_any("invalid deployment")
        return {"model": model, "track_alias": bool(fields.get("track_alias")),
                "traffic": traffic, "shadow": shadow,
                "serving": {"max_batch_size": max_batch, "instance_count": instances,
                            "max_queue_delay_microseconds": delay,
                            "dynamic_batching": serving.get("dynamic_batching", True),
                            "preferred_batch_sizes": preferred}}

    # -- loading ------------------------------------------------------------------------------

    async def _load_version(self, deployment_id: str, version: dict, serving: dict) -> ServedModel:
        """Download (verified), write the Triton model, load it and wait for READY."""
        format_name = SERVABLE_FORMATS.get(version.get("format", ""))
        if format_name is None:
            raise errors.FailedPrecondition(
                f"{version['name']} is {version.get('format')}; the Triton runtime serves "
                f"{sorted(SERVABLE_FORMATS)}", reason="FORMAT_NOT_SERVABLE")
        signature = version.get("signature") or {}
        if not signature.get("inputs") or not signature.get("outputs"):
            raise errors.FailedPrecondition(f"{version['name']} has no signature to serve",
                                            reason="NO_SIGNATURE")
        name = triton_model_name(deployment_id, version["name"])
        artifact = self._artifacts / version["artifact"]["sha256"]
        async with self._download_locks.setdefault(artifact.name, asyncio.Lock()):
            if not artifact.exists():
                await self._registry.download_model_version(version, artifact)
        artifact_format = ArtifactFormat(format_name)
        runtime = await self._onnx_backend.runtime_for(artifact_format)
        ships_onnx_graph = (artifact_format is ArtifactFormat.HF_TRANSFORMER and (
            await asyncio.to_thread(validate_hf_transformer, artifact)).onnx_model is not None)
        spec = TritonModelSpec(
            name=name, artifact_format=artifact_format, runtime=runtime,
            inputs=tuple(TensorSpec(t["name"], t["datatype"].removeprefix(contract_enums.DATA_TYPE_PREFIX),
                                    tuple(int(d) for d in t.get("shape", [])))
                         for t in signature["inputs"]),
            outputs=tuple(TensorSpec(t["name"], t["datatype"].removeprefix(contract_enums.DATA_TYPE_PREFIX),
                                     tuple(int(d) for d in t.get("shape", [])))
                          for t in signature["outputs"]),
            batching=BatchingPolicy(
                max_batch_size=serving["max_batch_size"],
                dynamic_batching=bool(serving["dynamic_batching"]) and serving["max_batch_size"] > 0,
                max_queue_delay_microseconds=serving["max_queue_delay_microseconds"],
                preferred_batch_sizes=tuple(serving["preferred_batch_sizes"])),
            instance_count=serving["instance_count"])
        await asyncio.to_thread(self._repository.write_model, spec, artifact)
        await self._triton.load_model(name)
        await self._triton.wait_model_ready(name, timeout=self._defaults.load_timeout_seconds)
        return ServedModel(version["name"], name,
                           ServingSignature.from_version(signature, serving["max_batch_size"]),
                           instances=serving["instance_count"],
                           runtime=runtime_description(artifact_format, runtime,
                                                       ships_onnx_graph=ships_onnx_graph))

    async def _build_route(self, deployment_id: str, spec: dict,
                           pinned: dict | None = None) -> tuple[Route, dict]:
        """Resolve every reference (or reuse `pinned` versions) and load them all."""
        targets = spec["traffic"] or [{"model_version": spec["model"], "percent": 100}]
        pinned = pinned or {}
        loaded: list[ServedModel] = []
        try:
            served = []
            for target in targets:
                version = await self._registry.resolve(pinned.get(target["model_version"],
                                                                  target["model_version"]))
                model = await self._load_version(deployment_id, version, spec["serving"])
                loaded.append(model)
                served.append((model, target["percent"]))
            shadow_model = None
            if spec["shadow"]:
                version = await self._registry.resolve(pinned.get(
                    spec["shadow"]["model_version"], spec["shadow"]["model_version"]))
                shadow_model = await self._load_version(deployment_id, version, spec["serving"])
                loaded.append(shadow_model)
            route = Route(tuple(served), shadow_model,
                          spec["shadow"]["percent"] if spec["shadow"] else 0)
        except BaseException:
            await self._unload({m.triton_model for m in loaded}, keep=self._models_in_use())
            raise
        resolved = {t["model_version"]: m.version for t, (m, _) in zip(targets, served,
                                                                        strict=True)}
        if shadow_model is not None:
            resolved[spec["shadow"]["model_version"]] = shadow_model.version
        return route, resolved

    def _models_in_use(self) -> set[str]:
        return {name for live in self._live.values() for name in live.route.models}

    async def _unload(self, triton_models: AbstractSet[str],
                      keep: AbstractSet[str] = frozenset()) -> None:
        for name in triton_models - keep:
            with contextlib.suppress(errors.MaasError):
                await self._triton.unload_model(name)
            await asyncio.to_thread(self._repository.remove_model, name)

    def _record(self, deployment_id: str, spec: dict, state: str, *, route: Route | None = None,
                resolved: dict | None = None, message: str = "", created: str | None = None
                ) -> dict:
        if route and not message:
            # The runtime of each served version is recorded on the deployment here: the
            # contract has no field of its own for it.
            served = [model for model, _ in route.targets]
            served += [route.shadow] if route.shadow is not None else []
            message = "; ".join(f"{m.version} runs on {m.runtime}" for m in served if m.runtime)
        return {
            "name": f"deployments/{deployment_id}", **spec, "state": state, "message": message,
            "serving_versions": [m.version for m, _ in route.targets] if route else [],
            "served_versions": _served_versions(route) if route else [],
            "resolved": resolved or {}, "create_time": created or _now(), "update_time": _now(),
            "etag": uuid.uuid4().hex[:16],
        }

    # -- use cases ----------------------------------------------------------------------------

    async def create(self, deployment_id: str, fields: dict, principal: Principal) -> dict:
        validate_deployment_id(deployment_id, "deployment_id")
        spec = self._normalized_spec(fields)
        _require_models(principal, spec)
        self._require_triton()
        async with self._lock(deployment_id):
            await asyncio.to_thread(self._store.create, deployment_id,
                                    self._record(deployment_id, spec, CREATING))
            try:
                route, resolved = await self._build_route(deployment_id, spec)
            except BaseException:
                await asyncio.to_thread(self._store.delete, deployment_id)
                raise
            self._live[deployment_id] = _Live(route)
            await self._routes_changed()
            record = self._record(deployment_id, spec, READY, route=route, resolved=resolved)
            await asyncio.to_thread(self._store.put, deployment_id, record)
        return self._view(deployment_id, record)

    async def get(self, name: str, principal: Principal) -> dict:
        """One deployment; PERMISSION_DENIED (MODEL_OUT_OF_SCOPE) unless the token may see
        every model it serves, as the registry answers a scoped read."""
        deployment_id = self._parse_name(name, "name")
        record = await asyncio.to_thread(self._store.get, deployment_id)  # NOT_FOUND first
        _require_models(principal, record)
        return self._view(deployment_id, record)

    async def list(self, page_size: int, page_token: str,
                   principal: Principal) -> tuple[list[dict], str]:
        """A page of the deployments the token may see: full pages, whatever the scope."""
        size = clamp_page_size(page_size)
        fingerprint = _scope_fingerprint(principal)
        after = self._page_tokens.decode(page_token, fingerprint)["after"] if page_token else ""
        items: list[dict] = []
        last_listed = after
        while True:
            rows = await asyncio.to_thread(self._store.list, after, size + 1)
            for deployment_id, record in rows:
                after = deployment_id
                if not scopes.may_see_models(principal, _model_ids(record)):
                    continue
                if len(items) == size:  # a visible one beyond this page: there is a next
                    return items, self._page_tokens.encode({"after": last_listed}, fingerprint)
                items.append(self._view(deployment_id, record))
                last_listed = deployment_id
            if len(rows) <= size:
                return items, ""

    async def visible(self, principal: Principal) -> builtins.list[dict]:
        """Every deployment the token may see (in id order), for KServe RepositoryIndex."""
        items, after = [], ""
        while rows := await asyncio.to_thread(self._store.list, after, 100):
            after = rows[-1][0]
            items += [self._view(deployment_id, record) for deployment_id, record in rows
                      if scopes.may_see_models(principal, _model_ids(record))]
        return items

    def require_visible(self, deployment_id: str, principal: Principal) -> None:
        """NOT_FOUND unless the deployment exists; PERMISSION_DENIED (MODEL_OUT_OF_SCOPE)
        unless the token may see every model it serves (KServe ModelConfig, statistics)."""
        _require_models(principal, self._store.get(deployment_id))

    async def update(self, fields: dict, update_mask: Sequence[str],
                     principal: Principal) -> dict:
        deployment_id = self._parse_name(fields.get("name", ""), "deployment.name")
        if not update_mask:
            raise errors.InvalidArgument.for_field("update_mask", "name at least one field")
        unknown = sorted(set(update_mask) - UPDATABLE)
        if unknown:
            raise errors.InvalidArgument.for_field(
                "update_mask", f"cannot update {unknown}; updatable: {sorted(UPDATABLE)}")
        async with self._lock(deployment_id):
            current = await asyncio.to_thread(self._store.get, deployment_id)
            if fields.get("etag") and fields["etag"] != current["etag"]:
                raise errors.Aborted("the deployment changed since it was read",
                                     reason="ETAG_MISMATCH")
            merged = {key: current[key] for key in UPDATABLE}
            merged.update({key: fields.get(key) for key in update_mask})
            spec = self._normalized_spec(merged)
            _require_models(principal, current)  # may touch what it serves now …
            _require_models(principal, spec)  # … and what it is to serve
            return await self._roll_out(deployment_id, current, spec)

    async def _roll_out(self, deployment_id: str, current: dict, spec: dict,
                        pinned: dict | None = None) -> dict:
        """Load the new route, switch to it, drain and unload what is no longer used."""
        self._require_triton()
        await asyncio.to_thread(self._store.put, deployment_id,
                                {**current, "state": ROLLING_OUT, "update_time": _now()})
        try:
            route, resolved = await self._build_route(deployment_id, spec, pinned)
        except BaseException as exc:
            await asyncio.to_thread(self._store.put, deployment_id, {
                **current, "message": f"rollout failed: {exc}", "update_time": _now()})
            raise
        previous = self._live.get(deployment_id)
        self._live[deployment_id] = _Live(route)  # the switch: one assignment
        await self._routes_changed()  # … and the data plane's, before anything is drained
        record = self._record(deployment_id, spec, READY, route=route, resolved=resolved,
                              created=current.get("create_time"))
        await asyncio.to_thread(self._store.put, deployment_id, record)
        if previous is not None:
            retired = previous.route.models - route.models
            if not await self._in_flight.drained(retired, self._defaults.drain_seconds):
                _log.warning("requests on %s did not drain in time; unloading anyway", retired)
            await self._unload(retired, keep=self._models_in_use())
        return self._view(deployment_id, record)

    async def delete(self, name: str, principal: Principal) -> None:
        deployment_id = self._parse_name(name, "name")
        async with self._lock(deployment_id):
            record = await asyncio.to_thread(self._store.get, deployment_id)  # NOT_FOUND first
            _require_models(principal, record)
            live = self._live.pop(deployment_id, None)
            await self._routes_changed()
            await asyncio.to_thread(self._store.delete, deployment_id)
            if live is not None:
                await self._in_flight.drained(live.route.models, self._defaults.drain_seconds)
                await self._unload(live.route.models, keep=self._models_in_use())

    async def reload_all(self) -> None:
        """After a (re)start of Triton: load every deployment's pinned versions again."""
        after = ""
        while rows := await asyncio.to_thread(self._store.list, after, 100):
            for deployment_id, _ in rows:
                after = deployment_id
                await self._reload(deployment_id)

    async def _reload(self, deployment_id: str, attempt: int = 0) -> None:
        """Load one deployment's pinned versions; while the registry is unreachable, keep
        retrying in the background instead of giving up on the deployment."""
        async with self._lock(deployment_id):
            try:
                record = await asyncio.to_thread(self._store.get, deployment_id)
            except errors.NotFound:
                return  # deleted meanwhile
            spec = {key: record[key] for key in UPDATABLE}
            try:
                route, _ = await self._build_route(deployment_id, spec, record.get("resolved"))
            except errors.Unavailable as exc:
                delay = min(30.0, 0.5 * 2**attempt)
                _log.warning("reloading %s must wait %.1fs: %s", deployment_id, delay,
                             exc.message)
                self._spawn(self._reload_later(deployment_id, attempt + 1, delay))
                return
            except errors.MaasError as exc:
                _log.error("could not reload %s: %s", deployment_id, exc.message)
                await asyncio.to_thread(self._store.put, deployment_id, {
                    **record, "state": FAILED, "message": f"reload failed: {exc.message}"})
                return
            previous = self._live.get(deployment_id)
            self._live[deployment_id] = _Live(
                route, previous.shadow_stats if previous else ShadowStats())
            await self._routes_changed()
            if record["state"] != READY:
                await asyncio.to_thread(self._store.put, deployment_id,
                                        {**record, "state": READY, "message": ""})

    async def _reload_later(self, deployment_id: str, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._reload(deployment_id, attempt)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], tasks: set[asyncio.Task] | None = None) -> None:
        tasks = self._background if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def follow_alias_moves(self) -> None:
        """Roll out `track_alias` deployments whenever the registry moves their alias."""
        async for alias_ref in self._registry.alias_changes():
            after = ""
            while rows := await asyncio.to_thread(self._store.list, after, 100):
                after = rows[-1][0]
                for deployment_id, record in rows:
                    if record.get("track_alias") and record["model"] == alias_ref:
                        await self._follow(deployment_id)

    async def _follow(self, deployment_id: str, attempts: int = 30) -> None:
        """Roll out to where the alias points now; retried while Triton or the registry is
        briefly unavailable, so a move during a restart is not lost."""
        for _ in range(attempts):
            try:
                await self._follow_once(deployment_id)
                return
            except errors.Unavailable as exc:
                _log.warning("following the alias of %s must wait: %s", deployment_id,
                             exc.message)
                await asyncio.sleep(1)

    async def _follow_once(self, deployment_id: str) -> None:
        async with self._lock(deployment_id):
            try:
                record = await asyncio.to_thread(self._store.get, deployment_id)
                target = await self._registry.resolve(record["model"])
                if record.get("resolved", {}).get(record["model"]) == target["name"]:
                    return
                _log.info("%s follows %s to %s", deployment_id, record["model"], target["name"])
                spec = {key: record[key] for key in UPDATABLE}
                await self._roll_out(deployment_id, record, spec)
            except errors.Unavailable:
                raise
            except errors.MaasError as exc:
                _log.warning("could not follow alias for %s: %s", deployment_id, exc.message)

    # -- data path ------------------------------------------------------------------------------

    def _route(self, deployment_id: str) -> _Live:
        live = self._live.get(deployment_id)
        if live is None:
            record = self._store.get(deployment_id)  # NOT_FOUND when it really does not exist
            raise errors.Unavailable(
                f"deployments/{deployment_id} is not loaded ({record['state']}): "
                f"{record.get('message') or 'retry shortly'}", reason="DEPLOYMENT_NOT_LOADED")
        return live

    def _require_triton(self) -> None:
        if not self._triton_ready():
            raise errors.Unavailable("Triton is not serving right now; retry shortly",
                                     reason="TRITON_UNAVAILABLE")

    async def predict(self, deployment: str, request_id: str, inputs: Sequence[tensor_pb2.Tensor],
                      output_names: Sequence[str],
                      timeout: float | None, principal: Principal) -> Prediction:
        deployment_id = self._parse_name(deployment, "deployment")
        live = self._route(deployment_id)
        _require_route_models(principal, live.route)
        self._require_triton()
        request_id = request_id or uuid.uuid4().hex
        target = live.route.pick(request_id)
        rows = target.signature.check(predict_shapes(inputs), "inputs")
        check_output_names(output_names, target.signature, "output_names")
        request = infer_request_from_predict(inputs, output_names, target.triton_model,
                                             request_id)
        if target.signature.has_text_inputs:
            check_text_inputs(target.signature, request, "inputs")
        response = await self._infer(target, request, rows, timeout)
        if live.route.mirrors(request_id):
            self._mirror(live, request, response)
        return Prediction(request_id, target.version, response)

    async def _infer(self, target: ServedModel, request: service_pb2.ModelInferRequest,
                     rows: int, timeout: float | None) -> service_pb2.ModelInferResponse:
        """Triton's answer, through the coalescer (concurrent requests may share a call).

        A routed model that Triton does not know was lost with a Triton restart and is being
        loaded again: that is UNAVAILABLE (retry shortly), never NOT_FOUND for a deployment
        that exists.
        """
        with self._in_flight.track(target.triton_model):
            try:
                return await self._coalescer.infer(
                    request, rows=rows if target.signature.splits_by_rows else None,
                    max_rows=target.signature.max_batch_size,
                    max_in_flight=target.instances * self._defaults.coalesce_calls_per_instance,
                    timeout=timeout, metadata=trace_metadata())
            except TritonModelNotFound as exc:
                raise errors.Unavailable(
                    f"{target.version} is being loaded into Triton again; retry shortly",
                    reason="MODEL_NOT_LOADED") from exc

    async def kserve_infer(self, request: service_pb2.ModelInferRequest, timeout: float | None,
                           principal: Principal) -> service_pb2.ModelInferResponse:
        """KServe-v2 ModelInfer (model name = deployment id).

        The request is sent on under the Triton model's name; the reply carries the
        deployment's name and version. Tensor bytes are passed along as they came
        (concatenated with others' when calls are shared), never decoded.
        """
        deployment_id = request.model_name
        live, target, rows, request_id = self._kserve_route(request, principal)
        response = await self._infer(target, request, rows, timeout)
        if live.route.mirrors(request_id):
            self._mirror(live, request, response)
        response.model_name = deployment_id
        response.model_version = target.version.rsplit("/", 1)[-1]
        return response

    def _kserve_route(self, request: service_pb2.ModelInferRequest, principal: Principal
                      ) -> tuple[_Live, ServedModel, int, str]:
        """Route a KServe request (model name = deployment id) to one of the deployment's
        versions, check it against that version's signature and retarget it at the Triton
        model. Returns the route, the target, the request's rows and its (routing) id."""
        live = self._route(request.model_name)
        _require_route_models(principal, live.route)
        self._require_triton()
        request_id = request.id or uuid.uuid4().hex
        target = live.route.pick(request_id)
        rows = target.signature.check(kserve_shapes(request), "inputs")
        if target.signature.has_text_inputs:
            check_text_inputs(target.signature, request, "inputs")
        request.model_name = target.triton_model
        return live, target, rows, request_id

    async def kserve_stream_infer(
            self, requests: AsyncIterator[service_pb2.ModelInferRequest], timeout: float | None,
            principal: Principal) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """KServe-v2 ModelStreamInfer: each request routed as ModelInfer is, then answered on
        one Triton stream, in order: every response of a request (several for a decoupled
        model) comes before the first of the next. A request refused here or failed by Triton
        is answered with `error_message`, as Triton does, and the stream goes on. Shadows are
        not fed from streams.

        Triton marks a request's last response only when asked to, so every request asks
        (`triton_enable_empty_final_response`); the empty closing response of a decoupled
        model is passed on only to callers that asked for it themselves.
        """
        stream = None
        try:
            async for request in requests:
                deployment_id = request.model_name
                try:
                    _, target, _, _ = self._kserve_route(request, principal)
                except errors.MaasError as exc:
                    yield service_pb2.ModelStreamInferResponse(
                        error_message=exc.message, infer_response=service_pb2.ModelInferResponse(
                            model_name=deployment_id, id=request.id))
                    continue
                asked = request.parameters.get(ENABLE_FINAL_RESPONSE)
                caller_wants_final = asked is not None and asked.bool_param
                request.parameters[ENABLE_FINAL_RESPONSE].bool_param = True
                if stream is None:
                    stream = self._triton.open_stream(timeout=timeout, metadata=trace_metadata())
                with self._in_flight.track(target.triton_model):
                    await stream.send(request)
                    while True:
                        response = await stream.receive()
                        final = _is_final_response(response)
                        if final and not caller_wants_final and _is_empty_response(response):
                            break
                        _as_deployment(response, deployment_id, target)
                        if not caller_wants_final and \
                                FINAL_RESPONSE in response.infer_response.parameters:
                            del response.infer_response.parameters[FINAL_RESPONSE]
                        yield response
                        if final:
                            break
        finally:
            if stream is not None:
                await stream.close()

    def _mirror(self, live: _Live, request: service_pb2.ModelInferRequest,
                primary: service_pb2.ModelInferResponse) -> None:
        """Copy to the shadow without delaying or failing the primary reply."""
        if self._shadow_slots.locked():
            return  # saturated: skip rather than queue behind the primary traffic
        shadow = live.route.shadow
        if shadow is None:
            return
        copy = type(request)()
        copy.CopyFrom(request)
        copy.model_name = shadow.triton_model
        self._spawn(self._compare(live.shadow_stats, copy, primary), self._shadow_tasks)

    async def _compare(self, stats: ShadowStats, request: service_pb2.ModelInferRequest,
                       primary: service_pb2.ModelInferResponse) -> None:
        async with self._shadow_slots:
            try:
                with self._in_flight.track(request.model_name):
                    shadow = await self._triton.infer_request(request, timeout=30)
            except errors.MaasError:
                stats.errors += 1
                self._count_shadow("error")
                return
        first_primary, first_shadow = _first_output(primary), _first_output(shadow)
        stats.compared += 1
        if first_primary is None or first_shadow is None or \
                first_primary.shape != first_shadow.shape:
            self._count_shadow("mismatch")
            return
        diff = float(np.max(np.abs(first_primary - first_shadow))) if first_primary.size else 0.0
        stats.max_abs_diff = max(stats.max_abs_diff, diff)
        agreed = bool(np.array_equal(first_primary.reshape(len(first_primary), -1).argmax(1),
                                     first_shadow.reshape(len(first_shadow), -1).argmax(1)))
        stats.argmax_agreed += agreed
        self._count_shadow("agreed" if agreed else "disagreed")

    def _count_shadow(self, outcome: str) -> None:
        if self._shadow_counter is not None:
            self._shadow_counter.add(1, {"outcome": outcome})

    async def drain_background(self) -> None:
        """Wait for the shadow comparisons in flight (their stats are then complete)."""
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

    async def close(self) -> None:
        """Finish calls and shadow comparisons in flight, cancel pending reload retries."""
        await self._coalescer.close()
        await self.drain_background()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def metadata(self, deployment_id: str,
                 principal: Principal) -> tuple[ServedModel, builtins.list[str]]:
        live = self._route(deployment_id)
        _require_route_models(principal, live.route)
        return live.route.targets[0][0], [m.version for m, _ in live.route.targets]

    def served_route(self, deployment_id: str, principal: Principal) -> Route:
        """The live route of a deployment the token may see: NOT_FOUND when there is no such
        deployment, UNAVAILABLE while it is not loaded, PERMISSION_DENIED out of scope."""
        live = self._route(deployment_id)
        _require_route_models(principal, live.route)
        return live.route

    def is_ready(self, deployment_id: str) -> bool:
        return deployment_id in self._live and self._triton_ready()

    # -- views ----------------------------------------------------------------------------------

    def _view(self, deployment_id: str, record: dict) -> dict:
        view = {key: value for key, value in record.items() if key != "resolved"}
        if not view.get("shadow"):
            view.pop("shadow", None)
        if record["state"] == READY and not self._triton_ready():
            view["state"] = UNAVAILABLE
        live = self._live.get(deployment_id)
        if live is not None and live.route.shadow is not None:
            view["shadow_stats"] = live.shadow_stats.as_dict()
        return view

    @staticmethod
    def _parse_name(name: str, field_path: str) -> str:
        if not name.startswith("deployments/"):
            raise errors.InvalidArgument.for_field(
                field_path, f"must look like 'deployments/{{id}}', got {name!r}")
        return validate_deployment_id(name.removeprefix("deployments/"), field_path)


def _served_versions(route: Route) -> list[dict]:
    """The deployment's `served_versions`: each loaded version with its signature and runtime."""

    def specs(rules: Sequence[TensorRule]) -> list[dict]:
        return [{"name": rule.name, "datatype": contract_enums.DATA_TYPE_PREFIX + rule.datatype,
                 "shape": list(rule.shape)} for rule in rules]

    served = [(model, percent, False) for model, percent in route.targets]
    served += [(route.shadow, 0, True)] if route.shadow is not None else []
    return [{"model_version": model.version, "percent": percent, "shadow": shadow,
             "inputs": specs(model.signature.inputs), "outputs": specs(model.signature.outputs),
             "max_batch_size": model.signature.max_batch_size, "runtime": model.runtime}
            for model, percent, shadow in served]


def _model_ids(spec: dict) -> set[str]:
    """Every model a deployment serves: its model, its traffic split and its shadow."""
    references = [spec["model"], *(t["model_version"] for t in spec.get("traffic") or [])]
    if spec.get("shadow"):
        references.append(spec["shadow"]["model_version"])
    return {scopes.model_id_of(reference) or reference for reference in references if reference}


def _require_models(principal: Principal, spec: dict) -> None:
    """A scoped token may only see, deploy, change or delete what serves only its models."""
    scopes.require_models(principal, _model_ids(spec))


def _require_route_models(principal: Principal, route: Route) -> None:
    # A generator: an unscoped token (the hot path) never builds the set.
    scopes.require_models(principal, (m.version.split("/")[1] for m, _ in route.targets))


def _scope_fingerprint(principal: Principal) -> str:
    """A page token is only good for the scope it was issued under (its cursor is the last
    id looked at, which may be a deployment this token cannot see)."""
    return query_fingerprint("deployments", *sorted(principal.model_scopes))


ENABLE_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


def _is_final_response(response: service_pb2.ModelStreamInferResponse) -> bool:
    """The last response of its request: Triton flags it (when asked); an unflagged one is
    the only one (a model that is not decoupled, or an error)."""
    flag = response.infer_response.parameters.get(FINAL_RESPONSE)
    return flag is None or flag.bool_param


def _is_empty_response(response: service_pb2.ModelStreamInferResponse) -> bool:
    return not response.error_message and not response.infer_response.outputs


def _as_deployment(response: service_pb2.ModelStreamInferResponse, deployment_id: str,
                   target: ServedModel) -> None:
    """Name the deployment and its version where Triton named its own model."""
    reply = response.infer_response
    reply.model_name = deployment_id
    reply.model_version = target.version.rsplit("/", 1)[-1]
    if response.error_message:
        response.error_message = response.error_message.replace(target.triton_model,
                                                                deployment_id)


_NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
                "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8}


def _first_output(response: service_pb2.ModelInferResponse) -> np.ndarray | None:
    if not response.outputs or not response.raw_output_contents:
        return None
    output = response.outputs[0]
    dtype = _NUMPY_TYPES.get(output.datatype)
    if dtype is None:
        return None
    array = np.frombuffer(response.raw_output_contents[0], dtype=dtype)
    return array.reshape(tuple(output.shape)).astype(np.float64)
