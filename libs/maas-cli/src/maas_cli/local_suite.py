"""Runs the services of the suite as supervised processes on one machine (`maas up`).

Every service gets its own state directory under one root, the same tokens file and admin
token (so one token works everywhere), fixed loopback ports (and a fixed Prometheus metrics
port each, `DEFAULT_METRICS_PORTS`), and static discovery of the others. With `SuiteTls`
every port speaks TLS (or mTLS) only, and every service dials its peers with the matching
client settings. A service that dies is restarted; Ctrl-C stops them
all gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas_runtime.auth import ensure_admin_token
from maas_runtime.client import open_channel
from maas_runtime.tls import channel_credentials

from maas_cli.suite_state import SuiteLock, remove_suite_file, write_suite_file

_log = logging.getLogger(__name__)

DEFAULT_PORTS = {"registry": 50051, "trainer": 50052, "compressor": 50053, "inference": 50054}
DEFAULT_METRICS_PORTS = {"registry": 9451, "trainer": 9452, "compressor": 9453, "inference": 9454}
DEFAULT_OPENAI_PORT = 8054
"""The inference service's OpenAI-compatible HTTP endpoint (http://127.0.0.1:8054/v1)."""
"""Where each service's Prometheus `/metrics` listens under `maas up` (loopback)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class SuiteTls:
    """TLS on every port of the suite, and the client side every peer (and `maas`) uses."""

    cert_file: Path
    """PEM certificate chain every service serves; must name the host dialled (127.0.0.1)."""
    key_file: Path
    """PEM private key of `cert_file`."""
    ca_file: Path
    """PEM CA bundle that signed the certificates: clients and peers trust it."""
    mutual: bool = False
    """Require client certificates signed by `ca_file` (mTLS) on every port."""
    client_cert_file: Path | None = None
    """Certificate peers and `maas` present under mTLS; defaults to `cert_file`."""
    client_key_file: Path | None = None
    """PEM private key of `client_cert_file`; defaults to `key_file`."""
    server_name: str = ""
    """Name to expect in the certificate when it does not name the host dialled."""

    def service_settings(self) -> dict[str, str]:
        """A service's settings: serve TLS, and dial its peers with TLS."""
        settings = {"tls_cert_file": str(self.cert_file), "tls_key_file": str(self.key_file),
                    "peer_tls": "true", "peer_tls_ca_file": str(self.ca_file)}
        if self.mutual:
            settings |= {"tls_client_ca_file": str(self.ca_file),
                         "peer_tls_cert_file": str(self.client_cert_file or self.cert_file),
                         "peer_tls_key_file": str(self.client_key_file or self.key_file)}
        if self.server_name:
            settings["peer_tls_server_name"] = self.server_name
        return settings

    def credentials(self) -> grpc.ChannelCredentials:
        """Client credentials that the suite's ports accept."""
        if not self.mutual:
            return channel_credentials(self.ca_file)
        return channel_credentials(self.ca_file, self.client_cert_file or self.cert_file,
                                   self.client_key_file or self.key_file)

    def client_files(self) -> dict[str, str]:
        """The files a client (`maas.Client`, the CLI) dials the suite with."""
        files = {"ca_file": str(self.ca_file)}
        if self.mutual:
            files |= {"cert_file": str(self.client_cert_file or self.cert_file),
                      "key_file": str(self.client_key_file or self.key_file)}
        if self.server_name:
            files["server_name"] = self.server_name
        return files

    def channel_options(self) -> list[tuple[str, str]]:
        return ([("grpc.ssl_target_name_override", self.server_name)]
                if self.server_name else [])


