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


class RegistryProcess:
    def __init__(self, state_dir, database_url: str = ""):
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {**os.environ, "MAAS_REGISTRY_STATE_DIR": str(state_dir),
                    "MAAS_REGISTRY_PORT": str(self.port),
                    "MAAS_REGISTRY_DATABASE_URL": database_url,
                    "MAAS_REGISTRY_GC_GRACE_SECONDS": "0",
                    "MAAS_REGISTRY_LOG_LEVEL": "WARNING"}
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "maas_registry.server"], env=self.env,
            stdout=subprocess.DEVNULL, stderr=open(self.state_dir / "registry.log", "ab"))
        deadline = time.monotonic() + 30
        async with grpc.aio.insecure_channel(self.target) as channel:
            while time.monotonic() < deadline:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="registry"), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        raise AssertionError(f"registry did not start: {(self.state_dir / 'registry.log').read_text()}")

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
        token = (self.state_dir / "admin.token").read_text().strip()
        return open_channel(self.target, token=token, max_message_bytes=64 * 1024 * 1024)
