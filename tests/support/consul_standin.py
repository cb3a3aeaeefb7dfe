"""A stand-in for a Consul agent's HTTP API, for tests that cannot run ``consul``.

It serves the endpoints the discovery library uses, with the request and response
shapes of Consul's HTTP API documentation (api-docs/agent/service, api-docs/health,
api-docs/features/blocking):

- ``PUT /v1/agent/service/register`` (``?replace-existing-checks``), camel- or
  snake-case keys as the agent accepts them, with ``Check``/``Checks`` of gRPC type;
- ``PUT /v1/agent/service/deregister/:service_id`` (404 for an unknown id, as the
  agent answers);
- ``GET /v1/health/service/:service`` with ``passing``, ``tag``, ``dc`` and blocking
  ``index``/``wait`` (``X-Consul-Index``; ``wait`` defaults to 5m, is capped at 10m
  and gets up to ``wait/16`` of jitter);
- ``GET /v1/agent/services`` and ``GET /v1/status/leader``.

Like the agent it really runs each gRPC check - ``grpc.health.v1.Health/Check`` on
``host:port`` for the service named after the ``/`` - every ``Interval``; a new check
starts ``critical``; each status change bumps the index and wakes blocking queries;
and services critical for longer than ``DeregisterCriticalServiceAfter`` are reaped.
Only gRPC checks are supported: a registration with any other check type is refused
with 400 rather than accepted and silently never checked. ``GRPCUseTLS`` probes verify
the server against the default roots; ``TLSSkipVerify`` is accepted but cannot be
honoured (gRPC Python has no switch for it), so such a check stays critical.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["ConsulStandIn", "parse_go_duration"]

_PASSING = "passing"
_CRITICAL = "critical"
_DEFAULT_BLOCKING_WAIT_SECONDS = 5 * 60.0
_MAX_BLOCKING_WAIT_SECONDS = 10 * 60.0
_DEFAULT_CHECK_TIMEOUT_SECONDS = 10.0
_HEALTH_QUERY_PARAMETERS = {"passing", "index", "wait", "tag", "dc", "stale", "consistent"}
_NON_GRPC_CHECK_FIELDS = ("HTTP", "TCP", "TTL", "Args", "ScriptArgs", "H2PING", "UDP")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _BadRequest(Exception):
    """A request the agent would refuse; the message becomes the response body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string such as "10s", "200ms" or "1m30s"."""
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text.lstrip("+"):
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _field(definition: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Read a field the way the agent decodes JSON: any case, snake_case accepted."""
    wanted = name.lower()
    for key, value in definition.items():
        if key.replace("_", "").lower() == wanted:
            return value
    return default


def _duration_field(definition: Mapping[str, Any], name: str) -> float | None:
    value = _field(definition, name)
    if value in (None, ""):
        return None
    try:
        return parse_go_duration(str(value))
    except ValueError as error:
        raise _BadRequest(f"Request decode failed: {name}: {error}") from error


@dataclass
class _Service:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int


@dataclass
class _Check:
    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: list[str]
    grpc_target: str
    use_tls: bool
    interval_seconds: float
    timeout_seconds: float
    deregister_after_seconds: float | None
    notes: str
    status: str
    create_index: int
    modify_index: int
    output: str = ""
    critical_since: float | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)


