"""The deployment controller: registry versions made into Triton models, rolled out, reloaded.

Transport-free domain logic. A deployment's desired state (what it serves, its split, its
shadow, its Triton settings) lives in the deployment table; its live state is a `Route` in
the `RouteTable` (which the predictor reads). A rollout loads the new version first, swaps
the route in one assignment, waits for requests on the old version to drain, then unloads
it: no request fails during it. Deployments that track an alias follow its moves.

Replicas sharing the table (PostgreSQL): the record is the desired state plus the state
written by the replica that performed the user's create or update. What each replica's own
Triton holds is local: a reload (after a start or a Triton restart) or a follow of another
replica's change writes nothing to the record; its outcome is this replica's load state per
deployment (`replica_loads`), exported as a metric, logged, and shown by Get on this replica
in place of a READY the replica cannot serve.

Creates and rollouts are guarded by a lease (`maas_inference.store`, one mechanism for
both): the replica creating a deployment, or rolling it out to new versions or a new split
(an update, an alias move), renews it while it loads. Should that replica die midway, another
takes the operation over once the lease lapsed (`take_over_lapsed_leases`, run by the
replicas' follower; exactly one replica takes each), and the record gets a new etag, so the
former holder, were it only stalled, can no longer write it:
- A create is finished as the user asked: the taker loads the recorded spec and records
  READY, or FAILED with the reason when the versions cannot be served.
- A rollout is finished as the user asked too (the ROLLING_OUT record says where it goes,
  `rollout`): the taker loads the new versions, switches, records READY with the new spec
  (a new etag) and unloads the old. When it cannot complete (a version gone or not servable),
  the rollout is rolled back: the record goes back to the spec served before it, READY with
  why in its message (FAILED when nothing was served before it). Throughout, every replica
  keeps serving the previous versions, as during any rollout: a user whose update call died
  with its replica sees, within about a lease, either the new versions (READY) or the old ones
  with the reason (READY, message "rollout to … rolled back: …"), never ROLLING_OUT for good.
- An operation interrupted more than `LeasePolicy.max_takeovers` times (say, a model that
  brings down whichever replica loads it) is not taken over again, and nothing is loaded: a
  create is recorded FAILED (the user deletes it), a rollout rolled back to what was served.
Each takeover, and how it ended, is logged (`maas_inference.controller`).
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
    Coroutine,
    Sequence,
    Set as AbstractSet,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from maas_formats import validate_hf_transformer
from maas_runtime import contract_enums, errors, scopes
from maas_runtime.auth import Principal
from maas_runtime.names import parse_version_name, validate_deployment_id
from maas_runtime.pagination import PageTokenCodec, clamp_page_size, query_fingerprint
from maas_runtime.registry_client import RegistryClient

from maas_inference.routing import (
    LiveRoute,
    Route,
    RouteTable,
    ServedModel,
    ShadowStats,
    parse_deployment_name,
)
from maas_inference.store import DeploymentStore, new_etag
from maas_inference.tensors import ServingSignature, TensorRule
from maas_inference.triton.client import TritonClient
from maas_inference.triton.model_repository import (
    GENERATION_INPUTS,
    GENERATION_OUTPUTS,
    ArtifactFormat,
    BatchingPolicy,
    GenerationServing,
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
                    contract_enums.MODEL_FORMAT_HF_TRANSFORMER: "hf-transformer",
                    contract_enums.MODEL_FORMAT_GGUF: "gguf",
                    contract_enums.MODEL_FORMAT_CAUSAL_LM: "causal-lm"}
GENERATION_SIGNATURE = {
    side: [{"name": tensor.name, "datatype": "BYTES", "shape": [1], "optional": tensor.optional}
           for tensor in tensors]
    for side, tensors in (("inputs", GENERATION_INPUTS), ("outputs", GENERATION_OUTPUTS))}
"""What the generation model of a GGUF or causal-LM version takes and answers (the
contract of `maas_inference.triton.generation_model`), checked on KServe-v2 requests."""
UPDATABLE = frozenset({"model", "track_alias", "traffic", "shadow", "serving"})


@dataclass(frozen=True)
class ServingDefaults:
    max_batch_size: int = 32
    max_queue_delay_microseconds: int = 100
    drain_seconds: float = 30.0
    load_timeout_seconds: float = 120.0
    generation: GenerationServing = GenerationServing()
    """How generative versions' engines run (streams decoded together, queued, threads)."""


