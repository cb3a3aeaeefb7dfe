"""Jobs and job events in the contract's JSON shape (`maas.common.v1` field names).

A servicer turns these dicts into messages with `json_format.ParseDict`; the trainer and the
compressor share them, so both report state, timing, errors and events identically.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from maas_runtime.contract_enums import JOB_STATE_PREFIX

from maas_jobs.records import EventKind, JobEvent, JobRecord


def timestamp(value: datetime) -> str:
    """RFC 3339 in UTC, as protobuf's JSON mapping writes a Timestamp."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def job_status_fields(job: JobRecord, collection_name: str) -> dict[str, Any]:
    """The output-only fields every job resource has: name, state, times, progress, error."""
    fields: dict[str, Any] = {
        "name": collection_name,
        "state": JOB_STATE_PREFIX + job.state.value,
        "create_time": timestamp(job.create_time),
        "epoch": job.epoch,
        "metrics": dict(job.metrics),
        "creator": job.creator,
        "resume_count": job.resume_count,
    }
    if job.start_time is not None:
        fields["start_time"] = timestamp(job.start_time)
    if job.end_time is not None:
        fields["end_time"] = timestamp(job.end_time)
    if job.error is not None:
        fields["error"] = {"code": job.error.code, "message": job.error.message}
    return fields


def job_event_resource(event: JobEvent) -> dict[str, Any]:
    """A `maas.common.v1.JobEvent` as a dict."""
    resource: dict[str, Any] = {"sequence": event.sequence, "time": timestamp(event.time)}
    payload = event.payload
    if event.kind is EventKind.STATE_CHANGE:
        resource["state_change"] = {"state": JOB_STATE_PREFIX + payload["state"],
                                    "reason": payload.get("reason", "")}
    elif event.kind is EventKind.METRICS:
        resource["metrics"] = {"epoch": payload.get("epoch", 0), "phase": payload.get("phase", ""),
                               "values": dict(payload.get("values", {}))}
    else:
        resource["log"] = {"level": payload.get("level", "INFO"),
                           "message": payload.get("message", "")}
    return resource
