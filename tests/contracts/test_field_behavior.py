"""Comments and annotations of field behavior agree: a field documented "Output only." (or
"Identifier.") carries `(maas.common.v1.field_behavior)`, and only such fields do, so the
request conversion drops exactly what the contract says the server sets."""

from __future__ import annotations

import re
from pathlib import Path

PROTOS = Path(__file__).resolve().parents[2] / "protos"
BEHAVIOR_BY_COMMENT = {"Output only.": "FIELD_BEHAVIOR_OUTPUT_ONLY",
                       "Identifier.": "FIELD_BEHAVIOR_IDENTIFIER"}
FIELD = re.compile(r"^\s*(?:repeated |optional )?[\w.<>, ]+ \w+ = \d+")
ENUM_VALUE = re.compile(r"^[A-Z][A-Z0-9_]* = -?\d+")


def documented_fields(text: str):
    """(first comment line, declaration) of every field, declarations joined across lines.
    Members of a oneof are documented by the oneof's comment when it states a behavior."""
    lines = text.splitlines()
    comment, oneof_comment, index = None, None, 0
    while index < len(lines):
        stripped = lines[index].strip()
        if stripped.startswith("//"):
            comment = comment or stripped.removeprefix("//").strip()
        elif stripped.startswith("oneof "):
            oneof_comment, comment = comment or "", None
        elif stripped == "}":
            oneof_comment, comment = None, None
        elif FIELD.match(lines[index]) and not ENUM_VALUE.match(stripped):
            declaration = stripped
            while not declaration.endswith(";"):
                index += 1
                declaration += " " + lines[index].strip()
            stated = oneof_comment if oneof_comment and oneof_comment.startswith(
                tuple(BEHAVIOR_BY_COMMENT)) else comment
            yield stated or "", declaration
            comment = None
        else:
            comment = None
        index += 1


def test_every_output_only_or_identifier_field_is_annotated_and_no_other():
    checked, wrong = 0, []
    for path in sorted(PROTOS.rglob("*.proto")):
        for comment, declaration in documented_fields(path.read_text()):
            expected = next((behavior for prefix, behavior in BEHAVIOR_BY_COMMENT.items()
                             if comment.startswith(prefix)), None)
            annotated = re.search(r"FIELD_BEHAVIOR_\w+", declaration)
            checked += expected is not None
            if (annotated.group(0) if annotated else None) != expected:
                wrong.append(f"{path.relative_to(PROTOS)}: {comment[:40]!r} {declaration}")
    assert checked > 50
    assert not wrong, "\n".join(wrong)
