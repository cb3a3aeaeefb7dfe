"""Service discovery against real gRPC servers.

Every server here is a real ``grpc.aio`` server on port 0 with the stock health
servicer. The Consul tests run against the in-repo stand-in and, when a ``consul``
binary is on PATH, against a real ``consul agent -dev`` too, so the stand-in is held
to the agent's behaviour by the same assertions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from maas_cli.local_suite import free_port
from maas_runtime.discovery import (
    ConsulDiscovery,
    DiscoveredChannel,
    DiscoveryUnavailable,
    Endpoint,
    NoHealthyEndpoints,
    ServiceDiscovery,
    StaticDiscovery,
    go_duration,
    parse_consul_address,
    parse_static_endpoints,
    round_robin_target,
)
from maas_runtime.discovery.consul import _next_blocking_index
from maas_runtime.errors import Unavailable

from tests.support.consul_agent import ConsulUnderTest, consul_agent
from tests.support.consul_standin import ConsulStandIn

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WHO_AM_I_METHOD = "/maas.test.v1.WhoAmI/Get"


class WhoAmIStub:
    """A hand-written stub in the shape grpc_tools generates: one RPC, raw bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Get = channel.unary_unary(WHO_AM_I_METHOD)


@dataclass
class BackendServer:
    """A real gRPC server that answers WhoAmI with its name and counts the calls."""

    name: str
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    hits: Counter[str]

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    async def set_health(self, service: str, status: int) -> None:
        await self.health.set(service, status)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


ServerFactory = Callable[..., Awaitable[BackendServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    started: list[BackendServer] = []
    hits: Counter[str] = Counter()

    async def start(name: str, service: str, *, status: int = SERVING) -> BackendServer:
        async def who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            hits[name] += 1
            return name.encode()

        server = grpc.aio.server()
        health = health_aio.HealthServicer()
        await health.set(service, status)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "maas.test.v1.WhoAmI", {"Get": grpc.unary_unary_rpc_method_handler(who_am_i)}
                )
            ]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        backend = BackendServer(name, server, health, port, hits)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


@pytest.fixture
def service_name() -> str:
    # Unique per test so tests sharing one real agent never see each other's instances.
    return f"svc-{uuid.uuid4().hex[:10]}"


# --- Consul backends: the stand-in, and a real agent when one is installed ------------


@pytest.fixture(scope="session")
def real_consul_agent() -> Iterator[ConsulUnderTest]:
    binary = shutil.which("consul")
    if binary is None:
        pytest.skip("no consul binary on PATH")
    with consul_agent(binary) as agent:
        yield agent


@pytest.fixture(params=["standin", "agent"])
def consul_under_test(request: pytest.FixtureRequest) -> Iterator[ConsulUnderTest]:
    if request.param == "agent":
        yield request.getfixturevalue("real_consul_agent")
        return
    with ConsulStandIn() as standin:
        yield ConsulUnderTest(standin.http_address, check_interval_seconds=0.2)


@pytest.fixture
async def consul_discovery(consul_under_test: ConsulUnderTest) -> AsyncIterator[ConsulDiscovery]:
    async with ConsulDiscovery(
        consul_under_test.http_address,
        check_interval_seconds=consul_under_test.check_interval_seconds,
        check_timeout_seconds=1.0,
        watch_wait_seconds=2.0,
    ) as discovery:
        yield discovery


