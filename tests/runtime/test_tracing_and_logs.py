"""Trace context crosses services (one span tree), logs carry the trace id, TLS works."""

from __future__ import annotations

import io
import json
import logging

import pytest
from maas.inference.v1 import deployment_pb2, inference_service_pb2, inference_service_pb2_grpc
from maas.registry.v1 import model_pb2, registry_service_pb2, registry_service_pb2_grpc
from maas_runtime.client import open_channel
from maas_runtime.logs import JsonFormatter
from maas_runtime.server import ServiceBinding, ServiceServer
from maas_runtime.settings import ServiceSettings
from maas_runtime.telemetry import Telemetry
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.support.tls import assert_tls_policy, make_certificates


class Registry(registry_service_pb2_grpc.RegistryServiceServicer):
    async def GetModel(self, request, context):
        logging.getLogger("maas.test.registry").info("looking up %s", request.name)
        return model_pb2.Model(name=request.name)


class Gateway(inference_service_pb2_grpc.InferenceServiceServicer):
    """Calls the registry downstream, like the real inference service resolving a model."""

    def __init__(self, registry_channel):
        self._registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)

    async def GetDeployment(self, request, context):
        model = await self._registry.GetModel(registry_service_pb2.GetModelRequest(name="models/m"))
        return deployment_pb2.Deployment(name=request.name, model=model.name)


async def test_trace_context_crosses_two_services(tmp_path):
    exporter = InMemorySpanExporter()

    def telemetry(name):
        return Telemetry.create(name, span_processors=(SimpleSpanProcessor(exporter),))

    registry_telemetry, gateway_telemetry, client_telemetry = (
        telemetry("registry"), telemetry("inference"), telemetry("client"))
    registry = ServiceServer(
        "registry", ServiceSettings(state_dir=tmp_path), telemetry=registry_telemetry,
        bindings=[ServiceBinding("maas.registry.v1.RegistryService", lambda s:
                                 registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
                                     Registry(), s))])
    registry_port = await registry.start()
    token = (tmp_path / "admin.token").read_text().strip()
    downstream = open_channel(f"127.0.0.1:{registry_port}", token=token,
                              telemetry=gateway_telemetry)
    gateway = ServiceServer(
        "inference", ServiceSettings(state_dir=tmp_path), telemetry=gateway_telemetry,
        bindings=[ServiceBinding("maas.inference.v1.InferenceService", lambda s:
                                 inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
                                     Gateway(downstream), s))])
    gateway_port = await gateway.start()
    client = open_channel(f"127.0.0.1:{gateway_port}", token=token, telemetry=client_telemetry)
    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(JsonFormatter("registry"))
    logging.getLogger("maas.test.registry").addHandler(handler)
    logging.getLogger("maas.test.registry").setLevel(logging.INFO)
    try:
        reply = await inference_service_pb2_grpc.InferenceServiceStub(client).GetDeployment(
            inference_service_pb2.GetDeploymentRequest(name="deployments/d"))
        assert reply.model == "models/m"
    finally:
        logging.getLogger("maas.test.registry").removeHandler(handler)
        await client.close()
        await downstream.close()
        await gateway.stop(0)
        await registry.stop(0)

    spans = exporter.get_finished_spans()
    by_kind = {(s.resource.attributes["service.name"], s.kind): s for s in spans}
    client_span = by_kind[("client", SpanKind.CLIENT)]
    gateway_server = by_kind[("inference", SpanKind.SERVER)]
    gateway_client = by_kind[("inference", SpanKind.CLIENT)]
    registry_server = by_kind[("registry", SpanKind.SERVER)]
    assert len({s.context.trace_id for s in spans}) == 1, "one trace across all hops"
    assert gateway_server.parent.span_id == client_span.context.span_id
    assert gateway_client.parent.span_id == gateway_server.context.span_id
    assert registry_server.parent.span_id == gateway_client.context.span_id

    log_line = json.loads(log_stream.getvalue().splitlines()[0])
    assert log_line["message"] == "looking up models/m"
    assert log_line["trace_id"] == format(registry_server.context.trace_id, "032x")
    assert log_line["span_id"] == format(registry_server.context.span_id, "016x")


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_and_mutual_tls(tmp_path, mutual):
    certs = make_certificates(tmp_path)
    settings = ServiceSettings(
        state_dir=tmp_path / "state", auth_enabled=False,
        tls_cert_file=certs / "server.pem", tls_key_file=certs / "server.key",
        tls_client_ca_file=(certs / "ca.pem") if mutual else None)
    server = ServiceServer("registry", settings, [ServiceBinding(
        "maas.registry.v1.RegistryService",
        lambda s: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(Registry(), s))])
    port = await server.start()

    async def get_model(channel):
        reply = await registry_service_pb2_grpc.RegistryServiceStub(channel).GetModel(
            registry_service_pb2.GetModelRequest(name="models/tls"), timeout=2)
        assert reply.name == "models/tls"

    try:
        await assert_tls_policy(port, certs, mutual, get_model)
    finally:
        await server.stop(0)


async def test_a_service_that_exports_nothing_still_carries_the_trace(tmp_path):
    """The middle hop records no spans, yet the caller's trace reaches the next service."""
    exporter = InMemorySpanExporter()
    exported = (SimpleSpanProcessor(exporter),)
    registry_telemetry = Telemetry.create("registry", span_processors=exported)
    client_telemetry = Telemetry.create("client", span_processors=exported)
    quiet_gateway = Telemetry.create("inference")
    assert not quiet_gateway.exporting
    registry = ServiceServer(
        "registry", ServiceSettings(state_dir=tmp_path, auth_enabled=False),
        telemetry=registry_telemetry,
        bindings=[ServiceBinding("maas.registry.v1.RegistryService", lambda s:
                                 registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
                                     Registry(), s))])
    registry_port = await registry.start()
    downstream = open_channel(f"127.0.0.1:{registry_port}", telemetry=quiet_gateway)
    gateway = ServiceServer(
        "inference", ServiceSettings(state_dir=tmp_path, auth_enabled=False),
        telemetry=quiet_gateway,
        bindings=[ServiceBinding("maas.inference.v1.InferenceService", lambda s:
                                 inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
                                     Gateway(downstream), s))])
    gateway_port = await gateway.start()
    client = open_channel(f"127.0.0.1:{gateway_port}", telemetry=client_telemetry)
    try:
        await inference_service_pb2_grpc.InferenceServiceStub(client).GetDeployment(
            inference_service_pb2.GetDeploymentRequest(name="deployments/d"))
    finally:
        await client.close()
        await downstream.close()
        await gateway.stop(0)
        await registry.stop(0)
    spans = exporter.get_finished_spans()
    client_span = next(s for s in spans if s.kind == SpanKind.CLIENT)
    registry_span = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert {s.resource.attributes["service.name"] for s in spans} == {"client", "registry"}
    assert registry_span.context.trace_id == client_span.context.trace_id
