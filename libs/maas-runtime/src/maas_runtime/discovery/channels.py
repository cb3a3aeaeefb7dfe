"""gRPC channels that follow service discovery.

:class:`DiscoveredChannel` keeps one ``grpc.aio`` channel spanning every healthy
endpoint of a service, balanced round-robin by gRPC itself. A background task
consumes ``discovery.watch(service)``; when the endpoint set changes, a new channel
is opened and swapped in, and the old one is closed after a grace period so RPCs
already in flight on it can finish. Stubs obtained from :meth:`DiscoveredChannel.stub`
resolve the current channel on every call, so callers never rebuild them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc

from maas_runtime.discovery.base import Endpoint, NoHealthyEndpoints, ServiceDiscovery

__all__ = ["DiscoveredChannel", "round_robin_target"]

logger = logging.getLogger(__name__)

_Stub = TypeVar("_Stub")

_LB_POLICY_OPTION = "grpc.lb_policy_name"
_WATCH_RESTART_DELAY_SECONDS = 1.0


def round_robin_target(endpoints: Sequence[Endpoint]) -> str:
    """A gRPC target naming every endpoint, for use with the round_robin policy.

    gRPC's ``ipv4:``/``ipv6:`` resolvers take a comma-separated address list, but one
    family per target: with a mix, IPv4 addresses are written IPv4-mapped
    (``[::ffff:10.0.0.1]``). DNS names cannot be listed; a single one becomes a
    ``dns:///`` target (gRPC then balances over its records), several must be
    resolved to IP literals first.
    """
    if not endpoints:
        raise ValueError("a gRPC target needs at least one endpoint")
    versions = {endpoint.ip_version for endpoint in endpoints}
    if None in versions:
        if len(endpoints) == 1:
            return f"dns:///{endpoints[0].address}"
        raise ValueError("resolve DNS names to IP addresses before listing several endpoints")
    if versions == {4}:
        return "ipv4:" + ",".join(endpoint.address for endpoint in endpoints)
    return "ipv6:" + ",".join(_as_ipv6(endpoint).address for endpoint in endpoints)


def _as_ipv6(endpoint: Endpoint) -> Endpoint:
    if endpoint.ip_version == 6:
        return endpoint
    return Endpoint(f"::ffff:{ipaddress.IPv4Address(endpoint.host)}", endpoint.port)


class DiscoveredChannel:
    """A load-balanced ``grpc.aio`` channel over the healthy endpoints of a service.

    Use as ``async with DiscoveredChannel(discovery, "registry") as channel:`` (or call
    :meth:`start` and :meth:`close`), then ``channel.stub(RegistryServiceStub)``.
    """

    def __init__(
        self,
        discovery: ServiceDiscovery,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        close_grace_seconds: float = 5.0,
    ) -> None:
        """Describe the channel; nothing connects until :meth:`start`.

        ``credentials`` selects a secure channel (insecure when ``None``). ``options``
        are passed to every channel created; the round_robin policy is added unless
        they already name one. ``close_grace_seconds`` is how long a replaced channel
        stays open (for RPCs in flight on it, or stubs pinned with
        :meth:`current_stub`), and how long closing waits for in-flight RPCs.
        """
        self._discovery = discovery
        self._service = service
        self._credentials = credentials
        self._options = list(options)
        if all(name != _LB_POLICY_OPTION for name, _ in self._options):
            self._options.append((_LB_POLICY_OPTION, "round_robin"))
        self._interceptors = list(interceptors)
        self._close_grace_seconds = close_grace_seconds
        self._endpoints: tuple[Endpoint, ...] = ()
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[Callable[[grpc.aio.Channel], Any], Any] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._first_answer = asyncio.Event()
        self._retiring_channels: set[asyncio.Task[None]] = set()

    @property
    def service(self) -> str:
        """The logical service this channel reaches."""
        return self._service

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The healthy endpoints the current channel spans (empty when none)."""
        return self._endpoints

    @property
    def channel(self) -> grpc.aio.Channel:
        """The current channel; raises :class:`NoHealthyEndpoints` when there is none."""
        if self._channel is None:
            raise NoHealthyEndpoints(self._service)
        return self._channel

    async def start(self, *, timeout_seconds: float | None = 10.0) -> None:
        """Start following discovery and wait for its first answer.

        If discovery has not answered within ``timeout_seconds`` (e.g. Consul is down),
        this returns anyway and keeps trying in the background; calls made meanwhile
        raise :class:`NoHealthyEndpoints`.
        """
        if self._watch_task is not None:
            raise RuntimeError(f"the channel to {self._service!r} is already started")
        self._watch_task = asyncio.create_task(
            self._follow_discovery(), name=f"discovery-watch-{self._service}"
        )
        try:
            async with asyncio.timeout(timeout_seconds):
                await self._first_answer.wait()
        except TimeoutError:
            logger.warning(
                "discovery gave no endpoints for %r within %ss; still waiting in the background",
                self._service,
                timeout_seconds,
            )

    async def close(self) -> None:
        """Stop following discovery and close every channel, letting RPCs finish."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        channel, self._channel = self._channel, None
        self._endpoints, self._stubs = (), {}
        # Retiring channels skip the rest of their wait and close (gracefully) now.
        for retiring in self._retiring_channels:
            retiring.cancel()
        await asyncio.gather(*self._retiring_channels, return_exceptions=True)
        if channel is not None:
            await channel.close(grace=self._close_grace_seconds)

    def stub(self, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        """A stub whose every RPC goes through whichever channel is current.

        The returned object is a proxy, typed as the stub so callers keep completion
        and checking of method names. Calling an RPC while no endpoint is healthy
        raises :class:`NoHealthyEndpoints`.
        """
        return cast(_Stub, _DiscoveredStub(self, stub_class))

    def current_stub(self, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        """A plain stub bound to the current channel, e.g. to pin one for a stream."""
        channel = self.channel
        stub = self._stubs.get(stub_class)
        if stub is None:
            stub = self._stubs[stub_class] = stub_class(channel)
        return cast(_Stub, stub)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _follow_discovery(self) -> None:
        while True:
            try:
                async for endpoints in self._discovery.watch(self._service):
                    await self._use_endpoints(endpoints)
                    self._first_answer.set()
                # A watch that ends (static configuration) has nothing more to say.
                return
            except Exception:
                # Keep the current channel: stale endpoints beat no endpoints.
                logger.exception(
                    "watching %r failed; restarting in %ss",
                    self._service,
                    _WATCH_RESTART_DELAY_SECONDS,
                )
                await asyncio.sleep(_WATCH_RESTART_DELAY_SECONDS)

    async def _use_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        wanted = tuple(sorted(set(endpoints)))
        if wanted == self._endpoints:
            return
        replacement = await self._open_channel(wanted) if wanted else None
        previous, self._channel = self._channel, replacement
        self._endpoints, self._stubs = wanted, {}
        if previous is not None:
            self._retire(previous)
        logger.info(
            "channel to %r now spans %s",
            self._service,
            ", ".join(map(str, wanted)) or "no endpoint",
        )

    async def _open_channel(self, endpoints: Sequence[Endpoint]) -> grpc.aio.Channel:
        target = round_robin_target(await _with_names_resolved(endpoints))
        if self._credentials is None:
            return grpc.aio.insecure_channel(
                target, options=self._options, interceptors=self._interceptors
            )
        return grpc.aio.secure_channel(
            target, self._credentials, options=self._options, interceptors=self._interceptors
        )

    def _retire(self, channel: grpc.aio.Channel) -> None:
        retiring = asyncio.create_task(self._close_after_grace(channel))
        self._retiring_channels.add(retiring)
        retiring.add_done_callback(self._retiring_channels.discard)

    async def _close_after_grace(self, channel: grpc.aio.Channel) -> None:
        try:
            await asyncio.sleep(self._close_grace_seconds)
        finally:
            # close(grace) returns as soon as no RPC is active, so idle channels go at once.
            await channel.close(grace=self._close_grace_seconds)


async def _with_names_resolved(endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """IP-literal endpoints, resolving DNS names unless a lone name can be left to gRPC."""
    if len(endpoints) == 1 or all(endpoint.ip_version for endpoint in endpoints):
        return list(endpoints)
    loop = asyncio.get_running_loop()
    resolved: dict[Endpoint, None] = {}
    for endpoint in endpoints:
        if endpoint.ip_version:
            resolved[endpoint] = None
            continue
        for *_, socket_address in await loop.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM
        ):
            resolved[Endpoint(str(socket_address[0]), endpoint.port)] = None
    return list(resolved)


class _DiscoveredStub:
    """Stands in for a generated stub; each attribute is an RPC on the current channel."""

    def __init__(
        self, channel: DiscoveredChannel, stub_class: Callable[[grpc.aio.Channel], Any]
    ) -> None:
        self._channel = channel
        self._stub_class = stub_class

    def __getattr__(self, rpc_name: str) -> _DiscoveredRpc:
        if rpc_name.startswith("_"):
            raise AttributeError(rpc_name)
        return _DiscoveredRpc(self._channel, self._stub_class, rpc_name)

    def __repr__(self) -> str:
        name = getattr(self._stub_class, "__name__", repr(self._stub_class))
        return f"<{name} following {self._channel.service!r}>"


class _DiscoveredRpc:
    """One RPC of a :class:`_DiscoveredStub`, looked up on the current channel per call."""

    def __init__(
        self,
        channel: DiscoveredChannel,
        stub_class: Callable[[grpc.aio.Channel], Any],
        rpc_name: str,
    ) -> None:
        self._channel = channel
        self._stub_class = stub_class
        self._rpc_name = rpc_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        current = self._channel.current_stub(self._stub_class)
        return getattr(current, self._rpc_name)(*args, **kwargs)