async def resolve_until(
    discovery: ServiceDiscovery, service: str, expected: set[Endpoint], timeout: float
) -> list[Endpoint]:
    """Poll ``resolve`` until it returns exactly ``expected``; fail with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        resolved = await discovery.resolve(service)
        if set(resolved) == expected and len(resolved) == len(expected):
            return resolved
        if time.monotonic() > deadline:
            pytest.fail(f"resolve({service!r}) gave {resolved}, expected {sorted(expected)}")
        await asyncio.sleep(0.05)


async def call_until_each_server_answers(
    stub: WhoAmIStub, servers: list[BackendServer], timeout: float
) -> Counter[str]:
    """Call until every server has answered at least once; return answers per name."""
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    while not all(answers[server.name] for server in servers):
        if time.monotonic() > deadline:
            break
        answers[(await stub.Get(b"", timeout=2)).decode()] += 1
    return answers


# --- Contract --------------------------------------------------------------------------


def test_service_discovery_enforces_its_abstract_methods() -> None:
    class ResolveOnly(ServiceDiscovery):
        async def resolve(self, service: str) -> list[Endpoint]:
            return []

    with pytest.raises(TypeError, match="abstract"):
        ResolveOnly()  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", Endpoint("127.0.0.1", 50051)),
        ("registry.maas.svc:443", Endpoint("registry.maas.svc", 443)),
        ("[::1]:7000", Endpoint("::1", 7000)),
    ],
)
def test_endpoint_parses_host_port_forms(text: str, expected: Endpoint) -> None:
    assert Endpoint.parse(text) == expected
    assert str(Endpoint.parse(text)) == text


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:7000", "host:0", "host:70000", ":80"])
def test_endpoint_rejects_malformed_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


# --- Static backend --------------------------------------------------------------------


def test_static_spec_parses_services_and_addresses() -> None:
    parsed = parse_static_endpoints(
        " registry=127.0.0.1:50051, 127.0.0.1:50052 ;inference=[::1]:50061;"
    )

    assert parsed == {
        "registry": [Endpoint("127.0.0.1", 50051), Endpoint("127.0.0.1", 50052)],
        "inference": [Endpoint("::1", 50061)],
    }


@pytest.mark.parametrize("spec", ["registry", "=127.0.0.1:1", "registry=127.0.0.1", "a=h:1;a=h:2"])
def test_static_spec_rejects_malformed_entries(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_static_endpoints(spec)


async def test_static_resolves_configured_and_registered_instances() -> None:
    discovery = StaticDiscovery.from_spec("registry=127.0.0.1:50051,127.0.0.1:50052")

    instance_id = await discovery.register("registry", "127.0.0.1", 50060)
    with_registered = await discovery.resolve("registry")
    await discovery.deregister(instance_id)
    after_deregister = await discovery.resolve("registry")

    configured = [Endpoint("127.0.0.1", 50051), Endpoint("127.0.0.1", 50052)]
    assert with_registered == [*configured, Endpoint("127.0.0.1", 50060)]
    assert after_deregister == configured
    assert await discovery.resolve("inference") == []


async def test_static_watch_yields_configuration_once_then_only_registrations() -> None:
    discovery = StaticDiscovery({"registry": ["127.0.0.1:50051"]})
    updates = discovery.watch("registry")

    first = await anext(updates)
    next_update = asyncio.ensure_future(anext(updates))
    yielded_while_unchanged, _ = await asyncio.wait({next_update}, timeout=0.3)
    await discovery.register("registry", "127.0.0.1", 50052)
    after_register = await asyncio.wait_for(next_update, timeout=1)
    await updates.aclose()

    assert first == [Endpoint("127.0.0.1", 50051)]
    assert not yielded_while_unchanged
    assert after_register == [Endpoint("127.0.0.1", 50051), Endpoint("127.0.0.1", 50052)]


async def test_static_channel_reaches_a_registered_server(
    start_server: ServerFactory, service_name: str
) -> None:
    server = await start_server("only", service_name)
    discovery = StaticDiscovery()

    async with DiscoveredChannel(discovery, service_name) as channel:
        stub = channel.stub(WhoAmIStub)
        with pytest.raises(NoHealthyEndpoints):
            await stub.Get(b"")
        await discovery.register(service_name, "127.0.0.1", server.port)
        deadline = time.monotonic() + 5
        while not channel.endpoints and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        answer = await stub.Get(b"", timeout=2)

    assert answer == b"only"


# --- Consul backend ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("consul.service", "http://consul.service:8500"),
        ("https://consul.service", "https://consul.service:8501"),
        ("[::1]:8500", "http://[::1]:8500"),
    ],
)
def test_consul_address_parses_consul_http_addr_forms(value: str, expected: str) -> None:
    assert str(parse_consul_address(value)) == expected


@pytest.mark.parametrize("value", ["", "unix:///tmp/consul.sock", "http://host:port", "h:1/x"])
def test_consul_address_rejects_unusable_values(value: str) -> None:
    with pytest.raises(ValueError):
        parse_consul_address(value)


def test_durations_render_as_go_durations() -> None:
    assert [go_duration(1), go_duration(0.2), go_duration(60)] == ["1s", "200ms", "60s"]


def test_blocking_index_resets_when_it_goes_backwards_and_never_drops_below_one() -> None:
    assert _next_blocking_index(previous=0, returned=42) == 42
    assert _next_blocking_index(previous=42, returned=7) == 0
    assert _next_blocking_index(previous=0, returned=0) == 1


async def test_unreachable_consul_raises_discovery_unavailable() -> None:
    async with ConsulDiscovery(f"127.0.0.1:{free_port()}") as discovery:
        with pytest.raises(DiscoveryUnavailable, match="unreachable") as raised:
            await discovery.resolve("registry")

    assert isinstance(raised.value, Unavailable)
    assert (raised.value.code, raised.value.reason) == ("UNAVAILABLE", "DISCOVERY_UNAVAILABLE")


async def test_registered_instance_resolves_only_once_healthy(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    server = await start_server("a", service_name, status=NOT_SERVING)

    instance_id = await consul_discovery.register(service_name, "127.0.0.1", server.port)
    # Long enough for several probes: a NOT_SERVING instance must never resolve.
    await asyncio.sleep(3 * consul_under_test.check_interval_seconds)
    while_not_serving = await consul_discovery.resolve(service_name)
    await server.set_health(service_name, SERVING)
    once_serving = await resolve_until(
        consul_discovery, service_name, {server.endpoint}, consul_under_test.settle_seconds
    )

    assert instance_id
    assert while_not_serving == []
    assert once_serving == [server.endpoint]


@pytest.mark.parametrize("failure", ["not_serving", "stopped"])
async def test_failing_instance_disappears_from_resolve(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
    failure: str,
) -> None:
    healthy = await start_server("healthy", service_name)
    failing = await start_server("failing", service_name)
    for server in (healthy, failing):
        await consul_discovery.register(service_name, "127.0.0.1", server.port)
    await resolve_until(
        consul_discovery,
        service_name,
        {healthy.endpoint, failing.endpoint},
        consul_under_test.settle_seconds,
    )

    if failure == "not_serving":
        await failing.set_health(service_name, NOT_SERVING)
    else:
        await failing.stop()

    remaining = await resolve_until(
        consul_discovery, service_name, {healthy.endpoint}, consul_under_test.settle_seconds
    )
    assert remaining == [healthy.endpoint]


async def test_deregister_removes_instance(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    server = await start_server("a", service_name)
    instance_id = await consul_discovery.register(service_name, "127.0.0.1", server.port)
    await resolve_until(
        consul_discovery, service_name, {server.endpoint}, consul_under_test.settle_seconds
    )

    await consul_discovery.deregister(instance_id)
    after = await resolve_until(consul_discovery, service_name, set(), timeout=2)
    # Deregistering twice is not an error: the goal state is already reached.
    await consul_discovery.deregister(instance_id)

    assert after == []


async def test_watch_yields_only_when_the_healthy_set_changes(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    server = await start_server("a", service_name)
    updates = consul_discovery.watch(service_name)

    initially = await anext(updates)
    next_update = asyncio.ensure_future(anext(updates))
    # Nothing changes: the blocking query times out (wait=2s) and is re-issued silently.
    yielded_while_unchanged, _ = await asyncio.wait({next_update}, timeout=2.5)
    await consul_discovery.register(service_name, "127.0.0.1", server.port)
    after_register = await asyncio.wait_for(next_update, consul_under_test.settle_seconds)
    await updates.aclose()

    assert initially == []
    assert not yielded_while_unchanged
    assert after_register == [server.endpoint]


async def test_watch_blocks_on_the_index_consul_returned(
    start_server: ServerFactory, service_name: str
) -> None:
    server = await start_server("a", service_name)
    with ConsulStandIn() as standin:
        async with ConsulDiscovery(
            standin.http_address, check_interval_seconds=0.2, watch_wait_seconds=2.0
        ) as discovery:
            updates = discovery.watch(service_name)
            await anext(updates)
            await discovery.register(service_name, "127.0.0.1", server.port)
            await asyncio.wait_for(anext(updates), timeout=5)
            await updates.aclose()
        queries = [query for service, query in standin.health_queries if service == service_name]

    # First an immediate query, then blocking ones carrying the index last returned.
    assert "index" not in queries[0]
    assert all(query["wait"] == ["2s"] and int(query["index"][0]) > 0 for query in queries[1:])
    assert queries[1]["passing"] == ["1"]


async def test_health_response_has_the_documented_shape(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    server = await start_server("a", service_name)
    await consul_discovery.register(service_name, "127.0.0.1", server.port, tags=("v1",))
    await resolve_until(
        consul_discovery, service_name, {server.endpoint}, consul_under_test.settle_seconds
    )
    url = f"{consul_under_test.http_address}/v1/health/service/{service_name}?passing"

    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - local test agent
        index = reply.headers["X-Consul-Index"]
        [entry] = json.loads(reply.read())

    assert int(index) > 0
    assert entry["Node"]["Node"] and entry["Node"]["Address"]
    assert {key: entry["Service"][key] for key in ("Service", "Address", "Port", "Tags")} == {
        "Service": service_name,
        "Address": "127.0.0.1",
        "Port": server.port,
        "Tags": ["v1"],
    }
    service_checks = [check for check in entry["Checks"] if check["ServiceID"]]
    assert [check["Status"] for check in service_checks] == ["passing"]
    assert service_checks[0]["ServiceID"] == entry["Service"]["ID"]


# --- Discovered channels ---------------------------------------------------------------


def test_round_robin_target_lists_every_address_in_one_family() -> None:
    v4 = [Endpoint("127.0.0.1", 1), Endpoint("10.0.0.2", 2)]
    v6 = [Endpoint("::1", 3)]

    assert round_robin_target(v4) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert round_robin_target(v6) == "ipv6:[::1]:3"
    assert round_robin_target(v4[:1] + v6) == "ipv6:[::ffff:127.0.0.1]:1,[::1]:3"
    assert round_robin_target([Endpoint("registry", 5)]) == "dns:///registry:5"
    with pytest.raises(ValueError):
        round_robin_target([Endpoint("a", 1), Endpoint("b", 2)])


async def test_channel_round_robins_over_every_healthy_server(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    servers = [await start_server(name, service_name) for name in ("a", "b")]
    for server in servers:
        await consul_discovery.register(service_name, "127.0.0.1", server.port)
    await resolve_until(
        consul_discovery,
        service_name,
        {server.endpoint for server in servers},
        consul_under_test.settle_seconds,
    )

    async with DiscoveredChannel(consul_discovery, service_name) as channel:
        answers = await call_until_each_server_answers(channel.stub(WhoAmIStub), servers, timeout=5)
        endpoints = channel.endpoints

    assert set(endpoints) == {server.endpoint for server in servers}
    assert answers["a"] > 0 and answers["b"] > 0


async def test_channel_follows_changes_without_rebuilding_stubs(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    old, kept, added = [await start_server(name, service_name) for name in ("old", "kept", "new")]
    old_id = await consul_discovery.register(service_name, "127.0.0.1", old.port)
    await consul_discovery.register(service_name, "127.0.0.1", kept.port)
    await resolve_until(
        consul_discovery,
        service_name,
        {old.endpoint, kept.endpoint},
        consul_under_test.settle_seconds,
    )

    async with DiscoveredChannel(consul_discovery, service_name) as channel:
        stub = channel.stub(WhoAmIStub)
        pinned_before_change = channel.current_stub(WhoAmIStub)
        await call_until_each_server_answers(stub, [old, kept], timeout=5)
        await consul_discovery.register(service_name, "127.0.0.1", added.port)
        await consul_discovery.deregister(old_id)
        deadline = time.monotonic() + consul_under_test.settle_seconds
        while set(channel.endpoints) != {kept.endpoint, added.endpoint}:
            if time.monotonic() > deadline:
                pytest.fail(f"channel still spans {channel.endpoints}")
            await asyncio.sleep(0.05)
        # The replaced channel stays open for its grace period, so a pinned stub works.
        pinned_answer = await pinned_before_change.Get(b"", timeout=2)
        old.hits.clear()
        # The old server is still up: only discovery can keep traffic away from it.
        answers = await call_until_each_server_answers(stub, [kept, added], timeout=5)
        answers_per_server = Counter([(await stub.Get(b"", timeout=2)).decode() for _ in range(10)])

    assert pinned_answer in (b"old", b"kept")
    assert answers["kept"] > 0 and answers["new"] > 0
    assert answers["old"] == 0 and answers_per_server["old"] == 0
    assert old.hits["old"] == 0


async def test_channel_without_healthy_endpoint_raises_the_domain_error(
    consul_discovery: ConsulDiscovery,
    consul_under_test: ConsulUnderTest,
    start_server: ServerFactory,
    service_name: str,
) -> None:
    async with DiscoveredChannel(consul_discovery, service_name) as channel:
        stub = channel.stub(WhoAmIStub)
        with pytest.raises(NoHealthyEndpoints, match=service_name) as raised:
            await stub.Get(b"")
        with pytest.raises(NoHealthyEndpoints):
            _ = channel.channel

        # The same stub recovers once an instance becomes healthy.
        server = await start_server("late", service_name)
        await consul_discovery.register(service_name, "127.0.0.1", server.port)
        deadline = time.monotonic() + consul_under_test.settle_seconds
        while not channel.endpoints and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        answer = await stub.Get(b"", timeout=2)

    # The project's error model maps it to UNAVAILABLE with a reason callers can test.
    assert isinstance(raised.value, Unavailable)
    assert (raised.value.code, raised.value.reason) == ("UNAVAILABLE", "NO_HEALTHY_ENDPOINTS")
    assert raised.value.metadata == {"service": service_name}
    assert answer == b"late"
