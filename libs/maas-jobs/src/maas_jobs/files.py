"""Files a service and its job processes hand each other in a job's directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

RUN_CONFIG_FILENAME = "run.json"


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    """A reader (or a restarted service) sees the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class JobPlan(Protocol):
    """What a service stores in its job table and hands its job process: a JSON document."""

    def to_dict(self) -> dict[str, Any]: ...


P = TypeVar("P", bound=JobPlan)


@dataclass(frozen=True)
class JobRunConfig(Generic[P]):
    """`run.json`: everything the job process reads. Each service subclasses it with the
    one thing that is its own, how its plan is read back (`plan_from_dict`)."""

    job_name: str
    plan: P
    torch_threads: int

    @classmethod
    def plan_from_dict(cls, document: dict[str, Any]) -> P:
        raise NotImplementedError

    def write(self, workdir: Path) -> None:
        write_json_atomically(workdir / RUN_CONFIG_FILENAME, {
            "job_name": self.job_name, "plan": self.plan.to_dict(),
            "torch_threads": self.torch_threads})

    @classmethod
    def read(cls, workdir: Path) -> Self:
        document = json.loads((workdir / RUN_CONFIG_FILENAME).read_text(encoding="utf-8"))
        return cls(document["job_name"], cls.plan_from_dict(document["plan"]),
                   int(document["torch_threads"]))
