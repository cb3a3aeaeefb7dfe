"""Registry metadata store: an abstract interface and its SQL implementation.

Every mutation runs in one transaction that also writes its audit event and its registry
event (a transactional outbox), so the audit log and the event stream can never disagree
with the data. Writers are serialised (SQLite's write lock; a PostgreSQL advisory lock),
which makes event ids commit in order: a watcher resuming after id N misses nothing.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from maas_runtime.contract_enums import (
    EVENT_TYPE_ALIAS_DELETED,
    EVENT_TYPE_ALIAS_MOVED,
    EVENT_TYPE_DATASET_CREATED,
    EVENT_TYPE_DATASET_DELETED,
    EVENT_TYPE_DATASET_VERSION_CREATED,
    EVENT_TYPE_DATASET_VERSION_DELETED,
    EVENT_TYPE_MODEL_CREATED,
    EVENT_TYPE_MODEL_DELETED,
    EVENT_TYPE_MODEL_VERSION_CREATED,
    EVENT_TYPE_MODEL_VERSION_DELETED,
)
from maas_runtime.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from maas_runtime.filtering import Operator, apply_operator, compile_filter
from sqlalchemy import (
    Connection,
    Engine,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from maas_registry import schema as t
from maas_registry.resources import (
    DATASET_FORMAT_ENUM,
    MODEL_FORMAT_ENUM,
    alias_name,
    dataset_name,
    dataset_version_name,
    model_name,
    model_version_name,
    timestamp,
    utc_now,
)

Resource = dict[str, Any]
_WRITE_LOCK_KEY = 0x6D616174  # serialises registry writers on PostgreSQL


@dataclass(frozen=True)
class Mutation:
    """Who is changing the registry, through which RPC: recorded in the audit log."""

    principal: str
    method: str


@dataclass(frozen=True)
class Page:
    """One page of a List: items plus the cursor of the next page (None on the last)."""

    items: list[Resource]
    next_cursor: dict | None


@dataclass(frozen=True)
class VersionDraft:
    """A validated, fully stored artifact waiting to become a version."""

    format: str
    sha256: str
    size_bytes: int
    description: str
    labels: dict[str, str]
    lineage: dict
    creator: str
    signature: dict | None = None
    metrics: dict[str, float] | None = None
    schema: dict | None = None
    row_count: int = 0


class RegistryStore(abc.ABC):
    """What the registry needs from a metadata store. Names here are ids, not resource names."""

    @abc.abstractmethod
    def create_model(self, model_id: str, fields: Resource, by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def get_model(self, model_id: str) -> Resource: ...

    @abc.abstractmethod
    def list_models(self, filter_expr, page_size: int, cursor: dict | None) -> Page: ...

    @abc.abstractmethod
    def update_model(self, model_id: str, changes: Resource, etag: str, by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def delete_model(self, model_id: str, force: bool, etag: str, by: Mutation) -> None: ...

    @abc.abstractmethod
    def commit_model_version(self, model_id: str, draft: VersionDraft, by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def get_model_version(self, model_id: str, version_id: int | None = None,
                          alias: str | None = None) -> Resource: ...

    @abc.abstractmethod
    def list_model_versions(self, model_id: str, filter_expr, page_size: int,
                            cursor: dict | None) -> Page: ...

    @abc.abstractmethod
    def update_model_version(self, model_id: str, version_id: int, changes: Resource,
                             etag: str, by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def delete_model_version(self, model_id: str, version_id: int, force: bool,
                             by: Mutation) -> None: ...

    @abc.abstractmethod
    def set_alias(self, model_id: str, alias: str, version_id: int,
                  expected_version_id: int | None, by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def delete_alias(self, model_id: str, alias: str, by: Mutation) -> None: ...

    @abc.abstractmethod
    def list_aliases(self, model_id: str) -> list[Resource]: ...

    @abc.abstractmethod
    def create_dataset(self, dataset_id: str, fields: Resource, by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def get_dataset(self, dataset_id: str) -> Resource: ...

    @abc.abstractmethod
    def list_datasets(self, filter_expr, page_size: int, cursor: dict | None) -> Page: ...

    @abc.abstractmethod
    def update_dataset(self, dataset_id: str, changes: Resource, etag: str,
                       by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def delete_dataset(self, dataset_id: str, force: bool, by: Mutation) -> None: ...

    @abc.abstractmethod
    def commit_dataset_version(self, dataset_id: str, draft: VersionDraft,
                               by: Mutation) -> Resource: ...

    @abc.abstractmethod
    def get_dataset_version(self, dataset_id: str, version_id: int) -> Resource: ...

    @abc.abstractmethod
    def list_dataset_versions(self, dataset_id: str, filter_expr, page_size: int,
                              cursor: dict | None) -> Page: ...

    @abc.abstractmethod
    def delete_dataset_version(self, dataset_id: str, version_id: int, by: Mutation) -> None: ...

    @abc.abstractmethod
    def existing_versions(self, names: list[str]) -> set[str]: ...

    @abc.abstractmethod
    def lineage_edges(self, name: str, direction: str, max_depth: int) -> list[tuple[str, str]]: ...

    @abc.abstractmethod
    def version_lineage(self, names: set[str]) -> dict[str, dict]: ...

    @abc.abstractmethod
    def list_audit_events(self, filter_expr, page_size: int, cursor: dict | None) -> Page: ...

    @abc.abstractmethod
    def events_after(self, event_id: int, limit: int) -> list[Resource]: ...

    @abc.abstractmethod
    def last_event_id(self) -> int: ...

    @abc.abstractmethod
    def referenced_digests(self) -> set[str]: ...

    @abc.abstractmethod
    def is_referenced(self, sha256: str) -> bool: ...


def _etag(document: Resource) -> str:
    canonical = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class SqlRegistryStore(RegistryStore):
    """RegistryStore on SQLAlchemy Core; SQLite and PostgreSQL run the same code."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"

    async def close(self) -> None:
        """Release the connection pool (idle PostgreSQL connections, SQLite handles)."""
        self._engine.dispose()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.begin() as connection:
            if self._postgres:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": _WRITE_LOCK_KEY})
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as connection:
            yield connection

    def _record(self, connection: Connection, by: Mutation, resource: str,
                before: Resource | None, after: Resource | None,
                event_type: str | None = None, payload_kind: str = "",
                payload: Resource | None = None) -> None:
        """Audit every mutation; emit a registry event for those the contract has a type for."""
        now = utc_now()
        connection.execute(insert(t.audit_events).values(
            principal=by.principal, method=by.method, resource=resource,
            before=before, after=after, create_time=now))
        if event_type is None:
            return
        connection.execute(insert(t.events).values(
            type=event_type, resource=resource, payload_kind=payload_kind,
            payload=payload, create_time=now))

    # -- models --------------------------------------------------------------------------

    def _parent_row(self, connection: Connection, id_column, value: str, resource_type: str,
                    resource_name: str, for_update: bool):
        """The model or dataset row with that id (locked for update on PostgreSQL)."""
        query = select(id_column.table).where(id_column == value)
        if for_update and self._postgres:
            query = query.with_for_update()
        row = connection.execute(query).first()
        if row is None:
            raise NotFound(resource_type, resource_name)
        return row

    def _model_row(self, connection: Connection, model_id: str, for_update: bool = False):
        return self._parent_row(connection, t.models.c.model_id, model_id, "model",
                                model_name(model_id), for_update)

    def _model_aliases(self, connection: Connection, model_pks: list[int]) -> dict[int, dict]:
        rows = connection.execute(
            select(t.aliases.c.model_pk, t.aliases.c.alias, t.model_versions.c.version_id)
            .join(t.model_versions, t.model_versions.c.pk == t.aliases.c.version_pk)
            .where(t.aliases.c.model_pk.in_(model_pks)))
        result: dict[int, dict] = {pk: {} for pk in model_pks}
        for model_pk, alias, version_id in rows:
            result[model_pk][alias] = version_id
        return result

    @staticmethod
    def _model_resource(row, aliases: dict[str, int]) -> Resource:
        return {
            "name": model_name(row.model_id), "display_name": row.display_name,
            "description": row.description, "task": row.task, "labels": dict(row.labels),
            "create_time": timestamp(row.create_time), "update_time": timestamp(row.update_time),
            "etag": row.etag, "latest_version_id": row.last_version_id, "aliases": aliases,
        }

    def _load_model(self, connection: Connection, model_id: str) -> Resource:
        row = self._model_row(connection, model_id)
        return self._model_resource(row, self._model_aliases(connection, [row.pk])[row.pk])

    def create_model(self, model_id: str, fields: Resource, by: Mutation) -> Resource:
        now = utc_now()
        values = {
            "display_name": fields.get("display_name", ""),
            "description": fields.get("description", ""),
            "task": fields.get("task", ""), "labels": fields.get("labels", {}),
        }
        try:
            with self._write() as connection:
                connection.execute(insert(t.models).values(
                    model_id=model_id, create_time=now, update_time=now,
                    etag=_etag(values), last_version_id=0, **values))
                model = self._load_model(connection, model_id)
                self._record(connection, by, model["name"], None, model,
                             EVENT_TYPE_MODEL_CREATED, "model", model)
                return model
        except IntegrityError:
            raise AlreadyExists("model", model_name(model_id)) from None

    def get_model(self, model_id: str) -> Resource:
        with self._read() as connection:
            return self._load_model(connection, model_id)

    def list_models(self, filter_expr, page_size: int, cursor: dict | None) -> Page:
        query = select(t.models).order_by(t.models.c.model_id).limit(page_size + 1)
        if cursor:
            query = query.where(t.models.c.model_id > cursor["after"])
        if filter_expr is not None:
            query = query.where(compile_filter(filter_expr, _ModelColumns()))
        with self._read() as connection:
            rows = connection.execute(query).all()
            page, more = rows[:page_size], len(rows) > page_size
            aliases = self._model_aliases(connection, [r.pk for r in page])
        items = [self._model_resource(r, aliases[r.pk]) for r in page]
        return Page(items, {"after": page[-1].model_id} if more else None)

    def update_model(self, model_id: str, changes: Resource, etag: str, by: Mutation) -> Resource:
        with self._write() as connection:
            before = self._load_model(connection, model_id)
            _check_etag(before, etag)
            values: dict[str, Any] = {
                key: changes[key] for key in ("display_name", "description", "task", "labels")
                if key in changes}
            merged = {k: before[k] for k in ("display_name", "description", "task", "labels")}
            merged.update(values)
            connection.execute(update(t.models).where(t.models.c.model_id == model_id).values(
                update_time=utc_now(), etag=_etag(merged), **values))
            after = self._load_model(connection, model_id)
            self._record(connection, by, after["name"], before, after)
            return after

    def delete_model(self, model_id: str, force: bool, etag: str, by: Mutation) -> None:
        with self._write() as connection:
            before = self._load_model(connection, model_id)
            _check_etag(before, etag)
            row = self._model_row(connection, model_id)
            version_count = connection.execute(
                select(func.count()).where(t.model_versions.c.model_pk == row.pk)).scalar_one()
            if version_count and not force:
                raise FailedPrecondition(
                    f"model {before['name']} still has {version_count} versions; delete them "
                    "first or pass force", reason="MODEL_HAS_VERSIONS",
                    metadata={"versions": str(version_count)})
            names = [model_version_name(model_id, v) for v in connection.execute(
                select(t.model_versions.c.version_id)
                .where(t.model_versions.c.model_pk == row.pk)).scalars()]
            # Watchers (deployments tracking an alias) hear about everything that goes.
            for alias, version_id in before["aliases"].items():
                name = alias_name(model_id, alias)
                self._record(connection, by, name,
                             {"name": name, "version": model_version_name(model_id, version_id)},
                             None, EVENT_TYPE_ALIAS_DELETED)
            for name in names:
                self._record(connection, by, name, {"name": name}, None,
                             EVENT_TYPE_MODEL_VERSION_DELETED)
            self._delete_lineage_of(connection, names)
            connection.execute(delete(t.aliases).where(t.aliases.c.model_pk == row.pk))
            connection.execute(delete(t.model_versions).where(t.model_versions.c.model_pk == row.pk))
            connection.execute(delete(t.models).where(t.models.c.pk == row.pk))
            self._record(connection, by, before["name"], before, None, EVENT_TYPE_MODEL_DELETED)

    # -- model versions ------------------------------------------------------------------

    def _version_resource(self, connection: Connection, row, model_id: str) -> Resource:
        aliases = connection.execute(
            select(t.aliases.c.alias).where(t.aliases.c.version_pk == row.pk)
            .order_by(t.aliases.c.alias)).scalars().all()
        return self._version_resource_with(row, model_id, list(aliases))

    @staticmethod
    def _version_resource_with(row, model_id: str, aliases: list[str]) -> Resource:
        return {
            "name": model_version_name(model_id, row.version_id), "version_id": row.version_id,
            "format": MODEL_FORMAT_ENUM[row.format],
            "artifact": {"size_bytes": row.size_bytes, "sha256": row.sha256},
            "signature": row.signature, "metrics": dict(row.metrics),
            "labels": dict(row.labels), "lineage": row.lineage, "description": row.description,
            "aliases": aliases, "create_time": timestamp(row.create_time),
            "creator": row.creator, "etag": row.etag,
        }

    def commit_model_version(self, model_id: str, draft: VersionDraft, by: Mutation) -> Resource:
        with self._write() as connection:
            model = self._model_row(connection, model_id, for_update=True)
            version_id = connection.execute(
                update(t.models).where(t.models.c.pk == model.pk)
                .values(last_version_id=t.models.c.last_version_id + 1, update_time=utc_now())
                .returning(t.models.c.last_version_id)).scalar_one()
            version_pk = connection.execute(insert(t.model_versions).values(
                model_pk=model.pk, version_id=version_id, format=draft.format,
                sha256=draft.sha256, size_bytes=draft.size_bytes,
                signature=draft.signature or {}, metrics=draft.metrics or {},
                labels=draft.labels, lineage=draft.lineage, description=draft.description,
                creator=draft.creator, create_time=utc_now(),
                etag=_etag({"d": draft.description, "l": draft.labels}),
            ).returning(t.model_versions.c.pk)).scalar_one()
            self._write_side_tables(connection, version_pk, draft.labels, draft.metrics or {})
            name = model_version_name(model_id, version_id)
            self._write_lineage(connection, name, draft.lineage)
            row = connection.execute(
                select(t.model_versions).where(t.model_versions.c.pk == version_pk)).one()
            version = self._version_resource_with(row, model_id, [])
            self._record(connection, by, name, None, version,
                         EVENT_TYPE_MODEL_VERSION_CREATED, "model_version", version)
            return version

    @staticmethod
    def _write_side_tables(connection, version_pk: int, labels: dict, metrics: dict) -> None:
        connection.execute(delete(t.model_version_labels)
                           .where(t.model_version_labels.c.version_pk == version_pk))
        if labels:
            connection.execute(insert(t.model_version_labels), [
                {"version_pk": version_pk, "key": k, "value": v} for k, v in labels.items()])
        if metrics:
            connection.execute(insert(t.model_version_metrics), [
                {"version_pk": version_pk, "key": k, "value": v} for k, v in metrics.items()])

    @staticmethod
    def _write_lineage(connection: Connection, child: str, lineage: dict) -> None:
        parents = sorted(set(lineage.get("parents", [])))
        if parents:
            connection.execute(insert(t.lineage_edges),
                               [{"parent": p, "child": child} for p in parents])

    @staticmethod
    def _delete_lineage_of(connection: Connection, names: list[str]) -> None:
        # Edges to a deleted version's children stay: descendants keep their recorded past.
        if names:
            connection.execute(delete(t.lineage_edges).where(t.lineage_edges.c.child.in_(names)))

    def _version_row(self, connection: Connection, model_id: str, version_id: int | None,
                     alias: str | None):
        model = self._model_row(connection, model_id)
        if alias is not None:
            row = connection.execute(
                select(t.model_versions)
                .join(t.aliases, t.aliases.c.version_pk == t.model_versions.c.pk)
                .where(t.aliases.c.model_pk == model.pk, t.aliases.c.alias == alias)).first()
            if row is None:
                raise NotFound("model alias", alias_name(model_id, alias))
            return row
        row = connection.execute(select(t.model_versions).where(
            t.model_versions.c.model_pk == model.pk,
            t.model_versions.c.version_id == version_id)).first()
        if row is None:
            raise NotFound("model version", model_version_name(model_id, version_id or 0))
        return row

    def get_model_version(self, model_id: str, version_id: int | None = None,
                          alias: str | None = None) -> Resource:
        with self._read() as connection:
            row = self._version_row(connection, model_id, version_id, alias)
            return self._version_resource(connection, row, model_id)

    def list_model_versions(self, model_id: str, filter_expr, page_size: int,
                            cursor: dict | None) -> Page:
        with self._read() as connection:
            model = self._model_row(connection, model_id)
            query = (select(t.model_versions).where(t.model_versions.c.model_pk == model.pk)
                     .order_by(t.model_versions.c.version_id.desc()).limit(page_size + 1))
            if cursor:
                query = query.where(t.model_versions.c.version_id < cursor["before"])
            if filter_expr is not None:
                query = query.where(compile_filter(filter_expr, _VersionColumns()))
            rows = connection.execute(query).all()
            page, more = rows[:page_size], len(rows) > page_size
            alias_rows = connection.execute(
                select(t.aliases.c.version_pk, t.aliases.c.alias)
                .where(t.aliases.c.version_pk.in_([r.pk for r in page]))
                .order_by(t.aliases.c.alias)).all()
        aliases: dict[int, list[str]] = {}
        for version_pk, alias in alias_rows:
            aliases.setdefault(version_pk, []).append(alias)
        items = [self._version_resource_with(r, model_id, aliases.get(r.pk, [])) for r in page]
        return Page(items, {"before": page[-1].version_id} if more else None)

    def update_model_version(self, model_id: str, version_id: int, changes: Resource,
                             etag: str, by: Mutation) -> Resource:
        with self._write() as connection:
            row = self._version_row(connection, model_id, version_id, None)
            before = self._version_resource(connection, row, model_id)
            _check_etag(before, etag)
            values = {k: changes[k] for k in ("description", "labels") if k in changes}
            merged = {"d": values.get("description", row.description),
                      "l": values.get("labels", dict(row.labels))}
            connection.execute(update(t.model_versions).where(t.model_versions.c.pk == row.pk)
                               .values(etag=_etag(merged), **values))
            if "labels" in values:
                connection.execute(delete(t.model_version_labels)
                                   .where(t.model_version_labels.c.version_pk == row.pk))
                if values["labels"]:
                    connection.execute(insert(t.model_version_labels), [
                        {"version_pk": row.pk, "key": k, "value": v}
                        for k, v in values["labels"].items()])
            after = self._version_resource(
                connection,
                connection.execute(select(t.model_versions)
                                   .where(t.model_versions.c.pk == row.pk)).one(), model_id)
            self._record(connection, by, after["name"], before, after)
            return after

    def delete_model_version(self, model_id: str, version_id: int, force: bool,
                             by: Mutation) -> None:
        with self._write() as connection:
            row = self._version_row(connection, model_id, version_id, None)
            before = self._version_resource(connection, row, model_id)
            if before["aliases"] and not force:
                raise FailedPrecondition(
                    f"{before['name']} is the target of aliases {before['aliases']}; move them "
                    "first or pass force", reason="VERSION_HAS_ALIASES",
                    metadata={"aliases": ",".join(before["aliases"])})
            for alias in before["aliases"]:
                connection.execute(delete(t.aliases).where(
                    t.aliases.c.version_pk == row.pk, t.aliases.c.alias == alias))
                self._record(connection, by, alias_name(model_id, alias),
                             {"name": alias_name(model_id, alias), "version": before["name"]},
                             None, EVENT_TYPE_ALIAS_DELETED)
            self._delete_lineage_of(connection, [before["name"]])
            connection.execute(delete(t.model_versions).where(t.model_versions.c.pk == row.pk))
            self._record(connection, by, before["name"], before, None,
                         EVENT_TYPE_MODEL_VERSION_DELETED)

    # -- aliases -------------------------------------------------------------------------

    def set_alias(self, model_id: str, alias: str, version_id: int,
                  expected_version_id: int | None, by: Mutation) -> Resource:
        with self._write() as connection:
            model = self._model_row(connection, model_id, for_update=True)
            target = self._version_row(connection, model_id, version_id, None)
            current = connection.execute(
                select(t.aliases.c.version_pk, t.model_versions.c.version_id)
                .join(t.model_versions, t.model_versions.c.pk == t.aliases.c.version_pk)
                .where(t.aliases.c.model_pk == model.pk, t.aliases.c.alias == alias)).first()
            current_version = current.version_id if current else None
            if expected_version_id is not None and (current_version or 0) != expected_version_id:
                raise Aborted(
                    f"alias {alias!r} points at version {current_version or 'nothing'}, not "
                    f"{expected_version_id or 'nothing'}", reason="ALIAS_MOVED_CONCURRENTLY",
                    metadata={"current_version": str(current_version or "")})
            now = utc_now()
            if current is None:
                connection.execute(insert(t.aliases).values(
                    model_pk=model.pk, alias=alias, version_pk=target.pk, update_time=now))
            else:
                connection.execute(update(t.aliases).where(
                    t.aliases.c.model_pk == model.pk, t.aliases.c.alias == alias)
                    .values(version_pk=target.pk, update_time=now))
            name = alias_name(model_id, alias)
            after = {"name": name, "version": model_version_name(model_id, version_id),
                     "update_time": timestamp(now)}
            before = ({"name": name, "version": model_version_name(model_id, current.version_id)}
                      if current else None)
            self._record(connection, by, name, before, after, EVENT_TYPE_ALIAS_MOVED,
                         "alias", after)
            return after

    def delete_alias(self, model_id: str, alias: str, by: Mutation) -> None:
        with self._write() as connection:
            row = self._version_row(connection, model_id, None, alias)
            model = self._model_row(connection, model_id)
            connection.execute(delete(t.aliases).where(
                t.aliases.c.model_pk == model.pk, t.aliases.c.alias == alias))
            name = alias_name(model_id, alias)
            self._record(connection, by, name,
                         {"name": name, "version": model_version_name(model_id, row.version_id)},
                         None, EVENT_TYPE_ALIAS_DELETED)

    def list_aliases(self, model_id: str) -> list[Resource]:
        with self._read() as connection:
            model = self._model_row(connection, model_id)
            rows = connection.execute(
                select(t.aliases.c.alias, t.aliases.c.update_time, t.model_versions.c.version_id)
                .join(t.model_versions, t.model_versions.c.pk == t.aliases.c.version_pk)
                .where(t.aliases.c.model_pk == model.pk).order_by(t.aliases.c.alias)).all()
        return [{"name": alias_name(model_id, r.alias),
                 "version": model_version_name(model_id, r.version_id),
                 "update_time": timestamp(r.update_time)} for r in rows]

    # -- datasets ------------------------------------------------------------------------

    def _dataset_row(self, connection: Connection, dataset_id: str, for_update: bool = False):
        return self._parent_row(connection, t.datasets.c.dataset_id, dataset_id, "dataset",
                                dataset_name(dataset_id), for_update)

    @staticmethod
    def _dataset_resource(row) -> Resource:
        return {
            "name": dataset_name(row.dataset_id), "display_name": row.display_name,
            "description": row.description, "labels": dict(row.labels),
            "create_time": timestamp(row.create_time), "update_time": timestamp(row.update_time),
            "etag": row.etag, "latest_version_id": row.last_version_id,
        }

    @staticmethod
    def _dataset_version_resource(row, dataset_id: str) -> Resource:
        return {
            "name": dataset_version_name(dataset_id, row.version_id),
            "version_id": row.version_id, "format": DATASET_FORMAT_ENUM[row.format],
            "artifact": {"size_bytes": row.size_bytes, "sha256": row.sha256},
            "schema": row.schema, "row_count": row.row_count, "labels": dict(row.labels),
            "lineage": row.lineage, "description": row.description,
            "create_time": timestamp(row.create_time), "creator": row.creator,
        }

    def create_dataset(self, dataset_id: str, fields: Resource, by: Mutation) -> Resource:
        now = utc_now()
        values = {"display_name": fields.get("display_name", ""),
                  "description": fields.get("description", ""),
                  "labels": fields.get("labels", {})}
        try:
            with self._write() as connection:
                connection.execute(insert(t.datasets).values(
                    dataset_id=dataset_id, create_time=now, update_time=now,
                    etag=_etag(values), last_version_id=0, **values))
                dataset = self._dataset_resource(self._dataset_row(connection, dataset_id))
                self._record(connection, by, dataset["name"], None, dataset,
                             EVENT_TYPE_DATASET_CREATED, "dataset", dataset)
                return dataset
        except IntegrityError:
            raise AlreadyExists("dataset", dataset_name(dataset_id)) from None

    def get_dataset(self, dataset_id: str) -> Resource:
        with self._read() as connection:
            return self._dataset_resource(self._dataset_row(connection, dataset_id))

    def list_datasets(self, filter_expr, page_size: int, cursor: dict | None) -> Page:
        query = select(t.datasets).order_by(t.datasets.c.dataset_id).limit(page_size + 1)
        if cursor:
            query = query.where(t.datasets.c.dataset_id > cursor["after"])
        if filter_expr is not None:
            query = query.where(compile_filter(filter_expr, _DatasetColumns()))
        with self._read() as connection:
            rows = connection.execute(query).all()
        page, more = rows[:page_size], len(rows) > page_size
        return Page([self._dataset_resource(r) for r in page],
                    {"after": page[-1].dataset_id} if more else None)

    def update_dataset(self, dataset_id: str, changes: Resource, etag: str,
                       by: Mutation) -> Resource:
        with self._write() as connection:
            before = self._dataset_resource(self._dataset_row(connection, dataset_id))
            _check_etag(before, etag)
            values: dict[str, Any] = {k: changes[k] for k in ("display_name", "description", "labels")
                      if k in changes}
            merged = {k: before[k] for k in ("display_name", "description", "labels")}
            merged.update(values)
            connection.execute(update(t.datasets).where(t.datasets.c.dataset_id == dataset_id)
                               .values(update_time=utc_now(), etag=_etag(merged), **values))
            after = self._dataset_resource(self._dataset_row(connection, dataset_id))
            self._record(connection, by, after["name"], before, after)
            return after

    def delete_dataset(self, dataset_id: str, force: bool, by: Mutation) -> None:
        with self._write() as connection:
            row = self._dataset_row(connection, dataset_id)
            before = self._dataset_resource(row)
            versions = connection.execute(select(t.dataset_versions.c.version_id).where(
                t.dataset_versions.c.dataset_pk == row.pk)).scalars().all()
            if versions and not force:
                raise FailedPrecondition(
                    f"dataset {before['name']} still has {len(versions)} versions",
                    reason="DATASET_HAS_VERSIONS", metadata={"versions": str(len(versions))})
            self._delete_lineage_of(connection,
                                    [dataset_version_name(dataset_id, v) for v in versions])
            connection.execute(delete(t.dataset_versions)
                               .where(t.dataset_versions.c.dataset_pk == row.pk))
            connection.execute(delete(t.datasets).where(t.datasets.c.pk == row.pk))
            self._record(connection, by, before["name"], before, None,
                         EVENT_TYPE_DATASET_DELETED)

    def commit_dataset_version(self, dataset_id: str, draft: VersionDraft,
                               by: Mutation) -> Resource:
        with self._write() as connection:
            dataset = self._dataset_row(connection, dataset_id, for_update=True)
            version_id = connection.execute(
                update(t.datasets).where(t.datasets.c.pk == dataset.pk)
                .values(last_version_id=t.datasets.c.last_version_id + 1, update_time=utc_now())
                .returning(t.datasets.c.last_version_id)).scalar_one()
            version_pk = connection.execute(insert(t.dataset_versions).values(
                dataset_pk=dataset.pk, version_id=version_id, format=draft.format,
                sha256=draft.sha256, size_bytes=draft.size_bytes, schema=draft.schema or {},
                row_count=draft.row_count, labels=draft.labels, lineage=draft.lineage,
                description=draft.description, creator=draft.creator, create_time=utc_now(),
            ).returning(t.dataset_versions.c.pk)).scalar_one()
            name = dataset_version_name(dataset_id, version_id)
            self._write_lineage(connection, name, draft.lineage)
            version = self._dataset_version_resource(connection.execute(
                select(t.dataset_versions).where(t.dataset_versions.c.pk == version_pk)).one(),
                dataset_id)
            self._record(connection, by, name, None, version,
                         EVENT_TYPE_DATASET_VERSION_CREATED, "dataset_version", version)
            return version

    def _dataset_version_row(self, connection: Connection, dataset_id: str, version_id: int):
        dataset = self._dataset_row(connection, dataset_id)
        row = connection.execute(select(t.dataset_versions).where(
            t.dataset_versions.c.dataset_pk == dataset.pk,
            t.dataset_versions.c.version_id == version_id)).first()
        if row is None:
            raise NotFound("dataset version", dataset_version_name(dataset_id, version_id))
        return row

    def get_dataset_version(self, dataset_id: str, version_id: int) -> Resource:
        with self._read() as connection:
            return self._dataset_version_resource(
                self._dataset_version_row(connection, dataset_id, version_id), dataset_id)

    def list_dataset_versions(self, dataset_id: str, filter_expr, page_size: int,
                              cursor: dict | None) -> Page:
        with self._read() as connection:
            dataset = self._dataset_row(connection, dataset_id)
            query = (select(t.dataset_versions)
                     .where(t.dataset_versions.c.dataset_pk == dataset.pk)
                     .order_by(t.dataset_versions.c.version_id.desc()).limit(page_size + 1))
            if cursor:
                query = query.where(t.dataset_versions.c.version_id < cursor["before"])
            if filter_expr is not None:
                query = query.where(compile_filter(filter_expr, _DatasetVersionColumns()))
            rows = connection.execute(query).all()
        page, more = rows[:page_size], len(rows) > page_size
        return Page([self._dataset_version_resource(r, dataset_id) for r in page],
                    {"before": page[-1].version_id} if more else None)

    def delete_dataset_version(self, dataset_id: str, version_id: int, by: Mutation) -> None:
        with self._write() as connection:
            row = self._dataset_version_row(connection, dataset_id, version_id)
            before = self._dataset_version_resource(row, dataset_id)
            self._delete_lineage_of(connection, [before["name"]])
            connection.execute(delete(t.dataset_versions)
                               .where(t.dataset_versions.c.pk == row.pk))
            self._record(connection, by, before["name"], before, None,
                         EVENT_TYPE_DATASET_VERSION_DELETED)

    # -- lineage -------------------------------------------------------------------------

    def existing_versions(self, names: list[str]) -> set[str]:
        found = set()
        with self._read() as connection:
            for name in names:
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].isdigit():
                    continue
                if parts[0] == "models":
                    query = select(exists().where(
                        t.models.c.model_id == parts[1],
                        t.model_versions.c.model_pk == t.models.c.pk,
                        t.model_versions.c.version_id == int(parts[3])))
                elif parts[0] == "datasets":
                    query = select(exists().where(
                        t.datasets.c.dataset_id == parts[1],
                        t.dataset_versions.c.dataset_pk == t.datasets.c.pk,
                        t.dataset_versions.c.version_id == int(parts[3])))
                else:
                    continue
                if connection.execute(query).scalar():
                    found.add(name)
        return found

    def lineage_edges(self, name: str, direction: str, max_depth: int) -> list[tuple[str, str]]:
        edges: set[tuple[str, str]] = set()
        with self._read() as connection:
            for walk_up in ((True, False) if direction == "both" else
                            ((True,) if direction == "ancestors" else (False,))):
                frontier, seen = {name}, {name}
                for _ in range(max_depth):
                    if not frontier:
                        break
                    column = t.lineage_edges.c.child if walk_up else t.lineage_edges.c.parent
                    rows = connection.execute(select(t.lineage_edges.c.parent,
                                                     t.lineage_edges.c.child)
                                              .where(column.in_(frontier))).all()
                    edges.update((r.parent, r.child) for r in rows)
                    reached = {r.parent if walk_up else r.child for r in rows}
                    frontier = reached - seen
                    seen |= reached
        return sorted(edges)

    def version_lineage(self, names: set[str]) -> dict[str, dict]:
        """Lineage records of the named versions that still exist."""
        result = {}
        with self._read() as connection:
            for name in names:
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].isdigit():
                    continue
                table, parent_table, key, fk = (
                    (t.model_versions, t.models, "model_id", "model_pk") if parts[0] == "models"
                    else (t.dataset_versions, t.datasets, "dataset_id", "dataset_pk"))
                lineage = connection.execute(
                    select(table.c.lineage).join(parent_table,
                                                 parent_table.c.pk == table.c[fk])
                    .where(parent_table.c[key] == parts[1],
                           table.c.version_id == int(parts[3]))).scalar()
                if lineage is not None:
                    result[name] = lineage
        return result

    # -- audit and events ----------------------------------------------------------------

    def list_audit_events(self, filter_expr, page_size: int, cursor: dict | None) -> Page:
        query = select(t.audit_events).order_by(t.audit_events.c.event_id).limit(page_size + 1)
        if cursor:
            query = query.where(t.audit_events.c.event_id > cursor["after"])
        if filter_expr is not None:
            query = query.where(compile_filter(filter_expr, _AuditColumns()))
        with self._read() as connection:
            rows = connection.execute(query).all()
        page, more = rows[:page_size], len(rows) > page_size
        items = [{"name": f"auditEvents/{r.event_id}", "event_id": r.event_id,
                  "principal": r.principal, "method": r.method, "resource": r.resource,
                  "before": r.before, "after": r.after, "create_time": timestamp(r.create_time)}
                 for r in page]
        return Page(items, {"after": page[-1].event_id} if more else None)

    def events_after(self, event_id: int, limit: int) -> list[Resource]:
        with self._read() as connection:
            rows = connection.execute(
                select(t.events).where(t.events.c.event_id > event_id)
                .order_by(t.events.c.event_id).limit(limit)).all()
        return [{"event_id": r.event_id, "type": r.type, "resource": r.resource,
                 "create_time": timestamp(r.create_time),
                 **({r.payload_kind: r.payload} if r.payload_kind else {})} for r in rows]

    def last_event_id(self) -> int:
        with self._read() as connection:
            return connection.execute(select(func.coalesce(func.max(t.events.c.event_id), 0))
                                      ).scalar_one()

    # -- blob references -----------------------------------------------------------------

    def referenced_digests(self) -> set[str]:
        with self._read() as connection:
            models = connection.execute(select(t.model_versions.c.sha256).distinct()).scalars()
            data = connection.execute(select(t.dataset_versions.c.sha256).distinct()).scalars()
            return set(models) | set(data)

    def is_referenced(self, sha256: str) -> bool:
        with self._read() as connection:
            return bool(connection.execute(select(or_(
                exists().where(t.model_versions.c.sha256 == sha256),
                exists().where(t.dataset_versions.c.sha256 == sha256)))).scalar())


