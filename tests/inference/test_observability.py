"""The inference service's own series and the data plane's sampled access lines, without
Triton: a stand-in data plane and a stand-in Triton metrics page."""

from __future__ import annotations

import io
import json
import logging

from maas_inference.dataplane import DataPlaneLatencyCollector, DataPlaneSpans
from maas_inference.observability import TritonMetricsCollector
from maas_inference.routing import Route, ServedModel

TRITON_PAGE = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="digits.digits.v1",version="1"} 7
nv_inference_request_success{model="orphan.m.v1",version="1"} 2
# HELP nv_gpu_utilization GPU utilization
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="x"} 0.5
"""


class RecordingDataPlane:
    def __init__(self, records):
        self._records = records

    async def spans(self):
        records, self._records = self._records, []
        return {"spans": records, "dropped": 0}


def record(**overrides):
    return {"traceparent": "", "principal": "alice", "sampled": True,
            "method": "/maas.inference.v1.InferenceService/Predict", "deployment": "digits",
            "triton_model": "digits.digits.v1", "outcome": "OK",
            "start_unix_nanos": 1_000_000_000, "end_unix_nanos": 1_002_500_000, **overrides}


async def test_sampled_data_plane_requests_become_access_lines_with_the_same_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    from maas_runtime.logs import JsonFormatter
    handler.setFormatter(JsonFormatter("inference"))
    access = logging.getLogger("maas.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    traced = record(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    unsampled = record(sampled=False, traceparent=traced["traceparent"])  # span only
    try:
        spans = DataPlaneSpans(RecordingDataPlane([record(), traced, unsampled]), tracer=None,
                               sample_every=10)
        assert await spans.export() == 3
    finally:
        access.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert {(line["principal"], line["deployment"], line["outcome"], line["served_by"],
             line["sample_every"], line["duration_ms"]) for line in lines} == {
        ("alice", "digits", "OK", "data-plane", 10, 2.5)}
    assert "trace_id" not in lines[0]
    assert lines[1]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_data_plane_latency_buckets_become_a_cumulative_histogram():
    stats = {"latency_bounds_ms": [1.0, 5.0], "deployments": {
        "digits": {"served": 6, "declined": 0, "latency_buckets": [2, 3, 1],
                   "latency_sum_ms": 14.0},
        "": {"served": 0, "declined": 4, "latency_buckets": [], "latency_sum_ms": 0}}}
    (family,) = DataPlaneLatencyCollector(lambda: stats).collect()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples
               if s.labels["deployment"] == "digits"}
    assert samples[(family.name + "_bucket", "1.0")] == 2
    assert samples[(family.name + "_bucket", "5.0")] == 5
    assert samples[(family.name + "_bucket", "+Inf")] == 6
    assert samples[(family.name + "_sum", None)] == 14.0
    assert {s.labels["deployment"] for s in family.samples} == {"digits"}


def model(version: str, triton_model: str) -> ServedModel:
    return ServedModel(version=version, triton_model=triton_model, signature=None)  # type: ignore[arg-type]


async def test_triton_series_are_reexported_under_deployment_and_version():
    routes = {"digits": Route(targets=((model("models/digits/versions/1", "digits.digits.v1"),
                                        100),))}
    collector = TritonMetricsCollector(lambda: "", lambda: routes)
    collector._text = TRITON_PAGE  # what the last fetch brought
    collector.scrape_ok = True
    families = {family.name: family for family in collector.collect()}
    success = {s.labels.get("triton_model"): s for s in
               families["maas_triton_inference_request_success"].samples}
    assert success["digits.digits.v1"].labels == {
        "deployment": "digits", "version": "models/digits/versions/1",
        "triton_model": "digits.digits.v1"}
    assert success["digits.digits.v1"].value == 7
    assert success["orphan.m.v1"].labels["deployment"] == ""
    assert families["maas_triton_gpu_utilization"].samples[0].labels == {"gpu_uuid": "x"}
    assert families["maas_triton_scrape_ok"].samples[0].value == 1


async def test_an_unreachable_triton_reports_scrape_failure():
    collector = TritonMetricsCollector(lambda: "http://127.0.0.1:9/metrics", dict,
                                       timeout_seconds=0.5)
    await collector.refresh()
    (up,) = [f for f in collector.collect() if f.name == "maas_triton_scrape_ok"]
    assert up.samples[0].value == 0