class ConsulStandIn:
    """An in-process HTTP server answering like a single dev-mode Consul agent."""

    def __init__(
        self,
        *,
        node_name: str = "consul-standin",
        datacenter: str = "dc1",
        minimum_check_interval_seconds: float = 0.0,
        minimum_deregister_after_seconds: float = 60.0,
        reap_interval_seconds: float = 30.0,
    ) -> None:
        """Configure the agent; nothing listens until :meth:`start`.

        A real agent raises check intervals below 1s to 1s; the stand-in allows shorter
        ones by default so tests stay fast. The reaper settings match the agent's.
        """
        self._node_name = node_name
        self._node_id = str(uuid.uuid4())
        self._datacenter = datacenter
        self._minimum_check_interval = minimum_check_interval_seconds
        self._minimum_deregister_after = minimum_deregister_after_seconds
        self._reap_interval = reap_interval_seconds
        self._state_changed = threading.Condition()
        self._index = 1
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._health_queries: list[tuple[str, dict[str, list[str]]]] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    @property
    def http_address(self) -> str:
        """``http://127.0.0.1:<port>``, the value a client takes as CONSUL_HTTP_ADDR."""
        if self._server is None:
            raise RuntimeError("the Consul stand-in is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def health_queries(self) -> list[tuple[str, dict[str, list[str]]]]:
        """Every ``/v1/health/service`` request so far, as (service, query parameters)."""
        with self._state_changed:
            return list(self._health_queries)

    def start(self) -> ConsulStandIn:
        """Listen on 127.0.0.1 on a free port and start the critical-service reaper."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._start_thread(
            lambda: self._server.serve_forever(poll_interval=0.05), "consul-standin-http"
        )
        self._start_thread(self._reap_critical_services, "consul-standin-reaper")
        return self

    def stop(self) -> None:
        """Stop serving, release blocking queries and stop every check."""
        with self._state_changed:
            self._stopping.set()
            for check in self._checks.values():
                check.stop_requested.set()
            self._state_changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ConsulStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- HTTP endpoints -------------------------------------------------------------

    def register_service(self, body: Mapping[str, Any], replace_existing_checks: bool) -> None:
        name = _field(body, "Name")
        if not name:
            raise _BadRequest("Missing service name")
        service_id = _field(body, "ID") or name
        try:
            port = int(_field(body, "Port", 0))
        except (TypeError, ValueError) as error:
            raise _BadRequest(f"Request decode failed: Port: {error}") from error
        tags = list(_field(body, "Tags") or [])
        check_definitions = list(_field(body, "Checks") or [])
        if _field(body, "Check"):
            check_definitions.insert(0, _field(body, "Check"))
        with self._state_changed:
            # Build and validate everything before touching state: a refused
            # registration must leave the agent exactly as it was.
            index = self._index + 1
            existing = self._services.get(service_id)
            service = _Service(
                service_id=service_id,
                name=name,
                address=_field(body, "Address") or "",
                port=port,
                tags=tags,
                meta=dict(_field(body, "Meta") or {}),
                weights=dict(_field(body, "Weights") or {"Passing": 1, "Warning": 1}),
                enable_tag_override=bool(_field(body, "EnableTagOverride", False)),
                create_index=existing.create_index if existing else index,
                modify_index=index,
            )
            new_checks = [
                self._check_from_definition(definition, position, len(check_definitions), service)
                for position, definition in enumerate(check_definitions, start=1)
            ]
            self._index = index
            self._services[service_id] = service
            if replace_existing_checks:
                new_ids = {check.check_id for check in new_checks}
                for check in self._checks_of(service_id):
                    if check.check_id not in new_ids:
                        self._remove_check(check.check_id)
            for check in new_checks:
                previous = self._checks.pop(check.check_id, None)
                if previous is not None:
                    # The agent keeps a re-registered check's last known status.
                    previous.stop_requested.set()
                    check.status, check.output = previous.status, previous.output
                    check.critical_since = previous.critical_since
                    check.create_index = previous.create_index
                self._checks[check.check_id] = check
                self._start_thread(
                    lambda check=check: self._run_check(check), f"check-{check.check_id}"
                )
            self._state_changed.notify_all()

    def deregister_service(self, service_id: str) -> None:
        with self._state_changed:
            if service_id not in self._services:
                raise _BadRequest(
                    f"Unknown service ID {service_id!r}. Ensure that the service ID is "
                    "passed, not the service name.",
                    HTTPStatus.NOT_FOUND,
                )
            self._remove_service(service_id)
            self._next_index()
            self._state_changed.notify_all()

    def health_of_service(
        self, name: str, query: Mapping[str, list[str]]
    ) -> tuple[int, list[dict[str, Any]]]:
        with self._state_changed:
            self._health_queries.append((name, dict(query)))
        unsupported = set(query) - _HEALTH_QUERY_PARAMETERS
        if unsupported:
            raise _BadRequest(f"the Consul stand-in does not implement {sorted(unsupported)}")
        datacenter = query.get("dc", [self._datacenter])[-1]
        if datacenter != self._datacenter:
            raise _BadRequest("No path to datacenter", HTTPStatus.INTERNAL_SERVER_ERROR)
        only_passing = _query_flag(query, "passing")
        wanted_tags = set(query.get("tag", []))
        try:
            index = int(query.get("index", ["0"])[-1] or 0)
        except ValueError as error:
            raise _BadRequest(f"Invalid index: {error}") from error
        wait = _DEFAULT_BLOCKING_WAIT_SECONDS
        if query.get("wait"):
            try:
                wait = min(parse_go_duration(query["wait"][-1]), _MAX_BLOCKING_WAIT_SECONDS)
            except ValueError as error:
                raise _BadRequest(f"Invalid wait time: {error}") from error
        with self._state_changed:
            if index > 0:
                deadline = time.monotonic() + wait + random.uniform(0, wait / 16)  # noqa: S311
                while self._index <= index and not self._stopping.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._state_changed.wait(remaining)
            entries = [
                self._health_entry(service)
                for service in sorted(self._services.values(), key=lambda s: s.service_id)
                if service.name == name and wanted_tags <= set(service.tags)
            ]
            if only_passing:
                entries = [
                    entry
                    for entry in entries
                    if all(check["Status"] == _PASSING for check in entry["Checks"])
                ]
            return self._index, entries

    def agent_services(self) -> dict[str, dict[str, Any]]:
        with self._state_changed:
            return {
                service.service_id: {
                    **self._service_json(service),
                    "Datacenter": self._datacenter,
                }
                for service in self._services.values()
            }

    # --- state, called with self._state_changed held --------------------------------

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _check_from_definition(
        self,
        definition: Mapping[str, Any],
        position: int,
        count: int,
        service: _Service,
    ) -> _Check:
        if not isinstance(definition, Mapping):
            raise _BadRequest("Request decode failed: a check must be a JSON object")
        other_types = [name for name in _NON_GRPC_CHECK_FIELDS if _field(definition, name)]
        target = _field(definition, "GRPC")
        if other_types or not target:
            raise _BadRequest(
                f"the Consul stand-in only runs GRPC checks, got {other_types or 'none'}"
            )
        interval = _duration_field(definition, "Interval")
        if not interval or interval <= 0:
            raise _BadRequest("Invalid check: Interval must be > 0 for a GRPC check")
        deregister_after = _duration_field(definition, "DeregisterCriticalServiceAfter")
        if deregister_after is not None:
            deregister_after = max(deregister_after, self._minimum_deregister_after)
        # The agent numbers generated ids only when a service has several checks.
        default_id = f"service:{service.service_id}"
        if count > 1:
            default_id = f"{default_id}:{position}"
        return _Check(
            check_id=_field(definition, "CheckID") or _field(definition, "ID") or default_id,
            name=_field(definition, "Name") or f"Service '{service.name}' check",
            service_id=service.service_id,
            service_name=service.name,
            service_tags=list(service.tags),
            grpc_target=str(target),
            use_tls=bool(_field(definition, "GRPCUseTLS", False)),
            interval_seconds=max(interval, self._minimum_check_interval),
            timeout_seconds=_duration_field(definition, "Timeout")
            or _DEFAULT_CHECK_TIMEOUT_SECONDS,
            deregister_after_seconds=deregister_after,
            notes=_field(definition, "Notes") or "",
            status=_field(definition, "Status") or _CRITICAL,
            create_index=service.modify_index,
            modify_index=service.modify_index,
            critical_since=time.monotonic(),
        )

    def _checks_of(self, service_id: str) -> list[_Check]:
        return [check for check in self._checks.values() if check.service_id == service_id]

    def _remove_check(self, check_id: str) -> None:
        check = self._checks.pop(check_id)
        check.stop_requested.set()

    def _remove_service(self, service_id: str) -> None:
        del self._services[service_id]
        for check in self._checks_of(service_id):
            self._remove_check(check.check_id)

    def _health_entry(self, service: _Service) -> dict[str, Any]:
        return {
            "Node": {
                "ID": self._node_id,
                "Node": self._node_name,
                "Address": "127.0.0.1",
                "Datacenter": self._datacenter,
                "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
                "Meta": {"consul-network-segment": ""},
                "CreateIndex": 1,
                "ModifyIndex": 1,
            },
            "Service": self._service_json(service),
            "Checks": [self._serf_health_json()]
            + [self._check_json(check) for check in self._checks_of(service.service_id)],
        }

    def _service_json(self, service: _Service) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Address": service.address,
            "Meta": dict(service.meta),
            "Port": service.port,
            "Weights": dict(service.weights),
            "EnableTagOverride": service.enable_tag_override,
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    def _serf_health_json(self) -> dict[str, Any]:
        return {
            "Node": self._node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": _PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _check_json(self, check: _Check) -> dict[str, Any]:
        return {
            "Node": self._node_name,
            "CheckID": check.check_id,
            "Name": check.name,
            "Status": check.status,
            "Notes": check.notes,
            "Output": check.output,
            "ServiceID": check.service_id,
            "ServiceName": check.service_name,
            "ServiceTags": list(check.service_tags),
            "Type": "grpc",
            "Interval": f"{check.interval_seconds}s",
            "Timeout": f"{check.timeout_seconds}s",
            "CreateIndex": check.create_index,
            "ModifyIndex": check.modify_index,
        }

    # --- background work -------------------------------------------------------------

    def _start_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [known for known in self._threads if known.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _run_check(self, check: _Check) -> None:
        # Like the agent, stagger the first probe so many checks don't fire together.
        if check.stop_requested.wait(random.uniform(0, check.interval_seconds)):  # noqa: S311
            return
        while not check.stop_requested.is_set():
            status, output = _probe_grpc_health(
                check.grpc_target, check.use_tls, check.timeout_seconds
            )
            with self._state_changed:
                if self._checks.get(check.check_id) is not check:
                    return  # deregistered or replaced while probing
                check.output = output
                if status != check.status:
                    check.status = status
                    check.critical_since = time.monotonic() if status == _CRITICAL else None
                    check.modify_index = self._next_index()
                    self._state_changed.notify_all()
            check.stop_requested.wait(check.interval_seconds)

    def _reap_critical_services(self) -> None:
        while not self._stopping.wait(self._reap_interval):
            now = time.monotonic()
            with self._state_changed:
                expired = {
                    check.service_id
                    for check in self._checks.values()
                    if check.status == _CRITICAL
                    and check.deregister_after_seconds is not None
                    and check.critical_since is not None
                    and now - check.critical_since > check.deregister_after_seconds
                }
                for service_id in expired:
                    self._remove_service(service_id)
                if expired:
                    self._next_index()
                    self._state_changed.notify_all()


def _probe_grpc_health(target: str, use_tls: bool, timeout_seconds: float) -> tuple[str, str]:
    """Run one gRPC health check against ``host:port[/service]`` as the agent does."""
    address, _, service = target.partition("/")
    # A fresh channel per probe: a reused one would sit in reconnect backoff after the
    # server restarts and report it critical for longer than the agent does.
    channel = (
        grpc.secure_channel(address, grpc.ssl_channel_credentials())
        if use_tls
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds
            )
        except grpc.RpcError as error:
            return _CRITICAL, f"gRPC check {target}: failed: {error.code().name}: {error.details()}"
    serving = health_pb2.HealthCheckResponse.SERVING
    if response.status == serving:
        return _PASSING, f"gRPC check {target}: success"
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return _CRITICAL, f"gRPC check {target}: failed: status {status_name}"


def _query_flag(query: Mapping[str, list[str]], name: str) -> bool:
    """A boolean query parameter: present and empty means true, as in ``?passing``."""
    if name not in query:
        return False
    value = query[name][-1].lower()
    if value in ("", "1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise _BadRequest(f"Failed to parse {name}: invalid boolean {value!r}")


def _handler_for(agent: ConsulStandIn) -> type[BaseHTTPRequestHandler]:
    class ConsulAgentHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            self._dispatch("GET")

        def do_PUT(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            self._dispatch("PUT")

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                # The caller went away (a killed service's blocking query or kept-alive
                # connection): nothing to answer, nothing to report, as for the agent.
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Keep test output quiet; failures surface through the client instead."""

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            body = self._read_body()
            try:
                self._route(method, path, query, body)
            except _BadRequest as error:
                self._send(error.status, str(error).encode(), "text/plain; charset=utf-8")

        def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
            routes = {
                "/v1/agent/service/register": "PUT",
                "/v1/agent/service/deregister/": "PUT",
                "/v1/health/service/": "GET",
                "/v1/agent/services": "GET",
                "/v1/status/leader": "GET",
            }
            route = next(
                (
                    prefix
                    for prefix in routes
                    if path == prefix or (prefix.endswith("/") and path.startswith(prefix))
                ),
                None,
            )
            if route is None:
                raise _BadRequest(f"no handler for {path}", HTTPStatus.NOT_FOUND)
            if routes[route] != method:
                raise _BadRequest(f"method {method} not allowed", HTTPStatus.METHOD_NOT_ALLOWED)
            argument = path[len(route) :]
            if route == "/v1/agent/service/deregister/" and not argument:
                raise _BadRequest("Missing service ID")
            if route == "/v1/health/service/" and not argument:
                raise _BadRequest("Missing service name")
            if route == "/v1/agent/service/register":
                agent.register_service(
                    _decode_json_object(body), _query_flag(query, "replace-existing-checks")
                )
                self._send(HTTPStatus.OK, b"", "text/plain; charset=utf-8")
            elif route == "/v1/agent/service/deregister/":
                agent.deregister_service(argument)
                self._send(HTTPStatus.OK, b"", "text/plain; charset=utf-8")
            elif route == "/v1/health/service/":
                index, entries = agent.health_of_service(argument, query)
                self._send_json(entries, {"X-Consul-Index": str(index)})
            elif route == "/v1/agent/services":
                if "filter" in query:
                    raise _BadRequest("the Consul stand-in does not implement filter")
                self._send_json(agent.agent_services())
            else:
                self._send_json("127.0.0.1:8300")

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send_json(self, payload: Any, headers: Mapping[str, str] | None = None) -> None:
            consistency_headers = {
                "X-Consul-Effective-Consistency": "leader",
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
            }
            self._send(
                HTTPStatus.OK,
                json.dumps(payload).encode(),
                "application/json",
                {**consistency_headers, **(headers or {})},
            )

        def _send(
            self,
            status: HTTPStatus,
            body: bytes,
            content_type: str,
            headers: Mapping[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    return ConsulAgentHandler


def _decode_json_object(body: bytes) -> dict[str, Any]:
    try:
        decoded = json.loads(body or b"null")
    except json.JSONDecodeError as error:
        raise _BadRequest(f"Request decode failed: {error}") from error
    if not isinstance(decoded, dict):
        raise _BadRequest("Request decode failed: expected a JSON object")
    return decoded