def _check_etag(current: Resource, etag: str) -> None:
    if etag and etag != current.get("etag"):
        raise Aborted(f"{current['name']} changed since it was read (etag mismatch)",
                      reason="ETAG_MISMATCH", metadata={"current_etag": current.get("etag", "")})


class _MapColumns:
    """Filter resolver for tables whose labels/metrics live in key-value side tables."""

    scalars: dict = {}
    labels_table: Any = None
    metrics_table: Any = None
    owner_pk: Any = None

    def scalar(self, field: str):
        return self.scalars[field]

    def _map_table(self, map_name: str):
        return {"labels": self.labels_table, "metrics": self.metrics_table}[map_name]

    def map_compare(self, map_name: str, key: str, op: Operator, value):
        table = self._map_table(map_name)
        comparison = apply_operator(table.c.value, op, value)
        return exists().where(table.c.version_pk == self.owner_pk, table.c.key == key,
                              comparison)

    def map_has(self, map_name: str, key: str):
        table = self._map_table(map_name)
        return exists().where(table.c.version_pk == self.owner_pk, table.c.key == key)


class _JsonLabelColumns:
    """Filter resolver for tables whose labels live only in a JSON column (few rows)."""

    scalars: dict = {}
    labels_column: Any = None

    def scalar(self, field: str):
        return self.scalars[field]

    def map_compare(self, map_name: str, key: str, op: Operator, value):
        return apply_operator(self.labels_column[key].as_string(), op, value)

    def map_has(self, map_name: str, key: str):
        return self.labels_column[key].as_string().is_not(None)