@dataclass(frozen=True)
class ReplicaLoad:
    """Whether this replica serves what the deployment's record holds, and if not, why."""

    state: str
    """READY when it does; FAILED when its Triton could not load it (retried at the next
    change, resync or restart); UNAVAILABLE while it waits to retry (registry or Triton
    unreachable)."""
    message: str = ""


@dataclass(frozen=True)
class LeasePolicy:
    """How creates and rollouts are guarded against the replica performing them dying."""

    lease_seconds: float = 15.0
    """How long a lease lasts unrenewed (renewed every third of it while loading)."""
    max_takeovers: int = 2
    """How many times an interrupted create or rollout is taken over before it is given up
    (a create recorded FAILED, a rollout rolled back)."""


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def triton_model_name(deployment_id: str, version_name: str) -> str:
    """`{deployment}.{model}.v{n}`: deployment ids hold no '.', so names never collide."""
    _, model_id, _, version_id = version_name.split("/")
    if len(deployment_id) + len(model_id) + len(version_id) > 100:  # Triton caps names
        model_id = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return f"{deployment_id}.{model_id}.v{version_id}"


class DeploymentController:
    """Deployments' use cases (one method per CRUD RPC), rollouts, reloads and alias tracking.

    The only writer of the `RouteTable`."""

    def __init__(self, store: DeploymentStore, registry: RegistryClient, triton: TritonClient,
                 repository: ModelRepository, artifact_dir: Path, defaults: ServingDefaults,
                 routes: RouteTable, page_tokens: PageTokenCodec,
                 leases: LeasePolicy = LeasePolicy()) -> None:
        self._store = store
        self._leases = leases
        self._lease_owner = store.replica_id or uuid.uuid4().hex
        self._registry = registry
        self._triton = triton
        self._repository = repository
        self._onnx_backend = OnnxBackendProbe(triton, repository)
        self._artifacts = artifact_dir
        self._artifacts.mkdir(parents=True, exist_ok=True)
        self._defaults = defaults
        self._routes = routes
        self._page_tokens = page_tokens
        self._locks: dict[str, asyncio.Lock] = {}
        self._download_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._replica_loads: dict[str, ReplicaLoad] = {}

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
        artifact_format = ArtifactFormat(format_name)
        signature = version.get("signature") or {}
        if not artifact_format.generative and (not signature.get("inputs") or
                                               not signature.get("outputs")):
            raise errors.FailedPrecondition(f"{version['name']} has no signature to serve",
                                            reason="NO_SIGNATURE")
        name = triton_model_name(deployment_id, version["name"])
        artifact = self._artifacts / version["artifact"]["sha256"]
        async with self._download_locks.setdefault(artifact.name, asyncio.Lock()):
            if not artifact.exists():
                await self._registry.download_model_version(version, artifact)
        if artifact_format.generative:
            return await self._load_generative(name, version, artifact_format, artifact)
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
                                                       ships_onnx_graph=ships_onnx_graph),
                           artifact=artifact)

    async def _load_generative(self, name: str, version: dict, artifact_format: ArtifactFormat,
                               artifact: Path) -> ServedModel:
        """A GGUF or causal-LM version as the decoupled generation model: one instance, no
        Triton batching (its engine batches the running streams), the generation contract's
        tensors whatever the version's signature says."""
        spec = TritonModelSpec(
            name=name, artifact_format=artifact_format, inputs=(), outputs=(),
            batching=BatchingPolicy(max_batch_size=0, dynamic_batching=False),
            generation=self._defaults.generation)
        await asyncio.to_thread(self._repository.write_model, spec, artifact)
        await self._triton.load_model(name)
        await self._triton.wait_model_ready(name, timeout=self._defaults.load_timeout_seconds)
        return ServedModel(version["name"], name,
                           ServingSignature.from_version(GENERATION_SIGNATURE, 0),
                           runtime=runtime_description(artifact_format, spec.runtime),
                           artifact=artifact)

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
            await self._unload({m.triton_model for m in loaded},
                               keep=self._routes.models_in_use())
            raise
        resolved = {t["model_version"]: m.version for t, (m, _) in zip(targets, served,
                                                                        strict=True)}
        if shadow_model is not None:
            resolved[spec["shadow"]["model_version"]] = shadow_model.version
        return route, resolved

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
            "etag": new_etag(),
        }

    # -- use cases ----------------------------------------------------------------------------

    async def create(self, deployment_id: str, fields: dict, principal: Principal) -> dict:
        validate_deployment_id(deployment_id, "deployment_id")
        spec = self._normalized_spec(fields)
        _require_models(principal, spec)
        self._routes.require_triton()
        async with self._lock(deployment_id):
            creating = self._record(deployment_id, spec, CREATING)
            await asyncio.to_thread(self._store.create, deployment_id, creating,
                                    self._lease_owner, self._leases.lease_seconds)
            try:
                async with self._lease_renewed(deployment_id):
                    route, resolved = await self._build_route(deployment_id, spec)
            except BaseException:
                # Only the record this create wrote (not one another replica took over).
                await asyncio.to_thread(self._store.delete, deployment_id, creating["etag"])
                raise
            await self._routes.switch(deployment_id, LiveRoute(route))
            record = self._record(deployment_id, spec, READY, route=route, resolved=resolved)
            try:
                await asyncio.to_thread(self._store.put, deployment_id, record,
                                        creating["etag"])
            except errors.Aborted:
                # Deleted through another replica while it loaded here, or taken over by one
                # after this replica stalled past its create lease.
                await self._routes.remove(deployment_id)
                await self._unload(route.models, keep=self._routes.models_in_use())
                try:
                    await asyncio.to_thread(self._store.get, deployment_id)
                except errors.NotFound:
                    raise errors.Aborted(f"deployments/{deployment_id} was deleted while it was "
                                         "being created", reason="DELETED_WHILE_CREATING") from None
                raise errors.Aborted(f"deployments/{deployment_id}: this replica's create "
                                     "lease lapsed and another replica took the create over",
                                     reason="CREATE_TAKEN_OVER") from None
            self._replica_loads[deployment_id] = ReplicaLoad(READY)
        return self._view(deployment_id, record)

    @contextlib.asynccontextmanager
    async def _lease_renewed(self, deployment_id: str) -> AsyncIterator[None]:
        """Renew this replica's lease on the deployment (a create or rollout) while the body
        runs."""
        seconds = self._leases.lease_seconds

        async def renew() -> None:
            while True:
                await asyncio.sleep(seconds / 3)
                try:
                    held = await asyncio.to_thread(self._store.renew_lease, deployment_id,
                                                   self._lease_owner, seconds)
                except Exception as exc:  # the database, briefly: the next renewal may work
                    _log.warning("renewing the lease of deployments/%s failed: %r",
                                 deployment_id, exc)
                    continue
                if not held:
                    _log.warning("the lease of deployments/%s is no longer this replica's",
                                 deployment_id)
                    return

        renewing = asyncio.get_running_loop().create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def take_over_lapsed_leases(self) -> None:
        """Take over and finish every create or rollout whose replica stopped renewing its
        lease (it died, or stalled past it): one replica takes each."""
        for deployment_id in await asyncio.to_thread(self._store.lapsed_leases):
            await self._take_over(deployment_id)

    async def _take_over(self, deployment_id: str) -> None:
        async with self._lock(deployment_id):
            if await self._rolled_out_by_an_older_replica(deployment_id):
                return
            taken = await asyncio.to_thread(self._store.take_over, deployment_id,
                                            self._lease_owner, self._leases.lease_seconds)
            if taken is None:
                return  # finished, deleted, or being taken over by another replica
            record = taken.record
            rollout = record["state"] == ROLLING_OUT
            what = "rollout" if rollout else "create"
            if taken.interruptions > self._leases.max_takeovers:
                await self._give_up(deployment_id, record, (
                    f"the {what} was interrupted {taken.interruptions} times (each replica "
                    f"{'rolling it out' if rollout else 'creating it'} stopped while loading "
                    "it)" + ("" if rollout else "; delete the deployment and create it again")))
                return
            if rollout:
                target = record.get("rollout")
                if not target:  # left by a replica from before rollouts recorded their target
                    await self._give_up(deployment_id, record,
                                        "it was left unfinished by a replica of an older "
                                        "release")
                    return
                spec, pinned = target["spec"], target.get("pinned")
            else:
                spec, pinned = {key: record[key] for key in UPDATABLE}, None
            _log.info("deployments/%s: taking over its %s (interrupted %d time(s))",
                      deployment_id, what, taken.interruptions)
            try:
                self._routes.require_triton()
                async with self._lease_renewed(deployment_id):
                    route, resolved = await self._build_route(deployment_id, spec, pinned)
            except errors.Unavailable as exc:  # the registry or Triton, briefly: retried
                _log.warning("taking over the %s of deployments/%s must wait: %s", what,
                             deployment_id, exc.message)
                await asyncio.to_thread(self._store.release_lease, deployment_id,
                                        self._lease_owner)
                return
            except errors.MaasError as exc:  # nobody waits for the answer: the record says it
                await self._give_up(deployment_id, record, exc.message if rollout
                                    else f"create failed: {exc.message}")
                return
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._store.release_lease, deployment_id,
                                            self._lease_owner)
                raise
            try:
                if rollout:
                    await self._switch_to_rollout(deployment_id, record, spec, route, resolved)
                else:
                    await self._record_created(deployment_id, record, spec, route, resolved)
            except errors.Aborted:  # deleted (or taken over again) meanwhile
                return
            _log.info("deployments/%s: %s finished after a takeover: serving %s", deployment_id,
                      what, ", ".join(model.version for model, _ in route.targets))

    async def _rolled_out_by_an_older_replica(self, deployment_id: str) -> bool:
        """Whether the deployment is ROLLING_OUT, written without a lease or a target by a
        replica of an older release (a rolling upgrade of the service), more recently than a
        load may take: that replica may still be loading; once it is older, the rollout is
        taken over (and rolled back: its target is unknown). True as well when the deployment
        is gone."""
        try:
            record = await asyncio.to_thread(self._store.get, deployment_id)
        except errors.NotFound:
            return True
        if record["state"] != ROLLING_OUT or record.get("rollout"):
            return False
        try:
            age = datetime.now(UTC) - datetime.fromisoformat(record["update_time"])
        except (KeyError, TypeError, ValueError):  # no (zone-aware) time: not to be waited for
            return False
        return age.total_seconds() < self._defaults.load_timeout_seconds

    async def _record_created(self, deployment_id: str, creating: dict, spec: dict,
                              route: Route, resolved: dict) -> None:
        """Serve a taken-over create's route and record it READY (ABORTED, the route dropped,
        when the record changed meanwhile)."""
        await self._routes.switch(deployment_id, LiveRoute(route))
        ready = self._record(deployment_id, spec, READY, route=route, resolved=resolved,
                             created=creating.get("create_time"))
        self._replica_loads[deployment_id] = ReplicaLoad(READY)
        try:
            await asyncio.to_thread(self._store.put, deployment_id, ready, creating["etag"])
        except errors.Aborted:
            self._replica_loads.pop(deployment_id, None)
            await self._routes.remove(deployment_id)
            await self._unload(route.models, keep=self._routes.models_in_use())
            raise

    async def _give_up(self, deployment_id: str, record: dict, why: str) -> None:
        """End a taken-over operation that cannot complete: a create recorded FAILED, a
        rollout rolled back to what the deployment served before it (READY; FAILED when it
        served nothing), saying why; nothing is loaded for it."""
        if record["state"] == ROLLING_OUT:
            ended = _rolled_back(record, f"rollout to {', '.join(_rollout_versions(record))} "
                                         f"rolled back: {why}")
            _log.warning("deployments/%s: %s; now %s, serving %s", deployment_id,
                         ended["message"], ended["state"],
                         ", ".join(ended.get("serving_versions") or []) or "nothing")
        else:
            ended = {**record, "state": FAILED, "message": why, "update_time": _now(),
                     "etag": new_etag()}
            _log.error("deployments/%s: %s", deployment_id, why)
        with contextlib.suppress(errors.Aborted):  # deleted meanwhile
            await asyncio.to_thread(self._store.put, deployment_id, ended, record["etag"])

    async def get(self, name: str, principal: Principal) -> dict:
        """One deployment; PERMISSION_DENIED (MODEL_OUT_OF_SCOPE) unless the token may see
        every model it serves, as the registry answers a scoped read."""
        deployment_id = parse_deployment_name(name, "name")
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
        deployment_id = parse_deployment_name(fields.get("name", ""), "deployment.name")
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
        """Load the new route, switch to it, drain and unload what is no longer used.

        The record is taken for the rollout only if it is still `current` (compare-and-set
        on its etag, ABORTED otherwise), so of replicas that change a deployment at once
        (two updates, or every replica following an alias move) exactly one performs and
        records the rollout; the others follow its record. Only the taker writes after it,
        under the rollout's lease; the ROLLING_OUT record keeps what was served and says
        where the rollout goes (`rollout`), for a replica that takes it over should this one
        die (see the module doc)."""
        self._routes.require_triton()
        rolling = {**current, "state": ROLLING_OUT, "update_time": _now(), "etag": new_etag(),
                   "rollout": {"spec": spec, "pinned": pinned,
                               "from_state": _state_before_rollout(current)}}
        await asyncio.to_thread(self._store.put, deployment_id, rolling, current["etag"],
                                self._lease_owner, self._leases.lease_seconds)
        try:
            async with self._lease_renewed(deployment_id):
                route, resolved = await self._build_route(deployment_id, spec, pinned)
        except BaseException as exc:
            # Deleted meanwhile, or taken over after this replica stalled: not restored here.
            with contextlib.suppress(errors.Aborted):
                await asyncio.to_thread(self._store.put, deployment_id,
                                        _rolled_back(rolling, f"rollout failed: {exc}"),
                                        rolling["etag"])
            raise
        record = await self._switch_to_rollout(deployment_id, rolling, spec, route, resolved)
        return self._view(deployment_id, record)

    async def _switch_to_rollout(self, deployment_id: str, rolling: dict, spec: dict,
                                 route: Route, resolved: dict) -> dict:
        """Switch to a rollout's loaded route and record it READY while the record is still
        `rolling`; then drain and unload what is retired. ABORTED when another replica
        changed or deleted the record meanwhile (it took the rollout over after this one
        stalled past its lease, or a delete came first): the route switched back to what was
        served before and the new models unloaded (this replica's follower goes on from the
        record)."""
        previous = self._routes.get(deployment_id)
        # The switch (one assignment), and the data plane's, before anything is drained.
        await self._routes.switch(deployment_id, LiveRoute(route))
        record = self._record(deployment_id, spec, READY, route=route, resolved=resolved,
                              created=rolling.get("create_time"))
        try:
            await asyncio.to_thread(self._store.put, deployment_id, record, rolling["etag"])
        except errors.Aborted:
            if previous is not None:
                await self._routes.switch(deployment_id, previous)
                retired = route.models - previous.route.models
            else:
                await self._routes.remove(deployment_id)
                retired = route.models
            await self._routes.in_flight.drained(retired, self._defaults.drain_seconds)
            await self._unload(retired, keep=self._routes.models_in_use())
            raise
        self._replica_loads[deployment_id] = ReplicaLoad(READY)
        if previous is not None:
            retired = previous.route.models - route.models
            if not await self._routes.in_flight.drained(retired, self._defaults.drain_seconds):
                _log.warning("requests on %s did not drain in time; unloading anyway", retired)
            await self._unload(retired, keep=self._routes.models_in_use())
        return record

    async def delete(self, name: str, principal: Principal) -> None:
        deployment_id = parse_deployment_name(name, "name")
        async with self._lock(deployment_id):
            record = await asyncio.to_thread(self._store.get, deployment_id)  # NOT_FOUND first
            _require_models(principal, record)
            live = await self._routes.remove(deployment_id)
            await asyncio.to_thread(self._store.delete, deployment_id)
            self._replica_loads.pop(deployment_id, None)
            if live is not None:
                await self._routes.in_flight.drained(live.route.models,
                                                     self._defaults.drain_seconds)
                await self._unload(live.route.models, keep=self._routes.models_in_use())

    async def reload_all(self) -> None:
        """After a (re)start of Triton: load every deployment's pinned versions again."""
        after = ""
        while rows := await asyncio.to_thread(self._store.list, after, 100):
            for deployment_id, _ in rows:
                after = deployment_id
                await self._reload(deployment_id)

    async def _reload(self, deployment_id: str, attempt: int = 0) -> None:
        """Load one deployment's pinned versions on this replica's Triton; while the registry
        is unreachable, keep retrying in the background instead of giving up on it.

        The outcome is this replica's own (`replica_loads`): on a shared table the record is
        left alone, and a deployment another replica is still creating is not touched (the
        follower loads it once its writer recorded it READY). Only a single instance, the
        table's sole writer, settles a create or rollout its own crash interrupted."""
        async with self._lock(deployment_id):
            try:
                record = await asyncio.to_thread(self._store.get, deployment_id)
            except errors.NotFound:
                return  # deleted meanwhile
            # What a single instance writes below settles what the record serves: its
            # interrupted rollout's target is dropped with the ROLLING_OUT state.
            record.pop("rollout", None)
            if self._store.shared and record["state"] in (CREATING, FAILED):
                # CREATING: its writer is loading it (or, its create lease lapsed, a replica
                # takes it over); its READY record is followed. FAILED: nothing to serve.
                return
            spec = {key: record[key] for key in UPDATABLE}
            try:
                route, _ = await self._build_route(deployment_id, spec, record.get("resolved"))
            except errors.Unavailable as exc:
                delay = min(30.0, 0.5 * 2**attempt)
                self._replica_loads[deployment_id] = ReplicaLoad(
                    UNAVAILABLE, f"reload waits {delay:.1f}s: {exc.message}")
                _log.warning("reloading %s must wait %.1fs: %s", deployment_id, delay,
                             exc.message)
                self._spawn(self._reload_later(deployment_id, attempt + 1, delay))
                return
            except errors.MaasError as exc:
                self._replica_loads[deployment_id] = ReplicaLoad(
                    FAILED, f"reload failed: {exc.message}")
                _log.error("could not reload deployments/%s on this replica: %s",
                           deployment_id, exc.message)
                if not self._store.shared and record["state"] in (CREATING, ROLLING_OUT):
                    await asyncio.to_thread(self._store.put, deployment_id, {
                        **record, "state": FAILED, "message": f"reload failed: {exc.message}"})
                return
            previous = self._routes.get(deployment_id)
            await self._routes.switch(deployment_id, LiveRoute(
                route, previous.shadow_stats if previous else ShadowStats()))
            self._replica_loads[deployment_id] = ReplicaLoad(READY)
            if not self._store.shared and record["state"] in (CREATING, ROLLING_OUT, FAILED):
                await asyncio.to_thread(self._store.put, deployment_id,
                                        {**record, "state": READY, "message": ""})

    async def _reload_later(self, deployment_id: str, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._reload(deployment_id, attempt)

    # -- replicas sharing the table (maas_inference.replicas) -------------------------------------

    def live_deployments(self) -> set[str]:
        """Ids of the deployments this replica serves now."""
        return set(self._routes.routes())

    def replica_loads(self) -> dict[str, ReplicaLoad]:
        """Per deployment, whether this replica serves what its record holds (metrics)."""
        return dict(self._replica_loads)

    async def follow_table(self, deployment_id: str) -> dict | None:
        """Serve what the table holds for the deployment now, after another replica changed
        it: load its pinned versions on this replica's Triton and switch (retired models
        drained, then unloaded), or drop the route of a deployment that is gone. Writes
        nothing: the replica that made the change keeps the record. Returns the record
        followed, None when the deployment is gone; raises when loading failed (retried by
        the caller)."""
        async with self._lock(deployment_id):
            try:
                record = await asyncio.to_thread(self._store.get, deployment_id)
            except errors.NotFound:
                record = None
            previous = self._routes.get(deployment_id)
            if record is None:
                self._replica_loads.pop(deployment_id, None)
                if previous is not None:
                    await self._routes.remove(deployment_id)
            else:
                spec = {key: record[key] for key in UPDATABLE}
                try:
                    self._routes.require_triton()
                    route, _ = await self._build_route(deployment_id, spec,
                                                       record.get("resolved"))
                except errors.MaasError as exc:
                    self._replica_loads[deployment_id] = ReplicaLoad(
                        UNAVAILABLE if isinstance(exc, errors.Unavailable) else FAILED,
                        f"could not load {', '.join(record.get('serving_versions') or [])}: "
                        f"{exc.message}")
                    raise
                await self._routes.switch(deployment_id, LiveRoute(
                    route, previous.shadow_stats if previous else ShadowStats()))
                self._replica_loads[deployment_id] = ReplicaLoad(READY)
            if previous is not None:
                retired = previous.route.models - self._routes.models_in_use()
                await self._routes.in_flight.drained(retired, self._defaults.drain_seconds)
                await self._unload(retired, keep=self._routes.models_in_use())
            return record

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Cancel pending reload retries."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

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
            except errors.Aborted:
                _log.info("%s: another replica rolls out the alias move; following its record",
                          deployment_id)
            except errors.MaasError as exc:
                _log.warning("could not follow alias for %s: %s", deployment_id, exc.message)

    # -- views ----------------------------------------------------------------------------------

    def _view(self, deployment_id: str, record: dict) -> dict:
        view = {key: value for key, value in record.items()
                if key not in ("resolved", "rollout")}
        if not view.get("shadow"):
            view.pop("shadow", None)
        if record["state"] == READY and not self._routes.triton_serving():
            view["state"] = UNAVAILABLE
        local = self._replica_loads.get(deployment_id)
        if record["state"] == READY and local is not None and local.state != READY:
            # This replica cannot serve what the record says (the record stays as written).
            view["state"] = local.state
            view["message"] = f"on this replica: {local.message}"
        live = self._routes.get(deployment_id)
        if live is not None and live.route.shadow is not None:
            view["shadow_stats"] = live.shadow_stats.as_dict()
        return view


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


def _state_before_rollout(record: dict) -> str:
    """What a deployment was before the rollout now starting from (or in) `record`: READY
    when it served its versions, FAILED otherwise (a failed or unfinished create)."""
    state = record["state"]
    if state == ROLLING_OUT:
        state = (record.get("rollout") or {}).get("from_state") or (
            READY if record.get("serving_versions") else FAILED)  # from before it was kept
    return READY if state == READY else FAILED


def _rolled_back(rolling: dict, why: str) -> dict:
    """The record of a rollout that did not happen: what it served before (the ROLLING_OUT
    record kept it), READY again or FAILED when it served nothing, saying why."""
    before = {key: value for key, value in rolling.items() if key != "rollout"}
    return {**before, "state": _state_before_rollout(rolling), "message": why,
            "update_time": _now(), "etag": new_etag()}


def _rollout_versions(rolling: dict) -> list[str]:
    """Where a ROLLING_OUT record goes: its new traffic split's versions (or model)."""
    spec = (rolling.get("rollout") or {}).get("spec")
    if not spec:
        return ["an unrecorded target"]
    return [target["model_version"] for target in spec.get("traffic") or []] or [spec["model"]]


def _model_ids(spec: dict) -> set[str]:
    """Every model a deployment serves: its model, its traffic split and its shadow."""
    references = [spec["model"], *(t["model_version"] for t in spec.get("traffic") or [])]
    if spec.get("shadow"):
        references.append(spec["shadow"]["model_version"])
    return {scopes.model_id_of(reference) or reference for reference in references if reference}


def _require_models(principal: Principal, spec: dict) -> None:
    """A scoped token may only see, deploy, change or delete what serves only its models."""
    scopes.require_models(principal, _model_ids(spec))


def _scope_fingerprint(principal: Principal) -> str:
    """A page token is only good for the scope it was issued under (its cursor is the last
    id looked at, which may be a deployment this token cannot see)."""
    return query_fingerprint("deployments", *sorted(principal.model_scopes))
