"""Service discovery: register instances, find healthy ones, follow changes.

Pick a backend in the composition root and inject it:

- :class:`StaticDiscovery` - endpoints from configuration, plus in-process registrations;
- :class:`ConsulDiscovery` - a Consul agent that health-checks instances over gRPC.

:class:`DiscoveredChannel` turns either into a round-robin ``grpc.aio`` channel that
follows the healthy endpoint set.
"""

from maas_runtime.discovery.base import (
    DiscoveryError,
    DiscoveryUnavailable,
    Endpoint,
    NoHealthyEndpoints,
    ServiceDiscovery,
    instance_id_for,
)
from maas_runtime.discovery.channels import DiscoveredChannel, round_robin_target
from maas_runtime.discovery.consul import (
    ConsulAddress,
    ConsulDiscovery,
    go_duration,
    parse_consul_address,
)
from maas_runtime.discovery.static import StaticDiscovery, parse_static_endpoints


def discovery_from_settings(settings) -> ServiceDiscovery:
    """Consul when `CONSUL_HTTP_ADDR` is set, else the static list (one machine)."""
    if settings.consul_http_addr:
        return ConsulDiscovery(settings.consul_http_addr, token=settings.consul_token or None)
    return StaticDiscovery.from_spec(settings.static_endpoints)


__all__ = [
    "ConsulAddress",
    "ConsulDiscovery",
    "DiscoveredChannel",
    "DiscoveryError",
    "DiscoveryUnavailable",
    "Endpoint",
    "NoHealthyEndpoints",
    "ServiceDiscovery",
    "StaticDiscovery",
    "discovery_from_settings",
    "go_duration",
    "instance_id_for",
    "parse_consul_address",
    "parse_static_endpoints",
    "round_robin_target",
]
