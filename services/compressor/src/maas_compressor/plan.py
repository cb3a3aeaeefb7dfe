"""A compression job's plan, and the files that pass it to and from the job process.

The plan (the validated spec, the registry versions it resolved to, the dataset's facts) is
what the job table stores. In the job's directory the service stages `inputs/` (the source,
the fuse members, the dataset: downloaded and verified against their sha256) and writes
`run.json`; the job process works in `work/`, and at the end writes the result artifact under
`result/` and `result.json` (the report, the artifact's file and format). A job whose
`result.json` exists has finished its work: only the gate and the registration remain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maas_formats.dataset_sources import DatasetFacts
from maas_jobs.files import JobRunConfig, write_json_atomically
from maas_runtime.contract_enums import MODEL_FORMAT_HF_TRANSFORMER, MODEL_FORMAT_ONNX

from maas_compressor.spec import PYDOC, CompressionSpec

RESULT_FILENAME = "result.json"
LOG_FILENAME = "job.log"
INPUTS_DIRECTORY = "inputs"
WORK_DIRECTORY = "work"
RESULT_DIRECTORY = "result"
PYDOC_SENTENCES = DatasetFacts(PYDOC, feature_shape=(1,), num_classes=0, row_count=0,
                               format="text")
"""The sentence encoders' evaluation set: held-out `pydoc_data.topics` sentences, read from
the standard library in the job process (nothing staged). Also what an empty
`evaluation_dataset` resolves to; `inspection.check_plan` refuses it for a classifier."""


@dataclass(frozen=True)
class InputVersion:
    """A registry model version the job reads, as resolved when the job was accepted."""

    reference: str
    """As the caller named it: `models/m@production` or `models/m/versions/3`."""
    name: str
    """The resolved version: `models/m/versions/3`."""
    format: str
    sha256: str
    size_bytes: int
    signature: dict[str, Any]
    """The registry's `Signature` (proto JSON shape); an ONNX version's only description."""
    filename: str
    """Where it is staged, relative to the job's directory."""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_version(cls, reference: str, version: dict[str, Any], filename: str) -> InputVersion:
        artifact = version.get("artifact", {})
        return cls(reference=reference, name=version["name"], format=version.get("format", ""),
                   sha256=artifact.get("sha256", ""), size_bytes=int(artifact.get("size_bytes", 0)),
                   signature=dict(version.get("signature", {})), filename=filename,
                   labels=dict(version.get("labels", {})))

    @property
    def is_onnx(self) -> bool:
        return self.format == MODEL_FORMAT_ONNX

    @property
    def is_encoder(self) -> bool:
        """A Hugging Face sentence encoder (zip of config, tokenizer and weights)."""
        return self.format == MODEL_FORMAT_HF_TRANSFORMER

    def as_version(self) -> dict[str, Any]:
        """The `ModelVersion` dict the registry client downloads by."""
        return {"name": self.name,
                "artifact": {"sha256": self.sha256, "size_bytes": self.size_bytes}}


@dataclass(frozen=True)
class CompressionPlan:
    """What an accepted job will do."""

    spec: CompressionSpec
    source: InputVersion
    members: list[InputVersion]
    """Fuse members in the order of the spec's `fuse_members`."""
    dataset: DatasetFacts
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C trace context of the creating request, continued by staging and registration."""

    @property
    def dataset_filename(self) -> str:
        return f"{INPUTS_DIRECTORY}/{self.dataset.staged_filename}"

    def member(self, name: str) -> InputVersion:
        """A fuse member by the name a step uses: as requested, or resolved."""
        for member in self.members:
            if name in (member.reference, member.name):
                return member
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "compression": self.spec.to_dict(), "source": asdict(self.source),
            "members": [asdict(member) for member in self.members],
            "dataset": self.dataset.to_dict()}
        if self.trace_context:
            document["trace_context"] = dict(self.trace_context)
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> CompressionPlan:
        return cls(CompressionSpec.from_dict(document["compression"]),
                   InputVersion(**document["source"]),
                   [InputVersion(**member) for member in document["members"]],
                   DatasetFacts.from_dict(document["dataset"]),
                   dict(document.get("trace_context", {})))


@dataclass(frozen=True)
class RunConfig(JobRunConfig[CompressionPlan]):
    """`run.json`: everything the job process reads."""

    @classmethod
    def plan_from_dict(cls, document: dict[str, Any]) -> CompressionPlan:
        return CompressionPlan.from_dict(document)


@dataclass(frozen=True)
class RunResult:
    """`result.json`: the finished pipeline's report and artifact."""

    report: dict[str, Any]
    """The `CompressionReport` in the contract's JSON shape."""
    artifact: str
    """The result artifact, relative to the job's directory."""
    format: str
    """Its registry format name, e.g. "MODEL_FORMAT_ONNX"."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels the result's own files decide (an encoder's `text.*` facts); empty otherwise."""

    def write(self, workdir: Path) -> None:
        write_json_atomically(workdir / RESULT_FILENAME, asdict(self))

    @classmethod
    def read(cls, workdir: Path) -> RunResult | None:
        path = workdir / RESULT_FILENAME
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))
