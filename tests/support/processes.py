"""Services started as real subprocesses for crash tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas_runtime.client import open_channel


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServiceProcess:
    """One MaaS service run as `python -m maas_<name>.server`, configured by environment."""

    def __init__(self, name: str, state_dir, **settings: str):
        self.name = name
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        prefix = f"MAAS_{name.upper()}_"
        self.env = {**os.environ, f"{prefix}STATE_DIR": str(state_dir),
                    f"{prefix}PORT": str(self.port), f"{prefix}LOG_LEVEL": "WARNING",
                    **{prefix + key.upper(): value for key, value in settings.items()}}
        self.process: subprocess.Popen | None = None

    @property
    def log_file(self):
        return self.state_dir / f"{self.name}.log"

    async def start(self, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"maas_{self.name}.server"], env=self.env,
            stdout=subprocess.DEVNULL, stderr=open(self.log_file, "ab"))
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.target) as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=self.name), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} did not start: {self.log_file.read_text()[-3000:]}")

    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def peak_rss_bytes(self) -> int:
        """The process's high-water mark of resident memory (VmHWM)."""
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def terminate(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def stub(self):
        """An authenticated channel to the service (kept for existing callers' naming)."""
        return open_channel(self.target, token=self.admin_token(),
                            max_message_bytes=64 * 1024 * 1024)


class RegistryProcess(ServiceProcess):
    """The registry as a subprocess; start-up collection runs with no grace period."""

    def __init__(self, state_dir, database_url: str = ""):
        super().__init__("registry", state_dir, database_url=database_url,
                         gc_grace_seconds="0")
