"""Composition root of the inference service: Triton, registry, deployments → gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path

from maas.inference.v1 import usage_pb2_grpc
from maas_runtime import errors
from maas_runtime.auth import TokenStore
from maas_runtime.database import is_postgresql
from maas_runtime.discovery import discovery_from_settings
from maas_runtime.pagination import PageTokenCodec
from maas_runtime.peers import PeerChannel, PeerTransport
from maas_runtime.registry_client import RegistryClient
from maas_runtime.server import ServiceBinding, ServiceServer, run_service
from maas_runtime.telemetry import LATENCY_BUCKETS_MS, Telemetry

from maas_inference.controller import DeploymentController, LeasePolicy, ServingDefaults
from maas_inference.dataplane import (
    DataPlaneMetrics,
    DataPlaneSpans,
    DataPlaneUsage,
    NativeDataPlane,
    find_binary,
    route_table,
)
from maas_inference.generation import (
    GenerationLimits,
    GenerationMetrics,
    Generator,
    PromptRenderers,
    load_prompt_facts,
)
from maas_inference.kserve import KServeViews
from maas_inference.observability import TritonMetricsCollector, register_inference_metrics
from maas_inference.openai_http import Authenticator, OpenAiEndpoint
from maas_inference.predictor import Predictor
from maas_inference.replicas import DeploymentFollower
from maas_inference.routing import RouteTable
from maas_inference.servicer import (
    KSERVE_ROLES,
    KSERVE_SERVICE,
    InferenceServicer,
    KServeServicer,
    add_inference_to_server,
    add_kserve_to_server,
)
from maas_inference.settings import InferenceSettings
from maas_inference.shared_limits import SharedLimits
from maas_inference.store import SqlDeploymentStore
from maas_inference.tenancy import TenancyConfigSource, TenantLimiter
from maas_inference.triton.client import TritonClient
from maas_inference.triton.launcher import (
    RemoteTriton,
    TritonHealth,
    TritonProcessConfig,
    TritonServerProcess,
    TritonSupervisor,
)
from maas_inference.triton.lockdown import read_control_key
from maas_inference.triton.model_repository import GenerationServing, ModelRepository
from maas_inference.usage import (
    SqlUsageStore,
    TenantLabels,
    UsageLedger,
    UsageMetrics,
    UsageReports,
)
from maas_inference.usage_servicer import USAGE_SERVICE, UsageServicer

_log = logging.getLogger(__name__)
SERVICE_NAME = "maas.inference.v1.InferenceService"


class InferenceApp:
    """Owns the long-lived parts: Triton supervision, the registry client, the route table,
    the deployment controller and the predictor."""

    def __init__(self, settings: InferenceSettings, telemetry: Telemetry | None = None,
                 discovery=None):
        self.settings = settings
        self.telemetry = telemetry
        state = settings.state_dir
        triton_server: RemoteTriton | TritonServerProcess
        if settings.triton_url:
            triton_server = RemoteTriton(
                settings.triton_url, Path(settings.triton_model_repository),
                control_key=(read_control_key(Path(settings.triton_control_key_file))
                             if settings.triton_control_key_file else ""),
                transport=(PeerTransport.from_settings(settings, tls=True)
                           if settings.triton_tls else None))
        else:
            triton_server = TritonServerProcess(TritonProcessConfig(
                state_dir=state / "triton", model_repository=state / "triton" / "models",
                grpc_port=settings.triton_grpc_port, allow_http=settings.triton_http))
        self.supervisor = TritonSupervisor(triton_server, on_restart=self._on_triton_restart,
                                           on_health_change=self._on_health_change)
        self.server: ServiceServer | None = None
        # Round-robin over every healthy registry replica when no target is set (Consul or
        # static discovery), following changes.
        self.registry = RegistryClient(
            PeerChannel.from_settings(settings, "registry", target=settings.registry_target,
                                      discovery=discovery, telemetry=telemetry),
            timeout_seconds=settings.registry_timeout_seconds)
        self.data_plane = NativeDataPlane(
            find_binary(settings.data_plane_binary), host=settings.host, port=settings.port,
            triton_target=lambda: self.supervisor.server.grpc_url, table=self._route_table,
            tokens_file=settings.resolved_tokens_file if settings.auth_enabled else None,
            max_message_bytes=settings.max_message_bytes,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            tls_files=(settings.tls_cert_file, settings.tls_key_file,
                       settings.tls_client_ca_file),
            latency_buckets_ms=LATENCY_BUCKETS_MS,
            access_sample_every=settings.access_log_sample_every,
        ) if settings.data_plane == "native" else None
        self.routes: RouteTable | None = None
        self.controller: DeploymentController | None = None
        self.predictor: Predictor | None = None
        self.generator: Generator | None = None
        self.openai: OpenAiEndpoint | None = None
        """The OpenAI-compatible HTTP endpoint, when `openai_port` is set."""
        self.triton: TritonClient | None = None
        self._alias_task: asyncio.Task | None = None
        self._metrics_task: asyncio.Task | None = None
        self._spans_task: asyncio.Task | None = None
        self._triton_metrics_task: asyncio.Task | None = None
        self.data_plane_spans: DataPlaneSpans | None = None
        """Spans (when exported) and sampled access log lines for what the data plane serves."""
        self._background: set[asyncio.Task] = set()
        self.tenancy = TenancyConfigSource(
            Path(settings.tenancy_file) if settings.tenancy_file else None,
            settings.tenancy_recheck_seconds)
        self.ledger: UsageLedger | None = None
        self.limiter: TenantLimiter | None = None
        self.usage_reports: UsageReports | None = None
        self.data_plane_usage: DataPlaneUsage | None = None
        self._usage_tasks: list[asyncio.Task] = []
        self.follower: DeploymentFollower | None = None
        """Follows other replicas' deployment changes (a shared table only)."""

    def triton_ready(self) -> bool:
        return self.supervisor.health is TritonHealth.SERVING

    def _route_table(self) -> dict:
        routes = self.routes.routes() if self.routes is not None else {}
        return route_table(routes, self.triton_ready(), self.settings.coalesce_calls_per_instance,
                           relay=self.tenancy.current().request_limited())

    async def _publish_routes(self) -> None:
        if self.data_plane is not None:
            await self.data_plane.publish()

    def _on_health_change(self, health: TritonHealth) -> None:
        if self.server is not None and self.server.port:
            self._in_background(self.server.set_serving(health is TritonHealth.SERVING))
        self._in_background(self._publish_routes())

    def _in_background(self, coroutine) -> None:
        """Run `coroutine` as a task that is kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_triton_restart(self) -> None:
        if self.controller is not None:
            await self.controller.reload_all()

    async def start(self) -> None:
        await self.supervisor.start()
        # Client spans on the data path only when they are exported; otherwise the raw
        # `traceparent` the gateway forwards (trace_metadata) carries the caller's trace
        # into Triton at no cost.
        self.triton = TritonClient(
            self.supervisor.server.grpc_url,
            control_key=self.supervisor.server.control_key,
            transport=self.supervisor.server.transport,
            interceptors=(self.telemetry.client_interceptors()
                          if self.telemetry is not None and self.telemetry.exporting else ()))
        await self.registry.open()
        meter = self.telemetry.meter("maas.inference") if self.telemetry else None
        self.store = await asyncio.to_thread(self._open_store)
        self.routes = RouteTable(self.store.get, self.triton_ready,
                                 on_changed=self._publish_routes)
        self.controller = DeploymentController(
            self.store,
            self.registry, self.triton,
            ModelRepository(self.supervisor.server.model_repository),
            self.settings.state_dir / "artifacts",
            ServingDefaults(max_batch_size=self.settings.default_max_batch_size,
                            max_queue_delay_microseconds=(
                                self.settings.default_max_queue_delay_microseconds),
                            drain_seconds=self.settings.rollout_drain_seconds,
                            load_timeout_seconds=self.settings.model_load_timeout_seconds,
                            generation=GenerationServing(
                                max_running_streams=self.settings.generation_max_running_streams,
                                max_waiting_streams=self.settings.generation_max_waiting_streams,
                                torch_threads=self.settings.generation_torch_threads)),
            self.routes,
            PageTokenCodec.from_secret_file(self.settings.resolved_page_token_secret_file),
            LeasePolicy(lease_seconds=self.settings.deployment_create_lease_seconds,
                        max_takeovers=self.settings.deployment_create_max_takeovers))
        await self._start_usage(meter)
        self.predictor = Predictor(
            self.routes, self.triton,
            coalesce_calls_per_instance=self.settings.coalesce_calls_per_instance,
            shadow_max_in_flight=self.settings.shadow_max_in_flight, meter=meter,
            limiter=self.limiter)
        self.generator = Generator(
            self.routes, self.triton,
            PromptRenderers(lambda served: load_prompt_facts(
                served, self.settings.state_dir / "prompts")),
            limits=GenerationLimits(
                default_max_tokens=self.settings.generation_default_max_tokens,
                max_stop_strings=self.settings.generation_max_stop_strings),
            metrics=GenerationMetrics(meter), limiter=self.limiter)
        if self.settings.openai_port is not None:
            self.openai = OpenAiEndpoint(
                lambda: self.generator, lambda: self.controller,
                Authenticator(TokenStore(self.settings.resolved_tokens_file)
                              if self.settings.auth_enabled else None),
                max_body_bytes=self.settings.max_message_bytes)
            port = await self.openai.start(
                self.settings.host, self.settings.openai_port,
                (self.settings.tls_cert_file, self.settings.tls_key_file)
                if self.settings.tls_cert_file and self.settings.tls_key_file else None)
            _log.info("OpenAI-compatible endpoint on http://%s:%d/v1", self.settings.host, port)
        await self.controller.reload_all()
        self._alias_task = asyncio.create_task(self.controller.follow_alias_moves())
        self._start_observability(meter)
        if self.store.shared:  # replicas: follow the others' deployment changes
            self.follower = DeploymentFollower(
                self.store, self.controller, self.settings.deployment_resync_seconds,
                takeover_seconds=self.settings.deployment_create_lease_seconds / 3)
            await self.follower.start()

    def _open_store(self) -> SqlDeploymentStore:
        """The deployment table: `database_url` (shared by replicas), else SQLite here."""
        if self.settings.database_url:
            return SqlDeploymentStore.open(self.settings.database_url)
        return SqlDeploymentStore.open_sqlite(self.settings.state_dir / "deployments.db")

    async def _start_usage(self, meter) -> None:
        """The usage ledger, tenant limits (daily quotas seeded from today's usage), the
        limits file watch (a change republishes the data plane's table: whom it relays) and
        the data plane's usage polling."""
        settings = self.settings
        store = await asyncio.to_thread(SqlUsageStore.open, settings.database_url,
                                        settings.state_dir)
        self.ledger = UsageLedger(store, settings.usage_flush_seconds)
        await self.ledger.start()
        metrics = UsageMetrics(meter, TenantLabels(
            settings.usage_metrics_tenants, lambda: self.tenancy.current().tenants,
            settings.usage_metrics_max_tenants)) if meter is not None else None
        shared = is_postgresql(settings.database_url)
        # Replicas on one PostgreSQL count minute windows and streams there, together.
        self.limiter = TenantLimiter(
            self.tenancy, self.ledger, metrics,
            shared=SharedLimits(settings.database_url, settings.tenancy_stream_lease_seconds)
            if shared else None)
        if shared:  # replicas share the ledger, and daily quotas
            self.ledger.on_written.append(self.limiter.written)
            self.limiter.share_today(await self.ledger.today_by_tenant(datetime.now(UTC)))
            self._usage_tasks.append(asyncio.create_task(
                self._share_usage(settings.usage_share_seconds)))
        else:
            self.limiter.seed_today(await self.ledger.today_by_tenant(datetime.now(UTC)))
        self.usage_reports = UsageReports(
            self.ledger, PageTokenCodec.from_secret_file(settings.resolved_page_token_secret_file))
        self._usage_tasks.append(asyncio.create_task(
            self.tenancy.watch(self._publish_routes, settings.tenancy_recheck_seconds)))
        if self.data_plane is not None:
            self.data_plane_usage = DataPlaneUsage(self.data_plane, self.ledger, metrics,
                                                   settings.usage_flush_seconds)
            self._usage_tasks.append(asyncio.create_task(self.data_plane_usage.run()))

    async def _share_usage(self, every_seconds: float) -> None:
        """Read today's usage of every replica back from the shared ledger, now and then."""
        while True:
            await asyncio.sleep(every_seconds)
            if self.ledger is None or self.limiter is None:
                continue
            try:
                self.limiter.share_today(await self.ledger.today_by_tenant(datetime.now(UTC)))
            except Exception:  # the database is away: the daily quotas use what they knew
                _log.warning("reading today's shared usage failed; retrying", exc_info=True)

    async def _stop_usage(self) -> None:
        """The data plane's last counts taken, and every buffered record written."""
        for task in self._usage_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.data_plane_usage is not None:
            with contextlib.suppress(errors.MaasError):
                await self.data_plane_usage.collect()
        if self.limiter is not None:
            await self.limiter.close()
        if self.ledger is not None:
            await self.ledger.close()

    def _start_observability(self, meter) -> None:
        """Metrics of the data plane, Triton and shadows; the data plane's spans and sampled
        access log lines."""
        settings, telemetry, routes = self.settings, self.telemetry, self.routes
        if meter is not None and routes is not None:
            register_inference_metrics(meter, self.triton_ready, routes.shadow_stats,
                                       self.controller.replica_loads
                                       if self.controller is not None else dict)
        if self.data_plane is not None and meter is not None:
            data_plane_metrics = DataPlaneMetrics(self.data_plane, meter,
                                                  settings.triton_metrics_poll_seconds)
            if telemetry is not None:
                telemetry.register_collector(data_plane_metrics.collector())
            self._metrics_task = asyncio.create_task(data_plane_metrics.run())
        exporting = self.telemetry is not None and self.telemetry.exporting
        if self.data_plane is not None and (exporting or settings.access_log_sample_every):
            self.data_plane_spans = DataPlaneSpans(
                self.data_plane,
                self.telemetry.tracer("maas.inference.dataplane") if exporting and
                self.telemetry is not None else None,
                sample_every=settings.access_log_sample_every)
            self._spans_task = asyncio.create_task(self.data_plane_spans.run())
        if telemetry is not None and telemetry.prometheus is not None and routes is not None:
            triton_metrics = TritonMetricsCollector(
                self._triton_metrics_url, routes.routes,
                settings.triton_metrics_poll_seconds)
            telemetry.register_collector(triton_metrics)
            self._triton_metrics_task = asyncio.create_task(triton_metrics.run())

    def _triton_metrics_url(self) -> str:
        return self.settings.triton_metrics_url or getattr(self.supervisor.server,
                                                           "metrics_url", "")

    async def stop(self) -> None:
        for task in (self._alias_task, self._metrics_task, self._spans_task,
                     self._triton_metrics_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.follower is not None:
            await self.follower.stop()
        if self.openai is not None:
            await self.openai.stop()
        if self.predictor is not None:
            await self.predictor.close()
        await self._stop_usage()
        if self.controller is not None:
            await self.controller.close()
            self.store.close()
        if self.triton is not None:
            await self.triton.close()
        await self.supervisor.stop()
        await self.registry.close()


def build_server(settings: InferenceSettings, telemetry: Telemetry | None = None,
                 discovery=None) -> tuple[ServiceServer, InferenceApp]:
    if not settings.registry_target and discovery is None:
        discovery = discovery_from_settings(settings)
    app = InferenceApp(settings, telemetry, discovery)

    def add_inference(server):
        add_inference_to_server(
            InferenceServicer(app.controller, app.predictor, app.generator), server)

    def add_usage(server):
        usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(app.usage_reports),
                                                          server)

    def add_kserve(server):
        views = KServeViews(app.controller, app.routes, lambda: app.triton)
        add_kserve_to_server(KServeServicer(app.predictor, views, app.triton_ready), server)

    server = ServiceServer(
        "inference", settings,
        [ServiceBinding(SERVICE_NAME, add_inference),
         ServiceBinding(KSERVE_SERVICE, add_kserve, method_roles=KSERVE_ROLES),
         ServiceBinding(USAGE_SERVICE, add_usage)],
        telemetry=telemetry, discovery=discovery, front_door=app.data_plane,
        request_labels=deployment_labels)
    server.before_start.append(app.start)
    server.on_stop.append(app.stop)
    app.server = server
    return server, app


def deployment_labels(method: str, request) -> dict[str, str]:
    """The deployment a request names, for its access log line and RPC metrics: Predict's
    `deployment`, KServe's `model_name`, a deployment resource's `name`."""
    for field_name in ("deployment", "name", "model_name"):
        value = getattr(request, field_name, "")
        if isinstance(value, str) and value:
            if field_name == "model_name":
                return {"deployment": value}
            if value.startswith("deployments/"):
                return {"deployment": value.removeprefix("deployments/").split("/")[0]}
    return {}


def main() -> None:
    run_service("inference", InferenceSettings(),
                lambda settings, telemetry, discovery: build_server(settings, telemetry,
                                                                    discovery)[0])


if __name__ == "__main__":
    main()
