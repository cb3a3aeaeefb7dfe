"""What a job is, independent of storage and transport: states, records, events.

The states and event kinds mirror `maas.common.v1` (JobState, JobEvent), so a service turns
them into messages without a translation table of its own (see `maas_jobs.resources`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class JobState(enum.StrEnum):
    """Lifecycle of a job; values are the `maas.common.v1.JobState` names without the prefix."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class EventKind(enum.StrEnum):
    """The `kind` oneof of `maas.common.v1.JobEvent`."""

    STATE_CHANGE = "state_change"
    METRICS = "metrics"
    LOG = "log"


class LogLevel(enum.StrEnum):
    """Severities a `LogLine` may carry."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@dataclass(frozen=True)
class JobCollection:
    """How one service names its jobs: `trainingJobs/{job}` are "training job" resources."""

    collection: str
    resource_type: str

    def name(self, job_id: str) -> str:
        return f"{self.collection}/{job_id}"


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a canonical status code name and a message for humans."""

    code: str
    message: str


@dataclass(frozen=True)
class JobDraft:
    """A validated job waiting to be queued."""

    job_id: str
    spec: dict[str, Any]
    """The service's own, JSON-serialisable description of the work."""
    tenant: str
    creator: str
    workers: int = 1
    priority: int = 0


@dataclass(frozen=True)
class JobRecord:
    """One row of the job table."""

    job_id: str
    spec: dict[str, Any]
    tenant: str
    creator: str
    workers: int
    priority: int
    state: JobState
    create_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None
    epoch: int = 0
    """Last completed epoch (or step of a non-epoch job) reported by the job."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The latest value of every metric the job reported."""
    error: JobError | None = None
    result: dict[str, Any] = field(default_factory=dict)
    """What the job produced, e.g. {"model_version": "models/digits/versions/3"}."""
    resume_count: int = 0
    process_id: int | None = None
    """Process (group leader) running the job now, so a restarted service can reap it."""
    queue_position: int = 0
    """Monotonic submission order; ties between equal priorities go to the older job."""
    lease_owner: str | None = None
    """The replica running the job (or that ran it last)."""
    lease_expires: datetime | None = None
    """Until when `lease_owner` holds a RUNNING job unless it renews; then others take over."""
    publishing: bool = False
    """The job's result is being published: it can no longer be cancelled."""


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history; `sequence` counts from 1 per job, without gaps."""

    job_id: str
    sequence: int
    time: datetime
    kind: EventKind
    payload: dict[str, Any]
    """state_change: {state, reason}; metrics: {epoch, phase, values}; log: {level, message}."""

    @property
    def final_state(self) -> JobState | None:
        """The state entered, when this event moved the job into a final state."""
        if self.kind is not EventKind.STATE_CHANGE:
            return None
        state = JobState(self.payload["state"])
        return state if state.is_final else None