@dataclass
class ServiceProcess:
    """One service run as `python -m maas_<name>.server`, configured by its environment."""

    name: str
    state_dir: Path
    port: int
    settings: dict[str, str] = field(default_factory=dict)
    base_env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    tls: SuiteTls | None = None
    """How to reach it when its port speaks TLS only (the health checks use it)."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The service's Prometheus endpoint, or "" when its metrics port is off."""
        port = self.settings.get("metrics_port", "")
        return f"http://127.0.0.1:{port}/metrics" if port else ""

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    @property
    def env(self) -> dict[str, str]:
        prefix = f"MAAS_{self.name.upper()}_"
        return {**(self.base_env if self.base_env is not None else os.environ),
                f"{prefix}STATE_DIR": str(self.state_dir), f"{prefix}PORT": str(self.port),
                **{prefix + key.upper(): value for key, value in self.settings.items()}}

    def spawn(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"maas_{self.name}.server"], env=self.env,
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    async def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        async with open_channel(
                self.target, credentials=self.tls.credentials() if self.tls else None,
                options=self.tls.channel_options() if self.tls else ()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    break
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=self.name),
                                               timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        tail = self.log_file.read_text()[-3000:] if self.log_file.exists() else ""
        raise RuntimeError(f"{self.name} did not become SERVING:\n{tail}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class LocalSuite:
    """The services of one installation under `root`, in dependency order."""

    def __init__(self, root: Path,
                 services: tuple[str, ...] = ("registry", "trainer", "compressor", "inference"),
                 fixed_ports: bool = True, tls: SuiteTls | None = None,
                 settings: dict[str, dict[str, str]] | None = None):
        """`settings` adds per-service settings by service name (e.g. log levels)."""
        self.root = root.resolve()
        self.tls = tls
        self.tokens_file = self.root / "tokens.json"
        self.admin_token_file = self.root / "admin.token"
        ports = {name: (DEFAULT_PORTS[name] if fixed_ports and port_is_free(DEFAULT_PORTS[name])
                        else free_port()) for name in services}
        metrics_ports = {
            name: (DEFAULT_METRICS_PORTS[name]
                   if fixed_ports and port_is_free(DEFAULT_METRICS_PORTS[name]) else free_port())
            for name in services}
        self.openai_port = (DEFAULT_OPENAI_PORT if fixed_ports and port_is_free(DEFAULT_OPENAI_PORT)
                            else free_port())
        endpoints = ";".join(f"{name}=127.0.0.1:{port}" for name, port in ports.items())
        base_env = {**os.environ, "MAAS_STATIC_ENDPOINTS": endpoints}
        self.services = {
            name: ServiceProcess(name, self.root / name, port, {
                "tokens_file": str(self.tokens_file),
                "admin_token_file": str(self.admin_token_file),
                "metrics_port": str(metrics_ports[name]),
                **({"registry_target": f"127.0.0.1:{ports['registry']}"}
                   if name != "registry" and "registry" in ports else {}),
                **(tls.service_settings() if tls else {}),
                **({"openai_port": str(self.openai_port)} if name == "inference" else {}),
                **(settings or {}).get(name, {}),
            }, base_env, tls=tls)
            for name, port in ports.items()
        }
        self._watch: asyncio.Task | None = None
        self._lock = SuiteLock(self.root)

    def token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def describe(self) -> list[str]:
        """One line per service (gRPC target, metrics URL, log file), as `maas up` prints."""
        lines = [f"{service.name:10s} {service.target}   metrics: {service.metrics_url or 'off'}"
                 f"   logs: {service.log_file}" for service in self.services.values()]
        if "inference" in self.services:
            scheme = "https" if self.tls else "http"
            lines.append(f"{'openai':10s} {scheme}://127.0.0.1:{self.openai_port}/v1 "
                         "(chat/completions, completions, models)")
        return lines

    def open_channel(self, name: str, **channel_settings) -> grpc.aio.Channel:
        """An authenticated channel to service `name`, over TLS when the suite speaks it."""
        return open_channel(
            self.services[name].target, token=self.token(),
            credentials=self.tls.credentials() if self.tls else None,
            options=self.tls.channel_options() if self.tls else (), **channel_settings)

    async def start(self) -> None:
        """Start every service; `SuiteAlreadyRunning` when a suite runs on `root` already."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        ensure_admin_token(self.admin_token_file, self.tokens_file)
        try:
            for service in self.services.values():
                service.spawn()
                await service.wait_serving()
                _log.info("%s serving on %s (metrics %s)", service.name, service.target,
                          service.metrics_url or "off")
        except BaseException:  # a service that cannot start (or Ctrl-C): leave nothing behind
            await self.stop()
            raise
        write_suite_file(self.root, {name: service.target for name, service in self.services.items()},
                         self.tls.client_files() if self.tls else None)
        self._watch = asyncio.create_task(self._restart_crashed())

    async def _restart_crashed(self) -> None:
        while True:
            await asyncio.sleep(1)
            for service in self.services.values():
                if not service.alive():
                    _log.warning("%s exited (code %s); restarting", service.name,
                                 service.process.returncode if service.process else None)
                    service.spawn()
                    with contextlib.suppress(RuntimeError):
                        await service.wait_serving()

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for service in reversed(list(self.services.values())):
            await asyncio.to_thread(service.stop)
        remove_suite_file(self.root)
        self._lock.release()
