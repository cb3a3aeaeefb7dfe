"""The demo's rules without a suite: which version becomes production, which one shadows it,
and how a failed gate shows in the table and the JSON."""

from __future__ import annotations

import io
import json

from maas_cli.demo import DemoResult, Row, choose_production, choose_shadow, render
from rich.console import Console


def rows() -> list[Row]:
    return [
        Row("train (fp32)", "models/digits/versions/1", 6090, 25_000, 0.97, 0.07),
        Row("prune", "models/digits/versions/3", 1898, 8_000, 0.96, 0.06, compressed=True,
            gate="passed"),
        Row("quantize int8", "models/digits/versions/4", 6090, 15_000, 0.98, 0.04,
            compressed=True, gate="passed"),
        Row("fuse", "models/digits/versions/6", 6090, 25_000, 0.98, 0.07, compressed=True,
            gate="passed"),
        Row("distill", "", 2410, 10_000, 0.99, 0.03, compressed=True, gate="failed",
            error="FAILED_PRECONDITION accuracy dropped 15.88 points"),
    ]


def test_production_is_the_most_accurate_passed_version_then_the_smallest():
    best = choose_production(rows())
    assert best is not None and best.method == "quantize int8"  # fuse ties, but is larger


def test_a_version_that_failed_its_gate_is_never_production_even_when_most_accurate():
    table = rows()
    for row in table:
        if row.gate == "passed":
            row.gate = "failed"
    assert choose_production(table) is None


def test_a_size_tie_goes_to_the_lower_latency():
    table = rows()
    table[3].size_bytes, table[3].latency_ms_p50 = 15_000, 0.01
    best = choose_production(table)
    assert best is not None and best.method == "fuse"


def test_the_shadow_is_the_runner_up_outside_the_traffic_split():
    table = rows()
    shadow = choose_shadow(table, {"models/digits/versions/4", "models/digits/versions/1"})
    assert shadow is not None and shadow.method == "fuse"


def test_a_failed_gate_is_a_row_in_the_table_and_the_json_not_a_crash():
    result = DemoResult(trained="models/digits/versions/1",
                        production="models/digits/versions/4", rows=rows(),
                        phases={"train": 5.0}, wall_seconds=42.5)
    result.rows[2].role = "production 90%"
    out = io.StringIO()
    render(result, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "distill" in text and "failed" in text and "accuracy dropped 15.88" in text
    assert "wall time 42.5s" in text and "production 90%" in text
    document = json.loads(json.dumps(result.to_json()))
    assert document["passed"] is True
    assert [row["gate"] for row in document["rows"] if row["method"] == "distill"] == ["failed"]


def test_without_a_production_version_the_demo_did_not_pass():
    assert DemoResult(rows=rows()).passed is False
    assert DemoResult(rows=rows(), error="training failed: x").passed is False
