"""Discovery from fixed configuration, for development and single-process runs.

Endpoints come from settings (``registry=127.0.0.1:50051,127.0.0.1:50052;...``) and
are trusted to be healthy: nothing probes them. ``register`` records instances in
memory, so a single-process ``maas up`` can register each service it starts and
resolve it from the same :class:`StaticDiscovery` object.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping

from maas_runtime.discovery.base import Endpoint, ServiceDiscovery, instance_id_for

__all__ = ["StaticDiscovery", "parse_static_endpoints"]


def parse_static_endpoints(spec: str) -> dict[str, list[Endpoint]]:
    """Parse ``name=host:port,host:port;name=host:port`` into endpoints per service.

    Whitespace around separators and a trailing ``;`` are ignored. A service named
    twice, a missing ``=`` or a malformed address raises ``ValueError``.
    """
    endpoints_by_service: dict[str, list[Endpoint]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        service, separator, addresses = entry.partition("=")
        service = service.strip()
        if not separator or not service:
            raise ValueError(f"expected service=host:port[,host:port...], got {entry!r}")
        if service in endpoints_by_service:
            raise ValueError(f"service {service!r} is listed twice in {spec!r}")
        endpoints_by_service[service] = [
            Endpoint.parse(address) for address in addresses.split(",") if address.strip()
        ]
    return endpoints_by_service


class StaticDiscovery(ServiceDiscovery):
    """Configured endpoints plus instances registered in this process."""

    def __init__(self, endpoints: Mapping[str, Iterable[str | Endpoint]] | None = None) -> None:
        self._configured: dict[str, tuple[Endpoint, ...]] = {
            service: tuple(
                address if isinstance(address, Endpoint) else Endpoint.parse(address)
                for address in addresses
            )
            for service, addresses in (endpoints or {}).items()
        }
        self._registered: dict[str, tuple[str, Endpoint]] = {}
        self._change_queues: defaultdict[str, set[asyncio.Queue[None]]] = defaultdict(set)

    @classmethod
    def from_spec(cls, spec: str) -> StaticDiscovery:
        """Build from the ``name=host:port,...;name=...`` form used in env variables."""
        return cls(parse_static_endpoints(spec))

    async def register(
        self,
        service: str,
        host: str,
        port: int,
        *,
        tls: bool = False,
        tags: Iterable[str] = (),
    ) -> str:
        endpoint = Endpoint(host, port)
        instance_id = instance_id_for(service, endpoint)
        self._registered[instance_id] = (service, endpoint)
        self._notify_watchers(service)
        return instance_id

    async def deregister(self, instance_id: str) -> None:
        registration = self._registered.pop(instance_id, None)
        if registration is not None:
            self._notify_watchers(registration[0])

    async def resolve(self, service: str) -> list[Endpoint]:
        return self._endpoints_of(service)

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        # Configuration never changes, so with configured endpoints only this yields
        # once; in-process registrations are the one source of later changes.
        changes: asyncio.Queue[None] = asyncio.Queue()
        self._change_queues[service].add(changes)
        try:
            current = self._endpoints_of(service)
            yield list(current)
            while True:
                await changes.get()
                latest = self._endpoints_of(service)
                if latest != current:
                    current = latest
                    yield list(current)
        finally:
            self._change_queues[service].discard(changes)

    def _endpoints_of(self, service: str) -> list[Endpoint]:
        registered = [
            endpoint
            for registered_service, endpoint in self._registered.values()
            if registered_service == service
        ]
        # dict.fromkeys de-duplicates while keeping configuration order first.
        return list(dict.fromkeys([*self._configured.get(service, ()), *registered]))

    def _notify_watchers(self, service: str) -> None:
        for changes in self._change_queues[service]:
            changes.put_nowait(None)
