"""The gRPC server every MaaS service runs: one composition of the shared runtime.

`ServiceServer` wires an aio server with tracing, access logs, error mapping and auth
interceptors; the `grpc.health.v1` service (Check and Watch, per service) and reflection;
TLS when configured; registration in discovery; and graceful shutdown (health NOT_SERVING,
deregister, drain with grace, stop).

Health has two meanings. The logical service name (e.g. "inference") says whether the
service can do its work now (readiness: the inference service is NOT_SERVING while Triton
restarts). `LIVENESS_SERVICE` says only that the process is up and its event loop answers:
a liveness probe on it never restarts a service for a dependency's outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from maas_runtime.auth import Role, TokenStore, ensure_admin_token
from maas_runtime.interceptors import (
    AccessLogInterceptor,
    AuthInterceptor,
    ErrorInterceptor,
    RequestLabeller,
    method_roles_from_descriptors,
)
from maas_runtime.settings import ServiceSettings
from maas_runtime.telemetry import Telemetry
from maas_runtime.tls import server_credentials

if TYPE_CHECKING:
    from maas_runtime.discovery import ServiceDiscovery

_log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS_SERVICE = "liveness"
"""Health name that stays SERVING from start to shutdown, whatever `set_serving` says."""


@dataclass
class ServiceBinding:
    """One gRPC service to expose: its full proto name and how to add its servicer."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    method_roles: Mapping[str, Role] | None = None
    """Roles for services without `(maas.common.v1.required_role)` options (e.g. KServe v2)."""


class FrontDoor(Protocol):
    """Something else that owns the public port and passes calls on to this server.

    With a front door the gRPC server binds a loopback port only (`backend_target`); the front
    door binds `settings.host:settings.port` (with the settings' TLS) and that port is what
    discovery registers. It stays open while the server drains at shutdown.
    """

    async def open(self, backend_target: str) -> int:
        """Start serving on the public port; returns the bound port."""
        ...

    async def close(self) -> None:
        """Stop accepting calls and finish the ones in flight (within the shutdown grace)."""
        ...


