"""One trace per user action across processes, collected by an OTLP receiver of the test's own.

Registry, trainer and inference (with its real Triton, Python data plane) run as processes
exporting spans over OTLP/gRPC to an in-process `TraceService` the test implements. The test
is the client: its own spans (kept in memory) start each action, and the services' spans must
continue that trace with the right parents:

- train: client → trainer CreateTrainingJob (server) → trainer's registry calls when the job
  publishes, long after the request returned → registry UploadModelVersion (server);
- deploy: client → inference CreateDeployment (server) → GetModelVersion / DownloadModelVersion
  (inference's client spans) → the registry's server spans;
- predict: client → inference Predict (server) → Triton ModelInfer (inference's client span).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import pytest
from maas_cli.local_suite import LocalSuite
from maas_runtime.client import open_channel
from maas_runtime.telemetry import Telemetry
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.suite_flow import SuiteStubs, deploy, predict, train_and_register

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer,
                   metrics_service_pb2_grpc.MetricsServiceServicer):
    """Keeps every exported span; accepts (and drops) metrics so exporters stay quiet."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    async def Export(self, request, context):
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        for resource_spans in request.resource_spans:
            service = next((attribute.value.string_value
                            for attribute in resource_spans.resource.attributes
                            if attribute.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(
                    ReceivedSpan(service, span.name, span.kind, span.trace_id.hex(),
                                 span.span_id.hex(), span.parent_span_id.hex())
                    for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def start_receiver(receiver: OtlpReceiver) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    # One class serves both Export methods; each service looks up its own handler by name.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def one_span(spans: Iterable[ReceivedSpan], *, service: str, kind: int, method: str,
             parent: ReceivedSpan | None = None) -> ReceivedSpan:
    """The span of `service` for RPC `method` (a suffix of the span name), child of `parent`."""
    matches = [span for span in spans
               if span.service == service and span.kind == kind and span.name.endswith(method)
               and (parent is None or span.parent_span_id == parent.span_id)]
    assert matches, (f"no {service} span for {method} under {parent}; the trace holds:\n"
                     + "\n".join(map(str, spans)))
    return matches[0]


async def trace_of(receiver: OtlpReceiver, trace_id: str, *, wanted: int,
                   timeout: float = 30.0) -> list[ReceivedSpan]:
    """The spans received for `trace_id` once at least `wanted` arrived (exports are batched)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [span for span in receiver.spans if span.trace_id == trace_id]
        if len(spans) >= wanted or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.1)


def client_span(exporter: InMemorySpanExporter, method: str) -> ReceivedSpan:
    span = next(span for span in reversed(exporter.get_finished_spans())
                if span.name.endswith(method))
    return ReceivedSpan("test-client", span.name, CLIENT, f"{span.context.trace_id:032x}",
                        f"{span.context.span_id:016x}", "")


async def test_each_user_action_is_one_trace_across_client_services_and_triton(tmp_path):
    receiver = OtlpReceiver()
    otlp_server, otlp_port = await start_receiver(receiver)
    exported = InMemorySpanExporter()
    client_telemetry = Telemetry.create("test-client",
                                        span_processors=(SimpleSpanProcessor(exported),))
    # Exports every 100 ms instead of every 5 s, so the test does not wait on the batching.
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        endpoint = {"otlp_endpoint": f"http://127.0.0.1:{otlp_port}", "log_level": "WARNING"}
        suite = LocalSuite(tmp_path / "suite", fixed_ports=False, settings={
            "registry": endpoint, "trainer": endpoint,
            "inference": {**endpoint, "data_plane": "python"}})
        await suite.start()
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    try:
        channels = [open_channel(suite.services[name].target, token=suite.token(),
                                 telemetry=client_telemetry)
                    for name in ("registry", "trainer", "inference")]
        try:
            stubs = SuiteStubs(*channels)
            await train_and_register(stubs, "traced")
            train = client_span(exported, "CreateTrainingJob")
            deployment = await deploy(stubs, "traced")
            deploy_span = client_span(exported, "CreateDeployment")
            await predict(stubs, deployment.name)
            predict_span = client_span(exported, "Predict")
        finally:
            for channel in channels:
                await channel.close()

        # train: client → trainer (server) → trainer's publish calls → registry (server)
        spans = await trace_of(receiver, train.trace_id, wanted=9)
        trainer_server = one_span(spans, service="trainer", kind=SERVER,
                                  method="CreateTrainingJob", parent=train)
        upload_client = one_span(spans, service="trainer", kind=CLIENT,
                                 method="UploadModelVersion", parent=trainer_server)
        one_span(spans, service="registry", kind=SERVER, method="UploadModelVersion",
                 parent=upload_client)
        alias_client = one_span(spans, service="trainer", kind=CLIENT, method="SetModelAlias",
                                parent=trainer_server)
        one_span(spans, service="registry", kind=SERVER, method="SetModelAlias",
                 parent=alias_client)

        # deploy: client → inference (server) → registry calls → registry (server)
        spans = await trace_of(receiver, deploy_span.trace_id, wanted=5)
        inference_server = one_span(spans, service="inference", kind=SERVER,
                                    method="CreateDeployment", parent=deploy_span)
        for method in ("GetModelVersion", "DownloadModelVersion"):
            call = one_span(spans, service="inference", kind=CLIENT, method=method,
                            parent=inference_server)
            one_span(spans, service="registry", kind=SERVER, method=method, parent=call)

        # predict: client → inference (server) → Triton (inference's client span)
        spans = await trace_of(receiver, predict_span.trace_id, wanted=2)
        predict_server = one_span(spans, service="inference", kind=SERVER, method="Predict",
                                  parent=predict_span)
        one_span(spans, service="inference", kind=CLIENT, method="ModelInfer",
                 parent=predict_server)
    finally:
        await suite.stop()
        await otlp_server.stop(0)
        client_telemetry.shutdown()
