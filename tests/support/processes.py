"""Services started as real subprocesses for crash tests and benchmarks."""

from __future__ import annotations

import signal
from pathlib import Path

from maas_cli import local_suite
from maas_cli.local_suite import free_port
from maas_runtime.client import open_channel


class ServiceProcess(local_suite.ServiceProcess):
    """A service subprocess on a free port, quiet logs, with test conveniences."""

    def __init__(self, name: str, state_dir, **settings: str):
        super().__init__(name, Path(state_dir), free_port(), {"log_level": "WARNING", **settings})

    async def start(self, timeout: float = 60) -> None:
        self.spawn()
        await self.wait_serving(timeout)

    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

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
        self.stop(timeout=10)

    def stub(self):
        """An authenticated channel to the service (kept for existing callers' naming)."""
        return open_channel(self.target, token=self.admin_token(),
                            max_message_bytes=64 * 1024 * 1024)


class RegistryProcess(ServiceProcess):
    """The registry as a subprocess; start-up collection runs with no grace period."""

    def __init__(self, state_dir, database_url: str = ""):
        super().__init__("registry", state_dir, database_url=database_url,
                         gc_grace_seconds="0")