@dataclass
class ServiceServer:
    """A running (or ready to run) service: server, health, discovery registration."""

    name: str
    """Logical service name used for health and discovery, e.g. "registry"."""
    settings: ServiceSettings
    bindings: list[ServiceBinding]
    telemetry: Telemetry | None = None
    discovery: ServiceDiscovery | None = None
    """A `maas_runtime.discovery.ServiceDiscovery`, or None to skip registration."""
    extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = ()
    before_start: list[Callable] = field(default_factory=list)
    """Async callbacks run before the port opens (bring up what the servicers need)."""
    warm_up: list[Callable] = field(default_factory=list)
    """Async callbacks run once the port is open but before the service reports SERVING
    (health NOT_SERVING, liveness SERVING meanwhile), e.g. the registry's start-up blob
    collection; `start` returns after them."""
    on_start: list[Callable] = field(default_factory=list)
    """Async callbacks run once the server is serving (background loops, supervisors)."""
    on_stop: list[Callable] = field(default_factory=list)
    """Async callbacks run after the server stopped (close stores, stop subprocesses)."""
    front_door: FrontDoor | None = None
    request_labels: RequestLabeller | None = None
    """Labels a unary request adds to its access log line and RPC metrics (the inference
    service: the deployment it names)."""

    health: HealthServicer = field(init=False)
    port: int = field(init=False, default=0)
    _server: grpc.aio.Server | None = field(init=False, default=None)
    _instance_id: str | None = field(init=False, default=None)
    _stopped: asyncio.Event | None = field(init=False, default=None)

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        chain: list[grpc.aio.ServerInterceptor] = []
        meter = None
        if self.telemetry is not None:
            chain.append(self.telemetry.server_interceptor())
            meter = self.telemetry.meter("maas.rpc")
        chain.append(AccessLogInterceptor(meter, service=self.name,
                                          request_labels=self.request_labels))
        chain.append(ErrorInterceptor())
        if self.settings.auth_enabled:
            chain.append(AuthInterceptor(TokenStore(self.settings.resolved_tokens_file),
                                         self._method_roles()))
        chain.extend(self.extra_interceptors)
        return chain

    def _method_roles(self) -> dict[str, Role]:
        roles = method_roles_from_descriptors(
            service_names=[b.full_name for b in self.bindings if b.method_roles is None]
        )
        for binding in self.bindings:
            roles.update(binding.method_roles or {})
        return roles

    async def start(self) -> int:
        """Bind, start serving and register in discovery; returns the bound port."""
        if self.settings.auth_enabled:
            # Before anything else: `before_start` callbacks may read it to call peers.
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            ensure_admin_token(self.settings.resolved_admin_token_file,
                               self.settings.resolved_tokens_file)
        try:
            await self._start_serving()
        except BaseException:
            if self.front_door is not None:
                with contextlib.suppress(Exception):
                    await self.front_door.close()
            if self._server is not None:
                await self._server.stop(0)
                self._server = None
            for callback in self.on_stop:  # undo what before_start brought up
                with contextlib.suppress(Exception):
                    await callback()
            raise
        return self.port

    async def _start_serving(self) -> None:
        for callback in self.before_start:
            await callback()
        self._server = grpc.aio.server(
            interceptors=self._interceptors(), options=self.settings.grpc_message_options()
        )
        for binding in self.bindings:
            binding.add_to_server(self._server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        service_names = [b.full_name for b in self.bindings]
        reflection.enable_server_reflection(
            [*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], self._server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        if self.front_door is not None:
            backend_port = self._server.add_insecure_port("127.0.0.1:0")
        elif self.settings.tls_cert_file and self.settings.tls_key_file:  # tls_enabled
            self.port = self._server.add_secure_port(
                address,
                server_credentials(self.settings.tls_cert_file, self.settings.tls_key_file,
                                   self.settings.tls_client_ca_file),
            )
        else:
            self.port = self._server.add_insecure_port(address)
        await self._server.start()
        ready = NOT_SERVING if self.warm_up else SERVING
        for health_name in ("", self.name, *service_names):
            await self.health.set(health_name, ready)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        if self.front_door is not None:
            self.port = await self.front_door.open(f"127.0.0.1:{backend_port}")
        self._stopped = asyncio.Event()
        for callback in self.warm_up:
            await callback()
        if self.warm_up:
            await self.set_serving(True)
        for callback in self.on_start:
            await callback()
        if self.discovery is not None:
            self._instance_id = await self.discovery.register(
                self.name, self.settings.advertise_host or self.settings.host, self.port,
                tls=self.settings.tls_enabled,
            )
        _log.info("%s serving on %s:%d", self.name, self.settings.host, self.port,
                  extra={"port": self.port, "tls": self.settings.tls_enabled})

    async def set_serving(self, serving: bool) -> None:
        """Report the whole service (and each of its gRPC services) SERVING or NOT_SERVING;
        liveness is left alone."""
        status = SERVING if serving else NOT_SERVING
        for health_name in ("", self.name, *(b.full_name for b in self.bindings)):
            await self.health.set(health_name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, deregister, drain in-flight RPCs, then stop."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.discovery is not None and self._instance_id is not None:
            try:
                await self.discovery.deregister(self._instance_id)
            except Exception:  # a dead agent must not block shutdown
                _log.warning("deregistration of %s failed", self._instance_id, exc_info=True)
        if self.front_door is not None:  # it drains first: its calls are served behind it
            await self.front_door.close()
        await self._server.stop(grace)
        for callback in self.on_stop:
            await callback()
        self._server = None
        if self._stopped is not None:
            self._stopped.set()

    async def serve_until_signal(self) -> None:
        """Start, then run until SIGTERM/SIGINT, then shut down gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await stop_requested.wait()
        await self.stop()


def run_service(name: str, settings: ServiceSettings, build_server) -> None:
    """The body of every service's `main()`: logs, telemetry, discovery, serve until signalled.

    `build_server(settings, telemetry, discovery)` is the service's composition root.
    """
    from maas_runtime.discovery import discovery_from_settings
    from maas_runtime.logs import configure_logging

    configure_logging(name, settings.log_level)
    telemetry = Telemetry.create(name, otlp_endpoint=settings.otlp_endpoint,
                                 metrics_port=settings.metrics_port, metrics_host=settings.host)
    if telemetry.prometheus is not None:
        _log.info("%s metrics on %s", name, telemetry.prometheus.url,
                  extra={"metrics_port": telemetry.prometheus.port})
    server = build_server(settings, telemetry, discovery_from_settings(settings))
    try:
        asyncio.run(server.serve_until_signal())
    finally:
        telemetry.shutdown()
