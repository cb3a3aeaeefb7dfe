"""Services started as real subprocesses for crash tests and benchmarks."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import NamedTuple

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


def inference_process(root: Path, registry: ServiceProcess, name: str = "inference",
                      **settings: str) -> ServiceProcess:
    """An inference service under `root / name` using `registry` with the registry's admin token
    (not started)."""
    return ServiceProcess("inference", root / name, registry_target=registry.target,
                          client_token_file=str(registry.state_dir / "admin.token"), **settings)


class RegistryProcess(ServiceProcess):
    """The registry as a subprocess; start-up collection runs with no grace period."""

    def __init__(self, state_dir, database_url: str = ""):
        super().__init__("registry", state_dir, database_url=database_url,
                         gc_grace_seconds="0")


class ProcessInfo(NamedTuple):
    parent: int
    cpu_seconds: float
    command: str


def process_table() -> dict[int, ProcessInfo]:
    """Every process by pid: its parent, CPU time so far and command name, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        command, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        table[int(stat.parent.name)] = ProcessInfo(
            int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, command)
    return table


def children_named(parent_pid: int, command: str) -> list[int]:
    """Child processes running `command` (Linux keeps the first 15 characters of a name)."""
    return [pid for pid, info in process_table().items()
            if info.parent == parent_pid and info.command == command[:15]]


def process_tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by `roots` and all their descendants (Triton's model stubs)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.parent, []).append(pid)
    total, pending, seen = 0.0, list(roots), set()
    while pending:
        pid = pending.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid].cpu_seconds
        pending.extend(children.get(pid, []))
    return total


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is as good as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))
