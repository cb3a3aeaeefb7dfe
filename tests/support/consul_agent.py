"""A Consul to test against: a real `consul agent -dev` when the binary is on PATH, else the
in-repo stand-in (tests/support/consul_standin.py), behind one description of either."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from maas_cli.local_suite import free_port

from tests.support.consul_standin import ConsulStandIn


@dataclass
class ConsulUnderTest:
    http_address: str
    """The value a client takes as CONSUL_HTTP_ADDR."""
    check_interval_seconds: float
    """How often the agent runs each gRPC health check (a real agent: 1 s at least)."""
    kind: str = "standin"
    """"agent" (a real `consul`) or "standin"."""

    @property
    def settle_seconds(self) -> float:
        """How long health changes may take to show: a few check intervals, plus slack."""
        return 6 * self.check_interval_seconds + 3.0


class ConsulAgentFailed(RuntimeError):
    """`consul agent -dev` did not come up."""


@contextmanager
def consul_agent(binary: str) -> Iterator[ConsulUnderTest]:
    """`consul agent -dev` on loopback with free ports, until it elected itself leader."""
    http_port = free_port()
    ports = (
        f"ports {{ http = {http_port} dns = -1 grpc = -1 grpc_tls = -1 "
        f"serf_lan = {free_port()} serf_wan = {free_port()} server = {free_port()} }}"
    )
    agent = subprocess.Popen(  # noqa: S603 - fixed argv, binary found on PATH
        [binary, "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-hcl", ports],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{address}/v1/status/leader", timeout=1) as reply:  # noqa: S310
                    if json.loads(reply.read()):
                        break
            except OSError:
                pass
            if agent.poll() is not None or time.monotonic() > deadline:
                raise ConsulAgentFailed("consul agent -dev did not elect itself leader")
            time.sleep(0.2)
        # The agent raises check intervals below one second to one second.
        yield ConsulUnderTest(address, check_interval_seconds=1.0, kind="agent")
    finally:
        agent.terminate()
        agent.wait(timeout=10)


@contextmanager
def any_consul() -> Iterator[ConsulUnderTest]:
    """A real agent when `consul` is on PATH, else the stand-in (checks every 0.2 s)."""
    binary = shutil.which("consul")
    if binary is not None:
        with consul_agent(binary) as agent:
            yield agent
        return
    with ConsulStandIn() as standin:
        yield ConsulUnderTest(standin.http_address, check_interval_seconds=0.2)
