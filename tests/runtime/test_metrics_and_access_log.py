"""Every service's Prometheus endpoint and access log line, on a real server.

A real aio server (port 0) with the runtime's interceptors and a `/metrics` endpoint on a free
port: calls answered OK and NOT_FOUND are counted and timed per method and code, and each
access line carries principal, deployment (from the request labeller), outcome and trace id.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas_inference.server import deployment_labels
from maas_runtime import errors
from maas_runtime.client import open_channel
from maas_runtime.logs import JsonFormatter
from maas_runtime.server import ServiceBinding, ServiceServer
from maas_runtime.settings import ServiceSettings
from maas_runtime.telemetry import Telemetry
from prometheus_client.parser import text_string_to_metric_families

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Deployments(inference_service_pb2_grpc.InferenceServiceServicer):
    async def GetDeployment(self, request, context):
        if request.name != "deployments/digits":
            raise errors.NotFound("deployment", request.name)
        return deployment_pb2.Deployment(name=request.name)


def scrape(url: str) -> dict[str, list]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


async def test_rpcs_are_counted_timed_and_logged_with_principal_deployment_and_trace(tmp_path):
    telemetry = Telemetry.create("inference", metrics_port=0)
    server = ServiceServer(
        "inference", ServiceSettings(state_dir=tmp_path), telemetry=telemetry,
        request_labels=deployment_labels,
        bindings=[ServiceBinding("maas.inference.v1.InferenceService", lambda s:
                                 inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
                                     Deployments(), s))])
    port = await server.start()
    token = (tmp_path / "admin.token").read_text().strip()
    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(JsonFormatter("inference"))
    access = logging.getLogger("maas.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        async with open_channel(f"127.0.0.1:{port}", token=token) as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(3):
                await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/digits"),
                                         metadata=(("traceparent", TRACEPARENT),))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        families = scrape(telemetry.prometheus.url)
    finally:
        access.removeHandler(handler)
        await server.stop(0)
        telemetry.shutdown()

    method = "/maas.inference.v1.InferenceService/GetDeployment"
    counts = {(s.labels["deployment"], s.labels["rpc_grpc_status_code"]): s.value
              for s in families["maas_rpc_server_requests"]
              if s.labels["rpc_method"] == method}
    assert counts == {("digits", "OK"): 3, ("nope", "NOT_FOUND"): 1}
    assert {s.labels["service"] for s in families["maas_rpc_server_requests"]} == {"inference"}
    buckets = [s for s in families["maas_rpc_server_duration_milliseconds"]
               if s.name.endswith("_bucket") and s.labels["deployment"] == "digits"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 3

    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    ok, not_found = lines[0], lines[-1]
    assert (ok["principal"], ok["deployment"], ok["outcome"], ok["trace_id"]) == (
        "admin", "digits", "OK", TRACE_ID)
    assert (not_found["principal"], not_found["deployment"], not_found["outcome"]) == (
        "admin", "nope", "NOT_FOUND")
    assert "trace_id" not in not_found  # no traceparent sent, nothing exported


async def test_the_metrics_port_is_off_unless_configured():
    telemetry = Telemetry.create("registry")
    try:
        assert telemetry.prometheus is None
    finally:
        telemetry.shutdown()
