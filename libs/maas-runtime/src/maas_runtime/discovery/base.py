"""The service-discovery contract shared by every backend.

A backend answers three questions about a logical service name (``"registry"``,
``"inference"``): which instances exist (``register``/``deregister``), which of them
are healthy right now (``resolve``), and when that answer changes (``watch``).
Callers depend on :class:`ServiceDiscovery` only; the backend (static configuration
or a Consul agent) is chosen once in the composition root and injected.
"""

from __future__ import annotations

import abc
import ipaddress
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from maas_runtime.errors import MaasError, Unavailable

__all__ = [
    "DiscoveryError",
    "DiscoveryUnavailable",
    "Endpoint",
    "NoHealthyEndpoints",
    "ServiceDiscovery",
    "instance_id_for",
]


class DiscoveryError(MaasError):
    """Base class for every failure raised by the discovery library."""

    default_reason = "DISCOVERY_FAILED"


class DiscoveryUnavailable(DiscoveryError, Unavailable):
    """The discovery backend itself (e.g. the Consul agent) could not be reached."""

    code = Unavailable.code
    default_reason = "DISCOVERY_UNAVAILABLE"


class NoHealthyEndpoints(DiscoveryError, Unavailable):
    """No instance of a service is currently passing its health check."""

    code = Unavailable.code
    default_reason = "NO_HEALTHY_ENDPOINTS"

    def __init__(self, service: str) -> None:
        super().__init__(
            f"no healthy endpoint is registered for service {service!r}; "
            "it is not running, not registered, or failing its gRPC health check",
            metadata={"service": service},
        )
        self.service = service


@dataclass(frozen=True, order=True)
class Endpoint:
    """One network address at which an instance of a service listens."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("endpoint host must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"endpoint port {self.port} is outside 1..65535")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``host:port``, ``1.2.3.4:port`` or ``[::1]:port``."""
        text = text.strip()
        bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
        if bracketed:
            host, port = bracketed.groups()
        else:
            host, separator, port = text.rpartition(":")
            # A bare IPv6 literal has several colons; without brackets its port is ambiguous.
            if not separator or not port.isdigit() or ":" in host:
                raise ValueError(f"expected host:port or [ipv6]:port, got {text!r}")
        return cls(host=host, port=int(port))

    @property
    def ip_version(self) -> int | None:
        """4 or 6 when ``host`` is an IP literal, ``None`` when it is a DNS name."""
        try:
            return ipaddress.ip_address(self.host).version
        except ValueError:
            return None

    @property
    def address(self) -> str:
        """``host:port`` with IPv6 literals bracketed, as gRPC and Consul expect."""
        if self.ip_version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.address


def instance_id_for(service: str, endpoint: Endpoint) -> str:
    """A deterministic instance id for ``service`` listening at ``endpoint``.

    Deterministic so that a process restarted on the same address replaces its own stale
    registration instead of leaving a duplicate behind until the critical reaper runs.
    Characters that would need escaping in a URL path segment are replaced.
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{service}-{endpoint.host}-{endpoint.port}")


class ServiceDiscovery(abc.ABC):
    """Registers service instances and finds the healthy ones."""

    @abc.abstractmethod
    async def register(
        self,
        service: str,
        host: str,
        port: int,
        *,
        tls: bool = False,
        tags: Iterable[str] = (),
    ) -> str:
        """Register an instance of ``service`` listening at ``host:port``.

        The backend probes ``grpc.health.v1.Health/Check`` with ``service`` as the
        service name, so the instance only resolves once its health servicer reports
        SERVING for that name. ``tls`` says whether that probe must use TLS.
        Returns the instance id to pass to :meth:`deregister`.
        """

    @abc.abstractmethod
    async def deregister(self, instance_id: str) -> None:
        """Remove a registered instance; removing an unknown id is not an error."""

    @abc.abstractmethod
    async def resolve(self, service: str) -> list[Endpoint]:
        """The endpoints of ``service`` that are healthy now, possibly empty."""

    @abc.abstractmethod
    def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        """Yield the healthy endpoints of ``service`` now and after every change.

        The first item is the current list (possibly empty); later items are only
        produced when the list differs from the previous one.
        """

    async def close(self) -> None:
        """Release connections held by the backend. The default holds none."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
