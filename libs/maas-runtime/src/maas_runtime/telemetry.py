"""OpenTelemetry wiring: tracer and meter providers, gRPC interceptors, W3C propagation.

Providers are built by `Telemetry.create` in a service's `main()` (never at import) and
handed to the server and to every client channel, so a trace started by a caller continues
through each hop: client span → server span → downstream client span → Triton.

Metrics leave two ways, both from the same meters: OTLP when an endpoint is set, and a
Prometheus endpoint (`/metrics` on `metrics_port`) through OpenTelemetry's Prometheus
exporter, on a registry of its own so services sharing a process (tests) stay apart.
Series that OpenTelemetry cannot model (histograms counted elsewhere, e.g. by the native
data plane, and Triton's own metrics re-exported) join the same endpoint as collectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context, propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from maas_runtime.interceptors import WrappingInterceptor, guarded, reraise

W3C_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator()])

LATENCY_BUCKETS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
                      2500.0, 5000.0, 10000.0, 30000.0)
"""Bucket bounds of every latency histogram (milliseconds): fine below 10 ms, where the data
plane and Triton answer, up to the 30 s of a slow upload."""


class PrometheusEndpoint:
    """`/metrics` over HTTP for one service: OpenTelemetry's Prometheus reader plus extra
    collectors, on a private `CollectorRegistry`."""

    def __init__(self, host: str, port: int):
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(registry=self.registry)
        self._host, self._wanted_port = host, port
        self._http: Any = None
        self.port = 0

    def start(self) -> int:
        """Serve `/metrics`; returns the bound port (a free one when asked for 0)."""
        from prometheus_client import start_http_server

        http, _thread = start_http_server(self._wanted_port, self._host, registry=self.registry)
        self._http = http
        self.port = http.server_port
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/metrics"

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


@dataclass
class Telemetry:
    """The providers one service uses for its own spans and metrics."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    exporting: bool = False
    """Whether spans go anywhere; when not, servers only carry incoming trace context."""
    prometheus: PrometheusEndpoint | None = None
    """The `/metrics` endpoint, when a metrics port is configured (serving once created)."""

    @classmethod
    def create(
        cls,
        service_name: str,
        *,
        otlp_endpoint: str = "",
        span_processors: tuple[SpanProcessor, ...] = (),
        metric_readers: tuple = (),
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> Telemetry:
        """Providers for `service_name`; spans and metrics go to OTLP when an endpoint is set,
        and metrics to a Prometheus endpoint on `metrics_host:metrics_port` when a port is set
        (0: a free one, see `prometheus.port`)."""
        resource = Resource.create({"service.name": service_name})
        exporting = bool(otlp_endpoint or span_processors)
        # Without an exporter, record only what a caller asked to sample: incoming trace
        # context still propagates to every downstream call, at a fraction of the cost.
        sampler = ParentBased(ALWAYS_ON if exporting else ALWAYS_OFF)
        tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        for processor in span_processors:
            tracer_provider.add_span_processor(processor)
        readers = list(metric_readers)
        if otlp_endpoint:
            tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter(otlp_endpoint)))
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter(otlp_endpoint)))
        prometheus = None
        if metrics_port is not None:
            prometheus = PrometheusEndpoint(metrics_host, metrics_port)
            readers.append(prometheus.reader)
        # W3C trace context is the one wire format every hop (Triton included) understands.
        propagate.set_global_textmap(W3C_PROPAGATOR)
        latency_view = View(instrument_type=Histogram, instrument_name="*duration*",
                            aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_MS))
        telemetry = cls(tracer_provider, MeterProvider(resource=resource, metric_readers=readers,
                                                       views=[latency_view]),
                        exporting, prometheus)
        if prometheus is not None:
            prometheus.start()
        return telemetry

    def register_collector(self, collector) -> None:
        """Add a `prometheus_client` collector to `/metrics` (nothing without a metrics port)."""
        if self.prometheus is not None:
            self.prometheus.registry.register(collector)

    def server_interceptor(self):
        """Server spans when they are exported; otherwise only the incoming W3C context is
        carried into the handler (so downstream calls continue the caller's trace) without
        the cost of building spans nobody receives."""
        if self.exporting:
            return aio_server_interceptor(tracer_provider=self.tracer_provider)
        return TraceContextInterceptor()

    def client_interceptors(self) -> list:
        return list(aio_client_interceptors(tracer_provider=self.tracer_provider))

    def meter(self, name: str):
        return self.meter_provider.get_meter(name)

    def tracer(self, name: str):
        return self.tracer_provider.get_tracer(name)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()


def _otlp_span_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


def _otlp_metric_exporter(endpoint: str):
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """`traceparent` of the current span as gRPC metadata, or None when not sampled.

    For hops that are not instrumented clients (the gateway's raw calls to Triton), so the
    trace continues into Triton's own tracing.
    """
    span_context = trace.get_current_span().get_span_context()
    if not span_context.trace_flags.sampled:
        return None
    carrier: dict[str, str] = {}
    W3C_PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


def current_trace_carrier() -> dict[str, str]:
    """The current W3C trace context as a plain dict (empty when nothing is sampled), to be
    stored with work that outlives the request, e.g. a job published long after its Create."""
    if not trace.get_current_span().get_span_context().trace_flags.sampled:
        return {}
    carrier: dict[str, str] = {}
    W3C_PROPAGATOR.inject(carrier)
    return carrier


@contextlib.contextmanager
def continued_trace(carrier: dict[str, str] | None) -> Iterator[None]:
    """Run the block inside the trace `carrier` came from (see `current_trace_carrier`), so
    calls it makes are children of the request that started the work."""
    if not carrier:
        yield
        return
    token = otel_context.attach(W3C_PROPAGATOR.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


class TraceContextInterceptor(WrappingInterceptor):
    """Attaches an incoming `traceparent`/`tracestate` to the handler's context, no spans."""

    def wrap(self, behaviour, method, response_streaming):
        def before(context):
            carrier = {key: value for key, value in context.invocation_metadata() or ()
                       if key in ("traceparent", "tracestate")}
            return otel_context.attach(W3C_PROPAGATOR.extract(carrier)) if carrier else None

        def after(context, token, failure):
            if token is not None:
                otel_context.detach(token)

        return guarded(behaviour, response_streaming, before, reraise, after)
