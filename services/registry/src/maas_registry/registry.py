"""The registry's domain logic: validation, uploads, aliases, lineage, events, collection.

Transport-free: the servicer hands in plain values (dicts in the contract's JSON shape,
async iterators of chunks) and gets dicts back. Metadata goes through a `RegistryStore`,
bytes through a `BlobStore`; a version is committed to the store only after its bytes are
fully written, fsynced, verified and renamed into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from maas_formats import (
    SIGNATURE_REQUIRED_FORMATS,
    ArtifactFacts,
    DatasetFacts,
    ModelSignature,
)
from maas_runtime import errors, scopes
from maas_runtime.auth import Principal, Role
from maas_runtime.contract_enums import DATA_TYPE_PREFIX, DATA_TYPES
from maas_runtime.filtering import FilterSchema, MapField, ScalarField, ValueKind, parse_filter
from maas_runtime.names import parse_parent, parse_version_name, validate_alias, validate_id
from maas_runtime.pagination import PageTokenCodec, clamp_page_size

from maas_registry.blobs import BlobStore, CommitGate, StagedBlob, is_sha256_hex
from maas_registry.resources import DATASET_FORMATS, MODEL_FORMATS
from maas_registry.store import Mutation, Page, RegistryStore, Resource, VersionDraft

_log = logging.getLogger(__name__)

T = TypeVar("T")
Facts = TypeVar("Facts")

ArtifactValidator = Callable[..., ArtifactFacts]
"""`maas_formats.validate_model_artifact`: (path, format_name, *, format_field) -> facts."""
DatasetValidator = Callable[..., DatasetFacts]
"""`maas_formats.validate_dataset`: (path, format_name, feature_columns, label_column)."""
PageFetch = Callable[[int, dict[str, Any] | None], Page]

LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
MAX_LABEL_VALUE = 63
MAX_LABELS = 64
MAX_DESCRIPTION = 16 * 1024
DATATYPES = frozenset(DATA_TYPES)

MODEL_FILTERS = FilterSchema(
    [ScalarField("task", ValueKind.STRING), ScalarField("display_name", ValueKind.STRING),
     ScalarField("create_time", ValueKind.TIMESTAMP)],
    [MapField("labels", ValueKind.STRING)])
VERSION_FILTERS = FilterSchema(
    [ScalarField("format", ValueKind.ENUM, frozenset(MODEL_FORMATS.values())),
     ScalarField("create_time", ValueKind.TIMESTAMP),
     ScalarField("version_id", ValueKind.NUMBER), ScalarField("creator", ValueKind.STRING)],
    [MapField("labels", ValueKind.STRING), MapField("metrics", ValueKind.NUMBER)])
DATASET_FILTERS = FilterSchema(
    [ScalarField("display_name", ValueKind.STRING), ScalarField("create_time", ValueKind.TIMESTAMP)],
    [MapField("labels", ValueKind.STRING)])
DATASET_VERSION_FILTERS = FilterSchema(
    [ScalarField("format", ValueKind.ENUM, frozenset(DATASET_FORMATS.values())),
     ScalarField("create_time", ValueKind.TIMESTAMP), ScalarField("version_id", ValueKind.NUMBER)],
    [MapField("labels", ValueKind.STRING)])
AUDIT_FILTERS = FilterSchema(
    [ScalarField("principal", ValueKind.STRING), ScalarField("method", ValueKind.STRING),
     ScalarField("resource", ValueKind.STRING), ScalarField("create_time", ValueKind.TIMESTAMP)])

MODEL_UPDATABLE = frozenset({"display_name", "description", "task", "labels"})
VERSION_UPDATABLE = frozenset({"description", "labels"})
DATASET_UPDATABLE = frozenset({"display_name", "description", "labels"})


@dataclass(frozen=True)
class RegistryLimits:
    """Limits and pacing injected from settings."""

    max_artifact_bytes: int
    download_chunk_bytes: int
    gc_grace_seconds: float
    event_poll_seconds: float


@dataclass(frozen=True)
class ListResult:
    items: list[dict]
    next_page_token: str


class Registry:
    """Use cases of the registry, one method per RPC."""

    def __init__(self, store: RegistryStore, blobs: BlobStore, tokens: PageTokenCodec,
                 limits: RegistryLimits, artifact_validator: ArtifactValidator,
                 dataset_validator: DatasetValidator) -> None:
        self._store = store
        self._blobs = blobs
        self._tokens = tokens
        self._limits = limits
        self._validate_artifact = artifact_validator
        self._validate_dataset = dataset_validator
        self._new_events = asyncio.Condition()
        self._blob_commits = CommitGate()

    # -- helpers --------------------------------------------------------------------------

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """Store calls block on I/O: keep them off the event loop."""
        return await asyncio.to_thread(function, *args)

    def _list(self, fetch: PageFetch, page_size: int, page_token: str, fingerprint: str) -> ListResult:
        size = clamp_page_size(page_size)
        cursor = self._tokens.decode(page_token, fingerprint) if page_token else None
        page: Page = fetch(size, cursor)
        token = self._tokens.encode(page.next_cursor, fingerprint) if page.next_cursor else ""
        return ListResult(page.items, token)

    async def _notify(self) -> None:
        async with self._new_events:
            self._new_events.notify_all()

    @staticmethod
    def _mutation(principal: Principal, method: str) -> Mutation:
        return Mutation(principal.name, method)

    # -- models ---------------------------------------------------------------------------

    async def create_model(self, model_id: str, fields: dict, principal: Principal) -> dict:
        validate_id(model_id, "model_id")
        principal.require_model(model_id)
        _validate_metadata(fields, "model", MODEL_UPDATABLE)
        model = await self._run(self._store.create_model, model_id, fields,
                                self._mutation(principal, "CreateModel"))
        await self._notify()
        return model

    async def get_model(self, name: str, principal: Principal) -> dict:
        model_id = parse_parent(name, "models", "name")
        principal.require_model(model_id)
        return await self._run(self._store.get_model, model_id)

    async def list_models(self, page_size: int, page_token: str, filter_text: str,
                          principal: Principal) -> ListResult:
        expr = parse_filter(filter_text, MODEL_FILTERS)
        result = await self._run(
            self._list, lambda size, cursor: self._store.list_models(expr, size, cursor),
            page_size, page_token, f"models|{filter_text}")
        return _scoped(result, principal)

    async def update_model(self, fields: dict, update_mask: list[str],
                           principal: Principal) -> dict:
        model_id = parse_parent(fields.get("name", ""), "models", "model.name")
        principal.require_model(model_id)
        changes = _masked_changes(fields, update_mask, MODEL_UPDATABLE, "model")
        model = await self._run(self._store.update_model, model_id, changes,
                                fields.get("etag", ""), self._mutation(principal, "UpdateModel"))
        await self._notify()
        return model

    async def delete_model(self, name: str, force: bool, etag: str, principal: Principal) -> None:
        model_id = parse_parent(name, "models", "name")
        principal.require_model(model_id)
        if force:
            principal.require(Role.ADMIN, "force-delete a model")
        await self._run(self._store.delete_model, model_id, force, etag,
                        self._mutation(principal, "DeleteModel"))
        await self._notify()
        await self.collect_garbage(grace_seconds=self._limits.gc_grace_seconds)

    # -- model versions -------------------------------------------------------------------

    async def upload_model_version(self, parent: str, metadata: dict, expected_sha256: str,
                                   size_bytes: int, chunks: AsyncIterator[bytes],
                                   principal: Principal,
                                   require_existing_model: bool = False) -> dict:
        """A new version of `parent`'s model, created along with it when it does not exist
        (unless `require_existing_model`). A refused upload writes nothing at all."""
        model_id = parse_parent(parent, "models", "header.parent")
        principal.require_model(model_id)
        violations = errors.ViolationCollector()
        format_name = MODEL_FORMATS.get(metadata.get("format", ""), "")
        violations.check(bool(format_name), "header.model_version.format",
                         f"must be one of {sorted(MODEL_FORMATS)}")
        _check_upload_header(violations, expected_sha256, size_bytes,
                             self._limits.max_artifact_bytes)
        _check_metadata_into(violations, metadata, "header.model_version")
        metrics = _check_metrics(violations, metadata.get("metrics", {}),
                                 "header.model_version.metrics")
        declared_signature = _check_signature(violations, metadata.get("signature"),
                                              "header.model_version.signature")
        violations.check(
            format_name not in SIGNATURE_REQUIRED_FORMATS or _is_complete(declared_signature),
            "header.model_version.signature",
            f"is required for {metadata.get('format')}: the artifact carries none and serving "
            "names every input and output tensor (name, datatype, shape)")
        lineage = await self._check_lineage(violations, metadata.get("lineage", {}),
                                            "header.model_version.lineage")
        violations.raise_if_any("invalid upload header")
        if require_existing_model:
            await self._run(self._store.get_model, model_id)  # NOT_FOUND before any bytes
        mutation = self._mutation(principal, "UploadModelVersion")

        def record(draft: VersionDraft) -> dict:
            try:
                return self._store.commit_model_version(model_id, draft, mutation)
            except errors.NotFound:
                if require_existing_model:
                    raise
            # As the trainer's publish does: the first version brings its model along
            # (audited and announced as created by this upload).
            with contextlib.suppress(errors.AlreadyExists):
                self._store.create_model(model_id, {}, mutation)
            return self._store.commit_model_version(model_id, draft, mutation)

        def model_draft(staged: StagedBlob, facts: ArtifactFacts) -> VersionDraft:
            return VersionDraft(
                format=format_name, sha256=staged.sha256, size_bytes=staged.size_bytes,
                description=metadata.get("description", ""),
                # What the artifact says about itself (a GGUF header) wins over a claim.
                labels={**metadata.get("labels", {}), **facts.labels},
                lineage=lineage, creator=principal.name,
                signature=_reconcile_signature(declared_signature, facts.signature),
                metrics=metrics)

        version = await self._store_artifact(
            chunks, expected_sha256, size_bytes,
            functools.partial(self._validate_artifact, format_name=format_name,
                              format_field="header.model_version.format"),
            model_draft, record)
        await self._notify()
        return version

    async def _store_artifact(self, chunks: AsyncIterator[bytes], expected_sha256: str,
                              size_bytes: int, validate: Callable[[Path], Facts],
                              make_draft: Callable[[StagedBlob, Facts], VersionDraft],
                              record: Callable[[VersionDraft], Resource]) -> Resource:
        """Receive, verify and validate the bytes, move the blob into place and `record` the
        version (no collection in between). Any failure before the move discards the staged
        file: nothing partial survives a bad upload."""
        staged = await self._receive(chunks, expected_sha256, size_bytes)
        try:
            facts = await self._run(validate, staged.path)
            draft = make_draft(staged, facts)
        except BaseException:
            self._blobs.discard(staged)
            raise
        async with self._blob_commits.committing():
            try:
                await self._run(self._blobs.commit, staged)
            except BaseException:
                self._blobs.discard(staged)
                raise
            return await self._run(record, draft)

    async def _receive(self, chunks: AsyncIterator[bytes], expected_sha256: str,
                       size_bytes: int) -> StagedBlob:
        staged = await self._blobs.put_stream(chunks, self._limits.max_artifact_bytes)
        problem = None
        if size_bytes and staged.size_bytes != size_bytes:
            problem = errors.InvalidArgument.for_field(
                "header.size_bytes", f"declared {size_bytes} bytes but received "
                f"{staged.size_bytes} (truncated or overlong stream)", reason="SIZE_MISMATCH")
        elif expected_sha256 and staged.sha256 != expected_sha256:
            problem = errors.InvalidArgument.for_field(
                "header.expected_sha256", f"expected {expected_sha256} but the received bytes "
                f"hash to {staged.sha256}; nothing was stored", reason="DIGEST_MISMATCH")
        elif staged.size_bytes == 0:
            problem = errors.InvalidArgument.for_field("chunk", "the artifact is empty")
        if problem is not None:
            self._blobs.discard(staged)
            raise problem
        return staged

    async def _check_lineage(self, violations: errors.ViolationCollector, lineage: dict,
                             field_path: str) -> dict:
        parents = list(lineage.get("parents", []))
        wellformed = []
        for index, parent in enumerate(parents):
            collection = parent.split("/", 1)[0]
            if collection not in ("models", "datasets"):
                violations.add(f"{field_path}.parents[{index}]",
                               f"{parent!r} is not a model or dataset version name")
                continue
            try:
                ref = parse_version_name(parent, collection, f"{field_path}.parents[{index}]",
                                         allow_alias=False)
                wellformed.append((index, ref.name))
            except errors.InvalidArgument as exc:
                violations.violations.extend(exc.field_violations)
        existing = await self._run(self._store.existing_versions, [n for _, n in wellformed])
        for index, name in wellformed:
            violations.check(name in existing, f"{field_path}.parents[{index}]",
                             f"{name} does not exist")
        operation = lineage.get("operation") or {}
        if operation:
            violations.check(bool(operation.get("kind")), f"{field_path}.operation.kind",
                             "is required when an operation is given")
        result: dict[str, Any] = {"parents": [name for _, name in wellformed]}
        if operation:
            result["operation"] = operation
        return result

    async def get_model_version(self, name: str, principal: Principal) -> dict:
        ref = parse_version_name(name, "models", "name")
        principal.require_model(ref.parent_id)
        return await self._run(self._store.get_model_version, ref.parent_id, ref.version_id,
                               ref.alias)

    async def list_model_versions(self, parent: str, page_size: int, page_token: str,
                                  filter_text: str, principal: Principal) -> ListResult:
        model_id = parse_parent(parent, "models", "parent")
        principal.require_model(model_id)
        expr = parse_filter(filter_text, VERSION_FILTERS)
        return await self._run(
            self._list,
            lambda size, cursor: self._store.list_model_versions(model_id, expr, size, cursor),
            page_size, page_token, f"versions|{model_id}|{filter_text}")

    async def update_model_version(self, fields: dict, update_mask: list[str],
                                   principal: Principal) -> dict:
        ref = parse_version_name(fields.get("name", ""), "models", "model_version.name",
                                 allow_alias=False)
        principal.require_model(ref.parent_id)
        changes = _masked_changes(fields, update_mask, VERSION_UPDATABLE, "model_version")
        version = await self._run(self._store.update_model_version, ref.parent_id,
                                  ref.version_id, changes, fields.get("etag", ""),
                                  self._mutation(principal, "UpdateModelVersion"))
        return version

    async def delete_model_version(self, name: str, force: bool, principal: Principal) -> None:
        ref = parse_version_name(name, "models", "name", allow_alias=False)
        principal.require_model(ref.parent_id)
        if force:
            principal.require(Role.ADMIN, "force-delete a version that aliases point at")
        version = await self._run(self._store.get_model_version, ref.parent_id, ref.version_id)
        await self._run(self._store.delete_model_version, ref.parent_id, ref.version_id, force,
                        self._mutation(principal, "DeleteModelVersion"))
        await self._notify()
        await self._release_blob(version["artifact"]["sha256"])

    async def download_model_version(self, name: str, offset: int,
                                     principal: Principal) -> tuple[dict, Iterator[bytes]]:
        version = await self.get_model_version(name, principal)
        return version, self._chunks(version, offset)

    def _chunks(self, version: dict, offset: int) -> Iterator[bytes]:
        size = version["artifact"]["size_bytes"]
        if offset < 0 or offset > size:
            raise errors.OutOfRange(f"offset {offset} is outside the artifact's {size} bytes",
                                    reason="OFFSET_OUT_OF_RANGE",
                                    metadata={"size_bytes": str(size)})
        return self._blobs.read_chunks(version["artifact"]["sha256"], offset,
                                       self._limits.download_chunk_bytes)

    async def _release_blob(self, sha256: str) -> None:
        """Delete a blob once its last reference is gone and it is past the grace period (an
        upload of the same bytes may be about to reference it); collection is the backstop."""
        async with self._blob_commits.collecting():
            if not await self._run(self._store.is_referenced, sha256):
                await self._run(self._blobs.collect_one, sha256, self._limits.gc_grace_seconds)

    # -- aliases --------------------------------------------------------------------------

    async def set_alias(self, name: str, version: str, expected_version: str | None,
                        principal: Principal) -> dict:
        model_id, alias = _parse_alias_name(name, "name")
        principal.require_model(model_id)
        target = parse_version_name(version, "models", "version", allow_alias=False)
        if target.parent_id != model_id:
            raise errors.InvalidArgument.for_field(
                "version", f"{version} belongs to another model than the alias {name}")
        expected_id = None
        if expected_version is not None:
            expected_id = 0 if expected_version == "" else parse_version_name(
                expected_version, "models", "expected_version", allow_alias=False).version_id
        result = await self._run(self._store.set_alias, model_id, alias, target.version_id,
                                 expected_id, self._mutation(principal, "SetModelAlias"))
        await self._notify()
        return result

    async def delete_alias(self, name: str, principal: Principal) -> None:
        model_id, alias = _parse_alias_name(name, "name")
        principal.require_model(model_id)
        await self._run(self._store.delete_alias, model_id, alias,
                        self._mutation(principal, "DeleteModelAlias"))
        await self._notify()

    async def list_aliases(self, parent: str, principal: Principal) -> list[dict]:
        model_id = parse_parent(parent, "models", "parent")
        principal.require_model(model_id)
        return await self._run(self._store.list_aliases, model_id)

    # -- datasets -------------------------------------------------------------------------

    async def create_dataset(self, dataset_id: str, fields: dict, principal: Principal) -> dict:
        validate_id(dataset_id, "dataset_id")
        _validate_metadata(fields, "dataset", DATASET_UPDATABLE)
        dataset = await self._run(self._store.create_dataset, dataset_id, fields,
                                  self._mutation(principal, "CreateDataset"))
        await self._notify()
        return dataset

    async def get_dataset(self, name: str) -> dict:
        return await self._run(self._store.get_dataset, parse_parent(name, "datasets", "name"))

    async def list_datasets(self, page_size: int, page_token: str, filter_text: str) -> ListResult:
        expr = parse_filter(filter_text, DATASET_FILTERS)
        return await self._run(
            self._list, lambda size, cursor: self._store.list_datasets(expr, size, cursor),
            page_size, page_token, f"datasets|{filter_text}")

    async def update_dataset(self, fields: dict, update_mask: list[str],
                             principal: Principal) -> dict:
        dataset_id = parse_parent(fields.get("name", ""), "datasets", "dataset.name")
        changes = _masked_changes(fields, update_mask, DATASET_UPDATABLE, "dataset")
        return await self._run(self._store.update_dataset, dataset_id, changes,
                               fields.get("etag", ""), self._mutation(principal, "UpdateDataset"))

    async def delete_dataset(self, name: str, force: bool, principal: Principal) -> None:
        dataset_id = parse_parent(name, "datasets", "name")
        if force:
            principal.require(Role.ADMIN, "force-delete a dataset")
        await self._run(self._store.delete_dataset, dataset_id, force,
                        self._mutation(principal, "DeleteDataset"))
        await self._notify()
        await self.collect_garbage(grace_seconds=self._limits.gc_grace_seconds)

    async def upload_dataset_version(self, parent: str, metadata: dict, expected_sha256: str,
                                     size_bytes: int, chunks: AsyncIterator[bytes],
                                     principal: Principal) -> dict:
        dataset_id = parse_parent(parent, "datasets", "header.parent")
        violations = errors.ViolationCollector()
        format_name = DATASET_FORMATS.get(metadata.get("format", ""), "")
        violations.check(bool(format_name), "header.dataset_version.format",
                         f"must be one of {sorted(DATASET_FORMATS)}")
        _check_upload_header(violations, expected_sha256, size_bytes,
                             self._limits.max_artifact_bytes)
        _check_metadata_into(violations, metadata, "header.dataset_version")
        schema = metadata.get("schema") or {}
        feature_columns = list(schema.get("feature_columns", []))
        label_column = schema.get("label_column", "")
        violations.check(bool(feature_columns), "header.dataset_version.schema.feature_columns",
                         "at least one feature column is required")
        violations.check(bool(label_column), "header.dataset_version.schema.label_column",
                         "is required")
        lineage = await self._check_lineage(violations, metadata.get("lineage", {}),
                                            "header.dataset_version.lineage")
        violations.raise_if_any("invalid upload header")
        await self._run(self._store.get_dataset, dataset_id)

        def dataset_draft(staged: StagedBlob, facts: DatasetFacts) -> VersionDraft:
            return VersionDraft(
                format=format_name, sha256=staged.sha256, size_bytes=staged.size_bytes,
                description=metadata.get("description", ""), labels=metadata.get("labels", {}),
                lineage=lineage, creator=principal.name, row_count=facts.row_count,
                schema={"feature_columns": feature_columns, "label_column": label_column,
                        "feature_shape": list(facts.feature_shape),
                        "num_classes": facts.num_classes})

        version = await self._store_artifact(
            chunks, expected_sha256, size_bytes,
            functools.partial(self._validate_dataset, format_name=format_name,
                              feature_columns=feature_columns, label_column=label_column),
            dataset_draft,
            functools.partial(self._store.commit_dataset_version, dataset_id,
                              by=self._mutation(principal, "UploadDatasetVersion")))
        await self._notify()
        return version

    async def get_dataset_version(self, name: str) -> dict:
        ref = parse_version_name(name, "datasets", "name", allow_alias=False)
        return await self._run(self._store.get_dataset_version, ref.parent_id, ref.version_id)

    async def list_dataset_versions(self, parent: str, page_size: int, page_token: str,
                                    filter_text: str) -> ListResult:
        dataset_id = parse_parent(parent, "datasets", "parent")
        expr = parse_filter(filter_text, DATASET_VERSION_FILTERS)
        return await self._run(
            self._list,
            lambda size, cursor: self._store.list_dataset_versions(dataset_id, expr, size, cursor),
            page_size, page_token, f"dataset-versions|{dataset_id}|{filter_text}")

    async def delete_dataset_version(self, name: str, principal: Principal) -> None:
        ref = parse_version_name(name, "datasets", "name", allow_alias=False)
        version = await self._run(self._store.get_dataset_version, ref.parent_id, ref.version_id)
        await self._run(self._store.delete_dataset_version, ref.parent_id, ref.version_id,
                        self._mutation(principal, "DeleteDatasetVersion"))
        await self._notify()
        await self._release_blob(version["artifact"]["sha256"])

    async def download_dataset_version(self, name: str,
                                       offset: int) -> tuple[dict, Iterator[bytes]]:
        version = await self.get_dataset_version(name)
        return version, self._chunks(version, offset)

    # -- lineage, audit, events -----------------------------------------------------------

    async def get_lineage(self, name: str, direction: str, max_depth: int,
                          principal: Principal) -> dict:
        collection = "datasets" if name.startswith("datasets/") else "models"
        if collection == "models":
            version = await self.get_model_version(name, principal)  # resolves aliases
        else:
            version = await self.get_dataset_version(name)
        root = version["name"]
        depth = max_depth or 50
        if not 1 <= depth <= 50:
            raise errors.InvalidArgument.for_field("max_depth", "must be between 1 and 50")
        edges = await self._run(self._store.lineage_edges, root, direction, depth)
        names = {root} | {p for p, _ in edges} | {c for _, c in edges}
        lineage = await self._run(self._store.version_lineage, names)
        nodes = []
        for node in sorted(names):
            operation = (lineage.get(node) or {}).get("operation") or {}
            nodes.append({"name": node, "operation": operation.get("kind", ""),
                          "job": operation.get("job", "")})
        visible = {n["name"] for n in nodes if scopes.may_see_resource(principal, n["name"])}
        return {"root": root, "nodes": [n for n in nodes if n["name"] in visible],
                "edges": [{"parent": p, "child": c} for p, c in edges
                          if p in visible and c in visible]}

    async def list_audit_events(self, page_size: int, page_token: str, filter_text: str,
                                principal: Principal) -> ListResult:
        expr = parse_filter(filter_text, AUDIT_FILTERS)
        result = await self._run(
            self._list, lambda size, cursor: self._store.list_audit_events(expr, size, cursor),
            page_size or 100, page_token, f"audit|{filter_text}")
        # A scoped token sees only its models' records (pages may then come back shorter).
        return ListResult([e for e in result.items
                           if scopes.may_see_resource(principal, e["resource"])],
                          result.next_page_token)

    async def watch_events(self, after_event_id: int, resource_prefix: str,
                           types: Iterable[str], principal: Principal) -> AsyncIterator[dict]:
        """Every event after `after_event_id`, then live ones, forever (until cancelled)."""
        if after_event_id < 0:
            raise errors.InvalidArgument.for_field("after_event_id", "must not be negative")
        wanted = set(types)
        cursor = after_event_id
        while True:
            batch = await self._run(self._store.events_after, cursor, 500)
            for event in batch:
                cursor = event["event_id"]
                if event["resource"].startswith(resource_prefix) and (
                        not wanted or event["type"] in wanted) and scopes.may_see_resource(
                            principal, event["resource"]):
                    yield event
            if len(batch) == 500:
                continue
            # Local writes wake us at once; other replicas' writes within a poll. The timeout
            # runs in this task (not wait_for's inner one), so when the caller leaves during
            # the wait, Condition.wait has re-acquired the lock before `async with` releases
            # it ("Lock is not acquired" otherwise, INTERNAL for the watcher).
            async with self._new_events:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._limits.event_poll_seconds):
                        await self._new_events.wait()

    async def collect_garbage(self, grace_seconds: float | None = None) -> list[str]:
        """Delete blobs no version references (and abandoned staging files)."""
        grace = self._limits.gc_grace_seconds if grace_seconds is None else grace_seconds
        async with self._blob_commits.collecting():
            referenced = await self._run(self._store.referenced_digests)
            removed = await self._run(self._blobs.collect, referenced, grace)
        if removed:
            _log.info("collected %d unreferenced blobs", len(removed))
        return removed


# -- validation helpers -----------------------------------------------------------------------


def _parse_alias_name(name: str, field_path: str) -> tuple[str, str]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "aliases":
        raise errors.InvalidArgument.for_field(
            field_path, f"must look like 'models/{{model}}/aliases/{{alias}}', got {name!r}")
    return validate_id(parts[1], field_path), validate_alias(parts[3], field_path)


def _check_upload_header(violations: errors.ViolationCollector, expected_sha256: str,
                         size_bytes: int, limit: int) -> None:
    if expected_sha256:
        violations.check(is_sha256_hex(expected_sha256), "header.expected_sha256",
                         "must be 64 lower-case hex characters")
    violations.check(size_bytes >= 0, "header.size_bytes", "must not be negative")
    if size_bytes > limit:
        raise errors.ResourceExhausted(
            f"header.size_bytes {size_bytes} exceeds the limit of {limit} bytes",
            reason="ARTIFACT_TOO_LARGE", metadata={"limit_bytes": str(limit)},
            field_violations=[errors.FieldViolation("header.size_bytes",
                                                    f"exceeds the limit of {limit} bytes")])


def _check_metadata_into(violations: errors.ViolationCollector, fields: Resource, prefix: str) -> None:
    description = fields.get("description", "")
    violations.check(len(description) <= MAX_DESCRIPTION, f"{prefix}.description",
                     f"must be at most {MAX_DESCRIPTION} characters")
    labels = fields.get("labels", {})
    violations.check(len(labels) <= MAX_LABELS, f"{prefix}.labels",
                     f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        violations.check(bool(LABEL_KEY.match(key)), f"{prefix}.labels",
                         f"key {key!r} must match {LABEL_KEY.pattern}")
        violations.check(len(value) <= MAX_LABEL_VALUE, f"{prefix}.labels.{key}",
                         f"must be at most {MAX_LABEL_VALUE} characters")


def _validate_metadata(fields: dict, prefix: str, allowed: frozenset[str]) -> None:
    violations = errors.ViolationCollector()
    _check_metadata_into(violations, fields, prefix)
    for key in ("display_name", "task"):
        if key in allowed:
            violations.check(len(fields.get(key, "")) <= 256, f"{prefix}.{key}",
                             "must be at most 256 characters")
    violations.raise_if_any()


def _check_metrics(violations: errors.ViolationCollector, metrics: dict[str, Any],
                   field_path: str) -> dict[str, float]:
    result = {}
    for key, value in metrics.items():
        if not LABEL_KEY.match(key):
            violations.add(field_path, f"metric name {key!r} must match {LABEL_KEY.pattern}")
        elif not isinstance(value, int | float) or not math.isfinite(value):
            violations.add(f"{field_path}.{key}", "must be a finite number")
        else:
            result[key] = float(value)
    return result


def _check_signature(violations: errors.ViolationCollector, signature: Resource | None,
                     field_path: str) -> Resource | None:
    if not signature:
        return None
    normalized = {}
    for side in ("inputs", "outputs"):
        specs, seen = [], set()
        for index, spec in enumerate(signature.get(side, [])):
            path = f"{field_path}.{side}[{index}]"
            name = spec.get("name", "")
            violations.check(bool(name), f"{path}.name", "is required")
            violations.check(name not in seen, f"{path}.name", f"duplicate tensor name {name!r}")
            seen.add(name)
            datatype = spec.get("datatype", "")
            violations.check(datatype in DATATYPES, f"{path}.datatype",
                             f"must be one of {sorted(DATATYPES)}")
            shape = [int(d) for d in spec.get("shape", [])]
            violations.check(all(d == -1 or d > 0 for d in shape), f"{path}.shape",
                             "dimensions must be positive or -1 (variable)")
            specs.append({"name": name, "datatype": datatype, "shape": shape})
        normalized[side] = specs
    return normalized


def _is_complete(signature: dict | None) -> bool:
    return bool(signature and signature.get("inputs") and signature.get("outputs"))


def _reconcile_signature(declared: Resource | None,
                         from_artifact: ModelSignature | None) -> Resource:
    """The manifest's signature (a `maas_formats.ModelSignature`) wins; a declared one must
    agree with it."""
    if from_artifact is None:
        return declared or {}
    manifest = {side: [{"name": s.name, "datatype": f"{DATA_TYPE_PREFIX}{s.datatype}",
                        "shape": list(s.shape)} for s in getattr(from_artifact, side)]
                for side in ("inputs", "outputs")}
    if declared and declared != manifest:
        raise errors.InvalidArgument.for_field(
            "header.model_version.signature",
            f"disagrees with the package manifest's signature {manifest}")
    return manifest


def _masked_changes(fields: dict, update_mask: list[str], allowed: frozenset[str],
                    prefix: str) -> dict:
    if not update_mask:
        raise errors.InvalidArgument.for_field("update_mask", "name at least one field")
    unknown = sorted(set(update_mask) - allowed)
    if unknown:
        raise errors.InvalidArgument.for_field(
            "update_mask", f"cannot update {unknown}; updatable: {sorted(allowed)}")
    changes = {path: fields.get(path, {} if path == "labels" else "") for path in update_mask}
    _validate_metadata(changes, prefix, allowed)
    return changes


def _scoped(result: ListResult, principal: Principal) -> ListResult:
    """Only the items in the token's model scope (pages may then come back shorter)."""
    return ListResult(scopes.visible(principal, result.items,
                                     lambda item: [item["name"].split("/")[1]]),
                      result.next_page_token)
