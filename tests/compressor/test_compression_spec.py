"""The compression spec on its own: defaults filled in, every violation reported at once with
its field, a JSON round trip that keeps what the job was accepted with, and the report's gate."""

from __future__ import annotations

import json

import pytest
from maas_compressor.measure import Measurement
from maas_compressor.pipeline import compression_report
from maas_compressor.spec import CompressionSpec, parse_compression_spec
from maas_runtime.errors import InvalidArgument

S = "compression_job.spec."


def fields(*steps: dict, **overrides) -> dict:
    return {"source_model_version": "models/m@production", "steps": list(steps),
            "evaluation_dataset": "builtin:digits", "output": {"model_id": "out"},
            **overrides}


def test_unset_parameters_get_the_documented_defaults():
    spec = parse_compression_spec(fields(
        {"kind": "prune", "parameters": {"amount": 0.5}},
        {"kind": "distill", "parameters": {"student_architecture": {"kind": "mlp"}, "epochs": 2}},
        {"kind": "convert", "parameters": {}},
        {"kind": "quantize", "parameters": {"dtype": "int8"}}), default_tenant="alice")
    prune, distill, convert, quantize = (step.parameters for step in spec.steps)
    assert prune == {"amount": 0.5, "structured": False, "scope": "global",
                     "finetune_epochs": 0, "learning_rate": 1e-3}
    assert (distill["temperature"], distill["alpha"], distill["batch_size"]) == (4.0, 0.7, 64)
    assert convert == {"opset": 18}
    assert quantize == {"dtype": "int8", "mode": "auto", "per_channel": True,
                        "calibration_samples": 256, "accuracy_aware": False, "tolerance": 0.005}
    assert spec.resources.tenant == "alice" and spec.max_accuracy_drop is None


def test_every_violation_is_reported_at_once_naming_its_field():
    with pytest.raises(InvalidArgument) as refused:
        parse_compression_spec(fields(
            {"kind": "prune", "parameters": {"amount": 1.0, "finetune_epochs": -1}},
            {"kind": "fuse", "parameters": {"model_versions": ["nope"], "weights": [1.0],
                                            "method": "weighted"}},
            max_accuracy_drop=-0.5, output={"model_id": "Bad Id"}), default_tenant="t")
    named = {violation.field for violation in refused.value.field_violations}
    assert named == {S + "steps[0].prune.amount", S + "steps[0].prune.finetune_epochs",
                     S + "steps[1].fuse.model_versions[0]", S + "steps[1].fuse.weights",
                     S + "max_accuracy_drop", S + "output.model_id"}


def test_the_accepted_spec_survives_the_job_table_unchanged():
    spec = parse_compression_spec(fields(
        {"kind": "fuse", "parameters": {"model_versions": ["models/m/versions/2"],
                                        "method": "greedy_soup"}},
        max_accuracy_drop=1.5, seed=7), default_tenant="t")
    stored = json.loads(json.dumps(spec.to_dict()))
    assert CompressionSpec.from_dict(stored) == spec
    assert spec.fuse_members == ["models/m/versions/2"]


def _measured(accuracy: float, size: int = 100) -> Measurement:
    return Measurement(parameters=10, nonzero_parameters=5, artifact_bytes=size,
                       accuracy=accuracy, latency_ms_batch1=1.0, latency_ms_batch32=2.0,
                       runtime="torch")


@pytest.mark.parametrize(("after", "gate", "passed"), [
    (0.90, None, True), (0.90, 5.0, True), (0.90, 4.9, False), (0.96, 0.0, True),
    (0.949, 0.0, False)])
def test_the_gate_compares_the_drop_in_points(after, gate, passed):
    report = compression_report(_measured(0.95), _measured(after, size=25), [], gate)
    assert report["gate_passed"] is passed
    assert report["accuracy_drop"] == pytest.approx((0.95 - after) * 100)
    assert report["size_ratio"] == 0.25
