"""Registry resources as plain dicts in the contract's JSON shape (proto field names).

The store returns these, the audit log records them as before/after, events carry them,
and the servicer turns them into messages with `json_format.ParseDict`: one shape, no
parallel class hierarchy to keep in sync with the protos.
"""

from __future__ import annotations

from datetime import UTC, datetime

from maas_formats import DATASET_FORMAT_BY_PROTO_NAME, MODEL_FORMAT_BY_PROTO_NAME

MODEL_FORMATS = MODEL_FORMAT_BY_PROTO_NAME
"""Contract enum name → short name stored in the database and used in filters."""

DATASET_FORMATS = DATASET_FORMAT_BY_PROTO_NAME

MODEL_FORMAT_ENUM = {short: enum for enum, short in MODEL_FORMATS.items()}
DATASET_FORMAT_ENUM = {short: enum for enum, short in DATASET_FORMATS.items()}


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(value: datetime) -> str:
    """RFC 3339 in UTC, as protobuf's JSON mapping writes Timestamps."""
    if value.tzinfo is None:  # SQLite returns naive datetimes; they were stored as UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def model_name(model_id: str) -> str:
    return f"models/{model_id}"


def model_version_name(model_id: str, version_id: int) -> str:
    return f"models/{model_id}/versions/{version_id}"


def alias_name(model_id: str, alias: str) -> str:
    return f"models/{model_id}/aliases/{alias}"


def dataset_name(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def dataset_version_name(dataset_id: str, version_id: int) -> str:
    return f"datasets/{dataset_id}/versions/{version_id}"
