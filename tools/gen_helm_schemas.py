"""Generate each service chart's values.schema.json from one shared base, or check they are current.

deploy/helm/schema/base.json holds the values every service chart shares (image, probes,
TLS, auth, metrics, NetworkPolicy, ...); deploy/helm/schema/<chart>.json holds a chart's own
title, its required keys and its own properties (its `settings`, registry's database, the
inference chart's Triton, ...), and may `include` fragments that several charts share (e.g.
"jobs": deploy/helm/schema/jobs.json, the values of the charts of services that run jobs).
The merge is the base's properties, then the fragments', then the chart's (none may redefine
another's), with the required keys in the same order. `--check` fails when a committed schema
differs from what this script writes, so the schemas cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HELM_DIR = REPO / "deploy" / "helm"
SCHEMA_DIR = HELM_DIR / "schema"
SERVICE_CHARTS = ("registry", "trainer", "compressor", "inference")


def _load(path: Path) -> dict[str, Any]:
    loaded = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return loaded


def merged_schema(base: dict[str, Any], own: dict[str, Any],
                  fragments: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The chart's values schema: the base, the fragments the chart includes, then the chart's
    own properties and required keys, under the chart's title."""
    fragments = fragments or {}
    parts = [base, *(fragments[name] for name in own.get("include", [])), own]
    properties: dict[str, Any] = {}
    required: list[str] = []
    for part in parts:
        clashes = sorted(set(properties) & set(part["properties"]))
        if clashes:
            raise ValueError(f"chart schema redefines base properties {clashes}")
        properties.update(part["properties"])
        required.extend(part["required"])
    return {
        "$schema": base["$schema"],
        "title": own["title"],
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


def render(chart: str) -> str:
    """The text of the chart's values.schema.json."""
    own = _load(SCHEMA_DIR / f"{chart}.json")
    fragments = {name: _load(SCHEMA_DIR / f"{name}.json") for name in own.get("include", [])}
    schema = merged_schema(_load(SCHEMA_DIR / "base.json"), own, fragments)
    return json.dumps(schema, indent=2) + "\n"


def target(chart: str) -> Path:
    return HELM_DIR / chart / "values.schema.json"


def stale_charts() -> list[str]:
    """Charts whose committed values.schema.json differs from the generated one."""
    return [chart for chart in SERVICE_CHARTS
            if not target(chart).exists() or target(chart).read_text(encoding="utf-8") != render(chart)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail when a committed schema is not the generated one")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_charts()
        for chart in stale:
            print(f"{target(chart)} is stale: run tools/gen_helm_schemas.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for chart in SERVICE_CHARTS:
        target(chart).write_text(render(chart), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