class _VersionColumns(_MapColumns):
    scalars = {"format": t.model_versions.c.format, "create_time": t.model_versions.c.create_time,
               "version_id": t.model_versions.c.version_id,
               "creator": t.model_versions.c.creator}
    labels_table = t.model_version_labels
    metrics_table = t.model_version_metrics
    owner_pk = t.model_versions.c.pk


class _ModelColumns(_JsonLabelColumns):
    scalars = {"task": t.models.c.task, "create_time": t.models.c.create_time,
               "display_name": t.models.c.display_name}
    labels_column = t.models.c.labels


class _DatasetColumns(_JsonLabelColumns):
    scalars = {"create_time": t.datasets.c.create_time,
               "display_name": t.datasets.c.display_name}
    labels_column = t.datasets.c.labels


class _DatasetVersionColumns(_JsonLabelColumns):
    scalars = {"format": t.dataset_versions.c.format,
               "create_time": t.dataset_versions.c.create_time,
               "version_id": t.dataset_versions.c.version_id}
    labels_column = t.dataset_versions.c.labels


class _AuditColumns(_JsonLabelColumns):
    scalars = {"principal": t.audit_events.c.principal, "method": t.audit_events.c.method,
               "resource": t.audit_events.c.resource,
               "create_time": t.audit_events.c.create_time}
    labels_column = None
