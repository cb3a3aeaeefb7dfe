"""Relational schema of the registry (SQLAlchemy Core); Alembic migrations create it.

Labels and metrics live in side tables besides their JSON copies so that List filters
(`metrics.accuracy > 0.95`) compile to indexed SQL on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identities.
Id = BigInteger().with_variant(Integer(), "sqlite")

models = Table(
    "models", metadata,
    Column("pk", Id, primary_key=True, autoincrement=True),
    Column("model_id", String(63), nullable=False, unique=True),
    Column("display_name", String(256), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("task", String(128), nullable=False, default=""),
    Column("labels", JSON, nullable=False, default=dict),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("etag", String(64), nullable=False),
    Column("last_version_id", BigInteger, nullable=False, default=0),
)

model_versions = Table(
    "model_versions", metadata,
    Column("pk", Id, primary_key=True, autoincrement=True),
    Column("model_pk", Id, ForeignKey("models.pk", ondelete="CASCADE"), nullable=False),
    Column("version_id", BigInteger, nullable=False),
    Column("format", String(32), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("signature", JSON, nullable=False, default=dict),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("labels", JSON, nullable=False, default=dict),
    Column("lineage", JSON, nullable=False, default=dict),
    Column("description", Text, nullable=False, default=""),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("etag", String(64), nullable=False),
    UniqueConstraint("model_pk", "version_id", name="uq_model_versions_number"),
)

model_version_labels = Table(
    "model_version_labels", metadata,
    Column("version_pk", Id, ForeignKey("model_versions.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", String(63), nullable=False),
    Index("ix_model_version_labels_key_value", "key", "value"),
)

model_version_metrics = Table(
    "model_version_metrics", metadata,
    Column("version_pk", Id, ForeignKey("model_versions.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", Float, nullable=False),
    Index("ix_model_version_metrics_key_value", "key", "value"),
)

aliases = Table(
    "aliases", metadata,
    Column("model_pk", Id, ForeignKey("models.pk", ondelete="CASCADE"), primary_key=True),
    Column("alias", String(63), primary_key=True),
    Column("version_pk", Id, ForeignKey("model_versions.pk", ondelete="CASCADE"),
           nullable=False, index=True),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

datasets = Table(
    "datasets", metadata,
    Column("pk", Id, primary_key=True, autoincrement=True),
    Column("dataset_id", String(63), nullable=False, unique=True),
    Column("display_name", String(256), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("labels", JSON, nullable=False, default=dict),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("etag", String(64), nullable=False),
    Column("last_version_id", BigInteger, nullable=False, default=0),
)

dataset_versions = Table(
    "dataset_versions", metadata,
    Column("pk", Id, primary_key=True, autoincrement=True),
    Column("dataset_pk", Id, ForeignKey("datasets.pk", ondelete="CASCADE"), nullable=False),
    Column("version_id", BigInteger, nullable=False),
    Column("format", String(32), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("schema", JSON, nullable=False, default=dict),
    Column("row_count", BigInteger, nullable=False),
    Column("labels", JSON, nullable=False, default=dict),
    Column("lineage", JSON, nullable=False, default=dict),
    Column("description", Text, nullable=False, default=""),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("dataset_pk", "version_id", name="uq_dataset_versions_number"),
)

lineage_edges = Table(
    "lineage_edges", metadata,
    Column("parent", String(200), primary_key=True),
    Column("child", String(200), primary_key=True),
    Index("ix_lineage_edges_child", "child"),
)

audit_events = Table(
    "audit_events", metadata,
    Column("event_id", Id, primary_key=True, autoincrement=True),
    Column("principal", String(256), nullable=False),
    Column("method", String(64), nullable=False),
    Column("resource", String(200), nullable=False, index=True),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

events = Table(
    "events", metadata,
    Column("event_id", Id, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("resource", String(200), nullable=False),
    Column("payload_kind", String(32), nullable=False, default=""),
    Column("payload", JSON, nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
)
