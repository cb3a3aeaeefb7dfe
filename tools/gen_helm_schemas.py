"""Generate each chart's values.schema.json from one shared base, or check they are current.

deploy/helm/schema/base.json holds the values every service chart shares (image, probes,
TLS, auth, metrics, NetworkPolicy, ...); deploy/helm/schema/<chart>.json holds a chart's own
title, its required keys and its own properties (its `settings`, registry's database, the
inference chart's Triton, ...), and may `include` fragments that several charts share (e.g.
"jobs": deploy/helm/schema/jobs.json, the values of the charts of services that run jobs).
The merge is the base's properties, then the fragments', then the chart's (none may redefine
another's), with the required keys in the same order.

A chart's `settings` (rendered as MAAS_<NAME>_<FIELD> env vars) is generated from the
service's pydantic settings class (`"settings": {"from": "module:Class"}`): every field, with
its type and bounds, except those the chart sets itself from its own values; the
parts list those in `settingsExclude` (base, fragments) and `settings.exclude` (the chart),
each with the value that sets it or why it is left out. An excluded name that is no field,
like a field neither listed nor excluded, cannot happen: a new settings field appears in the
schema at the next run, and `--check` fails until it does.

The umbrella chart's schema (deploy/helm/schema/maas.json, "standalone") is its own, but takes
`global` from the base, so the globals it passes down are checked the same way there.

`--check` fails when a committed schema differs from what this script writes, so the schemas
cannot drift apart.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HELM_DIR = REPO / "deploy" / "helm"
SCHEMA_DIR = HELM_DIR / "schema"
SERVICE_CHARTS = ("registry", "trainer", "compressor", "inference")
CHARTS = (*SERVICE_CHARTS, "maas")
"""Every chart with a generated values.schema.json: the service charts and the umbrella."""


def _load(path: Path) -> dict[str, Any]:
    loaded = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return loaded


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`X | None` fields as X: a chart sets a value or leaves the field to its default."""
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    if "anyOf" in schema and len(options) == 1:
        schema = {**options[0], **{k: v for k, v in schema.items() if k != "anyOf"}}
    return schema


def settings_schema(class_path: str, excluded: dict[str, str]) -> dict[str, Any]:
    """The `settings` value of a chart: the fields of the settings class at `class_path`
    ("module:Class") that `excluded` does not name, each as its JSON schema: type and bounds
    (no default: defaults belong to the service, and some depend on the machine; no
    description: the class documents its fields, and a reworded docstring changes nothing a
    chart accepts)."""
    module_name, class_name = class_path.split(":")
    settings_class = getattr(importlib.import_module(module_name), class_name)
    fields = settings_class.model_json_schema(by_alias=False)["properties"]
    stale = sorted(set(excluded) - set(fields))
    if stale:
        raise ValueError(f"{class_name} has no fields {stale}: drop them from the exclusions")
    properties = {}
    for name, schema in fields.items():
        if name in excluded:
            continue
        cleaned = _without_null({k: v for k, v in schema.items()
                                 if k not in ("title", "default", "description")})
        properties[name] = cleaned
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "description": f"Service settings by field name, rendered as MAAS_<NAME>_<FIELD>: every field "
                       f"of {class_name} the chart does not set from its own values.",
    }


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
    if "settings" in own:
        excluded = {name: reason for part in parts
                    for name, reason in part.get("settingsExclude", {}).items()}
        excluded.update(own["settings"].get("exclude", {}))
        properties["settings"] = settings_schema(own["settings"]["from"], excluded)
    return {
        "$schema": base["$schema"],
        "title": own["title"],
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


def standalone_schema(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A chart that is no service chart (the umbrella): its own schema, where a property
    written {"$base": name} is the base's property of that name (the umbrella's `global`)."""
    schema = {key: value for key, value in own.items() if key not in ("$comment", "standalone")}
    schema["properties"] = {
        name: base["properties"][value["$base"]] if isinstance(value, dict) and "$base" in value else value
        for name, value in own["properties"].items()}
    return schema


def render(chart: str) -> str:
    """The text of the chart's values.schema.json."""
    own = _load(SCHEMA_DIR / f"{chart}.json")
    base = _load(SCHEMA_DIR / "base.json")
    if own.get("standalone"):
        return json.dumps(standalone_schema(base, own), indent=2) + "\n"
    fragments = {name: _load(SCHEMA_DIR / f"{name}.json") for name in own.get("include", [])}
    schema = merged_schema(base, own, fragments)
    return json.dumps(schema, indent=2) + "\n"


def target(chart: str) -> Path:
    return HELM_DIR / chart / "values.schema.json"


def stale_charts() -> list[str]:
    """Charts whose committed values.schema.json differs from the generated one."""
    return [chart for chart in CHARTS
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
    for chart in CHARTS:
        target(chart).write_text(render(chart), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
