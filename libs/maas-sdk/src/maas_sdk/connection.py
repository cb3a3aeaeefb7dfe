"""Where the services are, who the caller is, and the channels to them.

`Connection.resolve` turns what the caller gave (arguments, then environment, then the local
suite's state directory) into one target or a discovery backend per service, a bearer token
and a TLS transport. Channels are `maas_runtime.peers.PeerChannel`s, the same factory the
services use to reach each other, opened once on the SDK's private event loop and reused by
every call.

Order of precedence:

- targets: `target` / `targets` arguments, `discovery` / `consul`, the suite running on a
  `state_dir` named explicitly, `CONSUL_HTTP_ADDR`, `MAAS_TARGET` or `MAAS_STATIC_ENDPOINTS`,
  the endpoints `maas up` recorded in `<state dir>/suite.json`, and last the suite's default
  loopback ports; a service named with several endpoints (`inference=a:1,b:1`) is
  balanced over those of them that report SERVING, as discovered replicas are;
- token: `token`, `MAAS_TOKEN`, `<state dir>/admin.token` (written by `maas up`);
- state dir: `state_dir`, `MAAS_STATE_DIR`, `.maas`, `.maas/local` (what `make up` uses).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from maas_runtime.discovery import (
    ConsulDiscovery,
    Endpoint,
    ServiceDiscovery,
    StaticDiscovery,
    parse_static_endpoints,
)
from maas_runtime.peers import PeerChannel, PeerTransport
from maas_runtime.tls import channel_credentials

SERVICES = ("registry", "trainer", "compressor", "inference")
DEFAULT_PORTS = {"registry": 50051, "trainer": 50052, "compressor": 50053, "inference": 50054}
"""The ports `maas up` takes when they are free (`maas_cli.local_suite.DEFAULT_PORTS`)."""
SUITE_FILE = "suite.json"
"""What a running `maas up` records in its state directory: pid, endpoints, TLS files."""
ADMIN_TOKEN_FILE = "admin.token"
TOKENS_FILE = "tokens.json"
DEFAULT_STATE_DIRS = (Path(".maas"), Path(".maas/local"))
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_Result = TypeVar("_Result")


def default_state_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """The state directory named, else `MAAS_STATE_DIR`, else the first default that holds a
    suite (`.maas`, then `.maas/local`), else `.maas`."""
    if state_dir:
        return Path(state_dir)
    if os.environ.get("MAAS_STATE_DIR"):
        return Path(os.environ["MAAS_STATE_DIR"])
    for candidate in DEFAULT_STATE_DIRS:
        if (candidate / SUITE_FILE).exists() or (candidate / ADMIN_TOKEN_FILE).exists():
            return candidate
    return DEFAULT_STATE_DIRS[0]


def read_suite_file(state_dir: Path) -> dict[str, Any]:
    """What `maas up` recorded about the suite running on `state_dir` ({} when none)."""
    try:
        return json.loads((state_dir / SUITE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def parse_targets(spec: str) -> dict[str, str]:
    """`host:port` (every service there) or `registry=host:port;inference=host:port`."""
    if "=" not in spec:
        return dict.fromkeys(SERVICES, spec.strip())
    return {service: ",".join(str(endpoint) for endpoint in endpoints)
            for service, endpoints in parse_static_endpoints(spec).items()}


@dataclass(frozen=True)
class Tls:
    """Client TLS: the CA that signed the servers' certificates, and a client certificate
    and key for mTLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    """Name to expect in the servers' certificate when it does not name the host dialled."""

    def transport(self) -> PeerTransport:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate and its key go together (cert_file, key_file)")
        options = ((("grpc.ssl_target_name_override", self.server_name),)
                   if self.server_name else ())
        return PeerTransport(channel_credentials(self.ca_file, self.cert_file, self.key_file),
                             options, mutual=self.cert_file is not None)


