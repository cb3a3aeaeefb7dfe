"""A labelled text set that ships offline: paragraphs of Python's own documentation.

`pydoc_data.topics` (in the standard library) holds the text of the language reference's help
topics. A paragraph is labelled by the topic family it comes from; the families read
differently enough (string methods, the debugger's commands, container types, how code runs
and fails) that a small classifier does far better than chance, and every machine has them.
"""

from __future__ import annotations

import csv
import io
import re

TOPIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "strings": ("string-methods", "formatstrings"),
    "debugger": ("debugger",),
    "containers": ("typesseq", "typesmapping", "typesseq-mutable", "dict"),
    "execution": ("execmodel", "import", "try", "raise", "naming", "exceptions"),
}
MAX_CHARACTERS = 300


def pydoc_paragraphs(per_class: int = 80) -> list[tuple[str, str]]:
    """(paragraph, family) pairs, `per_class` per family, in a fixed interleaved order."""
    from pydoc_data.topics import topics

    by_family: dict[str, list[str]] = {}
    for family, names in TOPIC_FAMILIES.items():
        paragraphs = []
        for name in names:
            for paragraph in topics[name].split("\n\n"):
                text = re.sub(r"\s+", " ", paragraph).strip()
                if len(text) >= 60:
                    paragraphs.append(text[:MAX_CHARACTERS])
        by_family[family] = paragraphs[:per_class]
    rows = []
    for index in range(per_class):
        for family, paragraphs in by_family.items():
            if index < len(paragraphs):
                rows.append((paragraphs[index], family))
    return rows


def text_csv(rows: list[tuple[str, str]], text_column: str = "text",
             label_column: str = "label") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([text_column, label_column])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")
