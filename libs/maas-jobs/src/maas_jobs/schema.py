"""Relational schema of a job table (SQLAlchemy Core): jobs and their per-job event log.

`jobs.last_sequence` is the sequence number of the job's newest event; appending an event
bumps it in the same transaction, so each job's events are numbered 1, 2, 3... without gaps
and a watcher resuming after sequence N misses nothing.

A RUNNING job is held by one replica through its lease (`lease_owner` until
`lease_expires`), renewed while the job runs; when it lapses another replica takes the job
over. `publishing` marks a job whose result is being published: no replica may cancel it.

Changes to these tables are Alembic revisions in `maas_jobs/migrations` (applied at start).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identities.
Id = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs", metadata,
    Column("pk", Id, primary_key=True, autoincrement=True),
    Column("job_id", String(63), nullable=False, unique=True),
    Column("spec", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("creator", String(256), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("workers", Integer, nullable=False, default=1),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("start_time", DateTime(timezone=True)),
    Column("end_time", DateTime(timezone=True)),
    Column("epoch", Integer, nullable=False, default=0),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("error_code", String(32)),
    Column("error_message", Text),
    Column("result", JSON, nullable=False, default=dict),
    Column("resume_count", Integer, nullable=False, default=0),
    Column("process_id", Integer),
    Column("last_sequence", BigInteger, nullable=False, default=0),
    Column("lease_owner", String(256)),
    Column("lease_expires", DateTime(timezone=True)),
    Column("publishing", Boolean, nullable=False, default=False, server_default=false()),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_tenant_start", "tenant", "start_time"),
)

job_events = Table(
    "job_events", metadata,
    Column("job_pk", Id, ForeignKey("jobs.pk", ondelete="CASCADE"), primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("payload", JSON, nullable=False),
)
