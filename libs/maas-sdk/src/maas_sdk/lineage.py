"""A version's lineage as a tree: origins at the top, each derived version under its parent.

Built from the registry's `LineageGraph` (nodes and parent → child edges). A version with
two parents (a fused soup) appears under each of them; the version asked about is marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maas.registry.v1 import audit_pb2


@dataclass
class LineageTree:
    """One version (or dataset version) and what was derived from it."""

    name: str
    operation: str = ""
    """The operation that produced it, e.g. "train", "compress"."""
    job: str = ""
    """The job that produced it, when any."""
    focus: bool = False
    """True for the version the lineage was asked for."""
    children: list[LineageTree] = field(default_factory=list)

    @classmethod
    def from_graph(cls, graph: audit_pb2.LineageGraph) -> list[LineageTree]:
        """One tree per origin (a version without a parent in the graph)."""
        nodes = {node.name: node for node in graph.nodes}
        children: dict[str, list[str]] = {}
        has_parent = set()
        for edge in graph.edges:
            children.setdefault(edge.parent, []).append(edge.child)
            has_parent.add(edge.child)
            nodes.setdefault(edge.parent, audit_pb2.LineageNode(name=edge.parent))
            nodes.setdefault(edge.child, audit_pb2.LineageNode(name=edge.child))
        nodes.setdefault(graph.root, audit_pb2.LineageNode(name=graph.root))

        def build(name: str, seen: frozenset[str]) -> LineageTree:
            node = nodes[name]
            return cls(name, node.operation, node.job, name == graph.root,
                       [build(child, seen | {name}) for child in sorted(children.get(name, []))
                        if child not in seen])

        return [build(name, frozenset()) for name in sorted(nodes) if name not in has_parent]

    def label(self) -> str:
        how = f"  ({self.operation}{' by ' + self.job if self.job else ''})" if self.operation else ""
        return f"{self.name}{how}{'  ◀' if self.focus else ''}"

    def render(self) -> str:
        """The tree as indented text with box-drawing branches."""
        lines = [self.label()]

        def walk(tree: LineageTree, prefix: str) -> None:
            for index, child in enumerate(tree.children):
                last = index == len(tree.children) - 1
                lines.append(f"{prefix}{'└── ' if last else '├── '}{child.label()}")
                walk(child, prefix + ("    " if last else "│   "))

        walk(self, "")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "operation": self.operation, "job": self.job,
                "focus": self.focus, "children": [child.to_dict() for child in self.children]}

    def __str__(self) -> str:
        return self.render()
