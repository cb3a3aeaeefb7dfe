"""Channels from one MaaS service to another: the one factory every service-to-service call uses.

A `PeerChannel` reaches a peer (the registry, a remote Triton, ...) at a configured target or
over every healthy endpoint discovery knows (static or Consul), with what the calling
service's settings say: its bearer token, TLS or mTLS client credentials (`peer_tls_*`, the
client side of the server's `tls_*`), message limits and OpenTelemetry client spans.

A failure to connect is turned into an UNAVAILABLE that says which transport was used and
how to change it: a plaintext peer dialling a TLS-only registry otherwise sees nothing better
than "Socket closed".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from maas_runtime import errors
from maas_runtime.client import client_interceptors
from maas_runtime.discovery.channels import DiscoveredChannel
from maas_runtime.grpc_errors import from_rpc_error
from maas_runtime.settings import ServiceSettings
from maas_runtime.tls import channel_credentials

if TYPE_CHECKING:  # annotations only: no telemetry SDK import for a peer without it
    from maas_runtime.discovery.base import Endpoint, ServiceDiscovery
    from maas_runtime.telemetry import Telemetry

__all__ = ["PeerChannel", "PeerTransport"]

_log = logging.getLogger(__name__)
_Stub = TypeVar("_Stub")


@dataclass(frozen=True)
class PeerTransport:
    """How a service dials its peers: credentials (None for plaintext) and extra options."""

    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, Any], ...] = ()
    mutual: bool = False
    settings_prefix: str = "MAAS_<SERVICE>_"
    """Env prefix of the settings that configure it, for error messages that say what to set."""

    @classmethod
    def from_settings(cls, settings: ServiceSettings, *, tls: bool = False) -> PeerTransport:
        """The transport `settings` configure (`tls` forces TLS even when no `peer_tls_*` is
        set, trusting the system's CAs: for a peer known to serve TLS)."""
        prefix = str(settings.model_config.get("env_prefix") or "MAAS_<SERVICE>_")
        if not (tls or settings.peer_tls_enabled):
            return cls(settings_prefix=prefix)
        if (settings.peer_tls_cert_file is None) != (settings.peer_tls_key_file is None):
            raise ValueError(f"{prefix}PEER_TLS_CERT_FILE and {prefix}PEER_TLS_KEY_FILE go "
                             "together (the client certificate and its key)")
        options = ((("grpc.ssl_target_name_override", settings.peer_tls_server_name),)
                   if settings.peer_tls_server_name else ())
        return cls(channel_credentials(settings.peer_tls_ca_file, settings.peer_tls_cert_file,
                                       settings.peer_tls_key_file),
                   options, mutual=settings.peer_tls_cert_file is not None,
                   settings_prefix=prefix)

    @property
    def name(self) -> str:
        if self.credentials is None:
            return "plaintext"
        return "mTLS" if self.mutual else "TLS"

    def unreachable_hint(self) -> str:
        """What to check when a peer cannot be reached over this transport."""
        prefix = self.settings_prefix
        if self.credentials is None:
            return (f"if the peer serves TLS, dial it with TLS: set {prefix}PEER_TLS_CA_FILE "
                    f"(and {prefix}PEER_TLS_CERT_FILE/{prefix}PEER_TLS_KEY_FILE for mTLS)")
        return (f"check that the peer serves TLS, that {prefix}PEER_TLS_CA_FILE trusts its "
                f"certificate (or {prefix}PEER_TLS_SERVER_NAME names it)"
                + ("" if self.mutual else f", and whether it requires a client certificate "
                   f"({prefix}PEER_TLS_CERT_FILE/{prefix}PEER_TLS_KEY_FILE)"))


class PeerChannel:
    """A channel to one peer service, opened when the caller's event loop runs.

    `target` (host:port) wins; without it the endpoints of `service` come from `discovery`
    and calls are balanced round-robin over them, following changes.
    """

    def __init__(
        self,
        service: str,
        *,
        target: str = "",
        discovery: ServiceDiscovery | None = None,
        transport: PeerTransport | None = None,
        token: str | None = None,
        telemetry: Telemetry | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not target and discovery is None:
            raise ValueError(f"the {service} peer needs a target or discovery")
        self.service = service
        self.target = target
        self.transport = transport or PeerTransport()
        self._discovery = discovery
        self._interceptors = client_interceptors(token, telemetry)
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *self.transport.options,
            *options,
        ]
        self._channel: grpc.aio.Channel | None = None
        self._discovered: DiscoveredChannel | None = None

    @classmethod
    def from_settings(cls, settings: ServiceSettings, service: str, *, target: str = "",
                      discovery: ServiceDiscovery | None = None,
                      telemetry: Telemetry | None = None,
                      options: Sequence[tuple[str, Any]] = ()) -> PeerChannel:
        """The peer as `settings` configure it: client token file, `peer_tls_*`, limits."""
        return cls(service, target=target, discovery=discovery,
                   transport=PeerTransport.from_settings(settings),
                   token=_read_client_token(settings), telemetry=telemetry,
                   max_message_bytes=settings.max_message_bytes, options=options)

    @property
    def where(self) -> str:
        return self.target or f"{self.service} (via discovery)"

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The healthy endpoints discovery gives now; () for a fixed target or before open."""
        return self._discovered.endpoints if self._discovered is not None else ()

    async def open(self) -> None:
        """Open the channel (or start following discovery); needs the running event loop."""
        if self.target:
            credentials = self.transport.credentials
            self._channel = (
                grpc.aio.secure_channel(self.target, credentials, self._options,
                                        interceptors=self._interceptors)
                if credentials is not None else
                grpc.aio.insecure_channel(self.target, self._options,
                                          interceptors=self._interceptors))
            return
        if self._discovery is None:  # refused by __init__ already; this tells the type checker
            raise ValueError(f"the {self.service} peer needs a target or discovery")
        self._discovered = DiscoveredChannel(
            self._discovery, self.service, credentials=self.transport.credentials,
            options=self._options, interceptors=self._interceptors)
        await self._discovered.start()

    def stub(self, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        """A stub whose calls go through this peer's current channel."""
        if self._discovered is not None:
            return self._discovered.stub(stub_class)
        if self._channel is None:
            raise errors.Unavailable(f"the channel to {self.service} is not open")
        return stub_class(self._channel)

    def error(self, rpc_error: grpc.RpcError) -> errors.MaasError:
        """The suite error for a failed call to this peer; a connection failure says which
        transport was used and what to change."""
        error = from_rpc_error(rpc_error)
        if isinstance(error, errors.Unavailable) and _is_connection_failure(rpc_error):
            error.message = (f"{self.service} at {self.where} is unreachable over "
                             f"{self.transport.name}: {error.message}; "
                             f"{self.transport.unreachable_hint()}")
        return error

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._discovered is not None:
            await self._discovered.close()
            self._discovered = None


def _is_connection_failure(rpc_error: grpc.RpcError) -> bool:
    """UNAVAILABLE raised by the channel itself, not one the peer answered with (those carry
    the peer's `google.rpc.Status`, e.g. a registry whose database is down)."""
    trailing = rpc_error.trailing_metadata() if hasattr(rpc_error, "trailing_metadata") else ()
    return not any(key == "grpc-status-details-bin" for key, _ in trailing or ())


def _read_client_token(settings: ServiceSettings) -> str | None:
    path = settings.resolved_client_token_file
    if path.exists():
        return path.read_text().strip()
    _log.warning("no client token at %s; calls to peers go unauthenticated", path)
    return None
