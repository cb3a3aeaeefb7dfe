"""`maas usage --since`: durations back from now or ISO 8601 times; anything else is
INVALID_ARGUMENT naming `since` (the CLI prints it as one line)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from maas_cli.commands import parse_since
from maas_sdk.errors import InvalidArgument

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", NOW - timedelta(seconds=90)), ("30m", NOW - timedelta(minutes=30)),
    ("2h", NOW - timedelta(hours=2)), ("7d", NOW - timedelta(days=7)),
    ("2026-11-29T08:30:00", datetime(2026, 11, 29, 8, 30, tzinfo=UTC)),
    ("2026-11-29T08:30:00+02:00", datetime(2026, 11, 29, 6, 30, tzinfo=UTC)),
    ("", None),
])
def test_since_takes_durations_and_iso_times(text, expected):
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h30m", "-5m", "30 m", "2026-13-01"])
def test_anything_else_is_invalid_argument_on_since(text):
    with pytest.raises(InvalidArgument) as refused:
        parse_since(text, now=NOW)
    assert [v.field for v in refused.value.field_violations] == ["since"]
