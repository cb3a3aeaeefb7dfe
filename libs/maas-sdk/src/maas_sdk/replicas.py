"""Calls spread over a service's replicas in turn, each retry on the next replica.

gRPC's round_robin balances one channel's calls, but a retried call just takes the next pick of
a channel every thread shares, so it may land again on the replica that just failed. Here each
replica has its own channel, health-checked (a replica whose `grpc.health.v1` status is not
SERVING fails a call at once, locally); a call starts at the next replica in turn and attempt n
goes to the (n-1)-th replica after it, replicas whose channel is not READY last. Which replicas
there are comes from the service's balanced `PeerChannel` (discovery, or the endpoints named),
so a replica that stops passing its Consul check drops out, and one that rejoins comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from maas_runtime.client import open_blocking_channel, open_channel
from maas_runtime.discovery import Endpoint
from maas_runtime.peers import PeerChannel, PeerTransport

__all__ = ["AsyncReplicas", "BlockingReplicas", "in_turn"]

_Stub = TypeVar("_Stub")
_Item = TypeVar("_Item")
_READY = grpc.ChannelConnectivity.READY
_GRACE_SECONDS = 5.0


def in_turn(items: Sequence[_Item], turn: int, ready: Callable[[_Item], bool]) -> list[_Item]:
    """`items` from position `turn` (modulo their number) onwards, wrapping around; the ready
    ones first, each group keeping that order."""
    start = turn % len(items) if items else 0
    rotated = [*items[start:], *items[:start]]
    return [item for item in rotated if ready(item)] + [item for item in rotated
                                                        if not ready(item)]


class AsyncReplicas:
    """One aio channel per replica of `service`, following the endpoints `balanced` knows."""

    def __init__(self, balanced: PeerChannel, *, transport: PeerTransport, token: str | None,
                 max_message_bytes: int, options: Sequence[tuple[str, Any]]) -> None:
        self._balanced = balanced
        self._transport = transport
        self._token = token
        self._max_message_bytes = max_message_bytes
        self._options = [*transport.options, *options]
        self._channels: dict[Endpoint, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[Endpoint, Any], Any] = {}
        self._turns = itertools.count()
        self._closing: set[asyncio.Task[None]] = set()

    def stubs(self, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> list[_Stub]:
        """A stub per replica, in the order one call should try them (empty: none known).
        Runs on the event loop (it may open and retire channels)."""
        endpoints = self._balanced.endpoints
        for gone in set(self._channels) - set(endpoints):
            self._retire(self._channels.pop(gone))
            self._stubs = {key: stub for key, stub in self._stubs.items() if key[0] != gone}
        for endpoint in endpoints:
            if endpoint not in self._channels:
                self._channels[endpoint] = open_channel(
                    endpoint.address, token=self._token, credentials=self._transport.credentials,
                    max_message_bytes=self._max_message_bytes, options=self._options)
        order = in_turn(endpoints, next(self._turns),
                        lambda e: self._channels[e].get_state(try_to_connect=True) == _READY)
        return [self._stub(endpoint, stub_class) for endpoint in order]

    def _stub(self, endpoint: Endpoint, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        key = (endpoint, stub_class)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_class(self._channels[endpoint])
        return stub

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """Close a replica's channel once the calls in flight on it finished."""
        closing = asyncio.get_running_loop().create_task(channel.close(grace=_GRACE_SECONDS))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._channels.clear()
        self._stubs.clear()


class BlockingReplicas:
    """One blocking channel per fixed endpoint (Predict's hot path), each health-checked; the
    connectivity of each is followed to put READY replicas first."""

    def __init__(self, endpoints: Sequence[Endpoint], *, transport: PeerTransport,
                 max_message_bytes: int, options: Sequence[tuple[str, Any]]) -> None:
        self._channels = [open_blocking_channel(
            endpoint.address, credentials=transport.credentials,
            max_message_bytes=max_message_bytes, options=[*transport.options, *options])
            for endpoint in endpoints]
        self._states = [grpc.ChannelConnectivity.IDLE for _ in endpoints]
        self._lock = threading.Lock()
        self._turns = itertools.count()
        self._stubs: dict[Any, list[Any]] = {}
        for index, channel in enumerate(self._channels):
            channel.subscribe(self._follower(index), try_to_connect=True)

    def _follower(self, index: int) -> Callable[[grpc.ChannelConnectivity], None]:
        def follow(state: grpc.ChannelConnectivity) -> None:
            self._states[index] = state
        return follow

    def stubs(self, stub_class: Callable[[grpc.Channel], _Stub]) -> list[_Stub]:
        """A stub per replica, in the order one call should try them."""
        with self._lock:
            turn = next(self._turns)
        stubs = self._stubs.get(stub_class)
        if stubs is None:
            stubs = self._stubs[stub_class] = [stub_class(channel) for channel in self._channels]
        order = in_turn(range(len(stubs)), turn, lambda i: self._states[i] == _READY)
        return [stubs[index] for index in order]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