@dataclass
class Connection:
    """Resolved targets (or discovery), token and transport of one `Client`."""

    targets: dict[str, str] = field(default_factory=dict)
    discovery: ServiceDiscovery | None = None
    token: str | None = None
    tls: Tls | None = None
    state_dir: Path = DEFAULT_STATE_DIRS[0]

    @classmethod
    def resolve(cls, *, target: str | None = None, targets: Mapping[str, str] | None = None,
                discovery: ServiceDiscovery | None = None, consul: str | None = None,
                token: str | None = None, state_dir: str | os.PathLike[str] | None = None,
                ca_file: str | os.PathLike[str] | None = None,
                cert_file: str | os.PathLike[str] | None = None,
                key_file: str | os.PathLike[str] | None = None,
                server_name: str = "") -> Connection:
        root = default_state_dir(state_dir)
        suite = read_suite_file(root)
        resolved: dict[str, str] = {}
        if target:
            resolved |= parse_targets(target)
        resolved |= dict(targets or {})
        if not (consul or resolved or discovery or (state_dir and suite)):
            consul = os.environ.get("CONSUL_HTTP_ADDR")
        if consul:
            discovery = ConsulDiscovery(consul, token=os.environ.get("CONSUL_HTTP_TOKEN") or None)
        if not resolved and discovery is None and state_dir:  # the suite asked for by name
            resolved = dict(suite.get("endpoints") or {})
        if not resolved and discovery is None:
            spec = os.environ.get("MAAS_TARGET") or os.environ.get("MAAS_STATIC_ENDPOINTS")
            resolved = (parse_targets(spec) if spec else dict(suite.get("endpoints") or {}))
        if not resolved and discovery is None:
            resolved = {name: f"127.0.0.1:{port}" for name, port in DEFAULT_PORTS.items()}
        tls = None
        if ca_file or cert_file or key_file:
            tls = Tls(_path(ca_file), _path(cert_file), _path(key_file), server_name)
        elif suite.get("tls") and not target and not targets and discovery is None:
            recorded = suite["tls"]
            tls = Tls(_path(recorded.get("ca_file")), _path(recorded.get("cert_file")),
                      _path(recorded.get("key_file")), recorded.get("server_name", ""))
        return cls(resolved, discovery, _token(token, root), tls, root)

    def replicas(self, service: str) -> list[Endpoint]:
        """The endpoints named for `service` when there are several (`a:1,b:1`), else []."""
        target = self.targets.get(service, "")
        return [Endpoint.parse(part) for part in target.split(",")] if "," in target else []

    def peer(self, service: str) -> PeerChannel:
        """A (not yet opened) channel to `service` with this connection's token and TLS.

        Several endpoints named for the service, or found through discovery, are balanced
        round-robin over those whose gRPC health reports the service SERVING."""
        target = self.targets.get(service, "")
        discovery = None if target else self.discovery
        if not target and discovery is None:
            known = ", ".join(sorted(self.targets)) or "none"
            raise ValueError(f"no target for the {service} service (targets known: {known})")
        replicas = self.replicas(service)
        if replicas:
            target, discovery = "", StaticDiscovery({service: replicas})
        return PeerChannel(service, target=target, discovery=discovery,
                           transport=self.tls.transport() if self.tls else PeerTransport(),
                           token=self.token, max_message_bytes=MAX_MESSAGE_BYTES,
                           options=() if target else healthy_round_robin_options(service))


def healthy_round_robin_options(service: str) -> list[tuple[str, str]]:
    """Channel options that balance calls round-robin over the endpoints whose
    `grpc.health.v1` Watch reports `service` SERVING (gRPC's client-side health checking):
    a replica still starting, or whose Triton is down, gets no calls until it serves."""
    config = {"loadBalancingConfig": [{"round_robin": {}}],
              "healthCheckConfig": {"serviceName": service}}
    return [("grpc.service_config", json.dumps(config))]


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _token(token: str | None, state_dir: Path) -> str | None:
    if token:
        return token.strip()
    if os.environ.get("MAAS_TOKEN"):
        return os.environ["MAAS_TOKEN"].strip()
    try:
        return (state_dir / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


class EventLoopThread:
    """A private asyncio loop on a daemon thread: the synchronous `Client` runs its grpc.aio
    calls there, from any thread and also inside a notebook whose own loop is running."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="maas-sdk",
                                        daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, _Result]) -> Future[_Result]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, _Result]) -> _Result:
        return self.submit(coroutine).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
