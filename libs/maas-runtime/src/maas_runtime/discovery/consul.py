"""Discovery through a Consul agent's HTTP API (via py-consul).

Each instance is registered with a gRPC health check (``host:port/<service>``), so
Consul itself probes ``grpc.health.v1.Health/Check`` for the service name and
``resolve``/``watch`` only ever return instances whose check is passing.

py-consul is synchronous (``requests``), so every call runs in a worker thread and the
event loop never blocks. ``watch`` uses Consul blocking queries and follows the rules
of Consul's "Blocking Queries" documentation: reset the index when it goes backwards,
never block on an index below 1, and rate-limit the loop with a small token bucket.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
import requests

from maas_runtime.discovery.base import (
    DiscoveryError,
    DiscoveryUnavailable,
    Endpoint,
    ServiceDiscovery,
    instance_id_for,
)

__all__ = ["ConsulAddress", "ConsulDiscovery", "go_duration", "parse_consul_address"]

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

_DEFAULT_HTTP_PORT = 8500
_DEFAULT_HTTPS_PORT = 8501

# Consul's docs ask blocking-query loops to allow a short burst and then slow down when
# results churn, instead of sleeping on every iteration (which delays the happy path).
_QUERY_BURST = 2
_SECONDS_PER_QUERY_WHEN_CHURNING = 1.0

_RETRY_DELAY_FIRST_SECONDS = 0.5
_RETRY_DELAY_MAX_SECONDS = 10.0


@dataclass(frozen=True)
class ConsulAddress:
    """Where the Consul agent's HTTP API listens."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_consul_address(value: str) -> ConsulAddress:
    """Parse a ``CONSUL_HTTP_ADDR``-style value.

    Accepts ``http://127.0.0.1:8500``, ``https://consul:8501``, ``127.0.0.1:8500``,
    ``[::1]:8500`` or a bare host (port 8500 for http, 8501 for https).
    """
    text = value.strip()
    if not text:
        raise ValueError("the Consul address is empty")
    parts = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"Consul address {value!r} must use http or https, not {scheme!r}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected [scheme://]host[:port] as the Consul address, got {value!r}")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"Consul address {value!r} has an invalid port") from error
    if port is None:
        port = _DEFAULT_HTTPS_PORT if scheme == "https" else _DEFAULT_HTTP_PORT
    return ConsulAddress(scheme=scheme, host=parts.hostname, port=port)


def go_duration(seconds: float) -> str:
    """Render seconds as a Go duration string, the form Consul accepts ("2s", "200ms")."""
    if seconds <= 0:
        raise ValueError(f"a Consul duration must be positive, got {seconds}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


class ConsulDiscovery(ServiceDiscovery):
    """Registers instances with, and resolves them from, a Consul agent."""

    def __init__(
        self,
        address: str = "127.0.0.1:8500",
        *,
        token: str | None = None,
        verify: bool | str = True,
        check_interval_seconds: float = 1.0,
        check_timeout_seconds: float = 2.0,
        deregister_critical_after_seconds: float = 60.0,
        watch_wait_seconds: float = 30.0,
    ) -> None:
        """Configure the client; nothing is sent to Consul until a method is awaited.

        ``address`` is a ``CONSUL_HTTP_ADDR``-style value and ``token`` an optional ACL
        token; ``verify`` is passed to ``requests`` (a CA bundle path or a bool).
        ``check_interval_seconds`` is how often the agent probes each instance (a real
        agent raises anything under 1s to 1s). ``deregister_critical_after_seconds``
        lets the agent drop an instance that crashed without deregistering (Consul's
        minimum is one minute). ``watch_wait_seconds`` bounds each blocking query.
        """
        self._address = parse_consul_address(address)
        self._token = token
        self._verify = verify
        self._check_interval = go_duration(check_interval_seconds)
        self._check_timeout = go_duration(check_timeout_seconds)
        self._deregister_critical_after = go_duration(deregister_critical_after_seconds)
        self._watch_wait = go_duration(watch_wait_seconds)
        # One client for the short calls. requests does not promise that a Session is
        # safe to share between threads, and to_thread may run calls concurrently.
        self._client = self._new_client()
        self._client_lock = threading.Lock()

    @property
    def address(self) -> ConsulAddress:
        """The agent this backend talks to."""
        return self._address

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
        health_check = consul.Check.grpc(
            f"{endpoint.address}/{service}",
            self._check_interval,
            use_tls=tls,
            timeout=self._check_timeout,
            deregister=self._deregister_critical_after,
        )
        await self._call(
            lambda client: client.agent.service.register(
                service,
                service_id=instance_id,
                address=host,
                port=port,
                tags=list(tags),
                check=health_check,
                # The id is deterministic, so a restarted instance re-registers over its
                # old entry; this drops any check the old registration had and we don't.
                replace_existing_checks=True,
            )
        )
        return instance_id

    async def deregister(self, instance_id: str) -> None:
        removed = await self._call(lambda client: client.agent.service.deregister(instance_id))
        if not removed:
            # The agent answers 404 for an unknown id; the goal state is reached anyway.
            logger.debug("Consul did not know instance %s; nothing to deregister", instance_id)

    async def resolve(self, service: str) -> list[Endpoint]:
        _, entries = await self._call(lambda client: client.health.service(service, passing=True))
        return _endpoints_of(entries)

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        # A watch owns its client: a blocking query holds it for up to the wait time.
        client = self._new_client()
        limiter = _TokenBucket(_QUERY_BURST, _SECONDS_PER_QUERY_WHEN_CHURNING)
        index = 0
        retry_delay = _RETRY_DELAY_FIRST_SECONDS
        previous: list[Endpoint] | None = None
        try:
            while True:
                await limiter.acquire()
                try:
                    returned_index, entries = await _run_in_daemon_thread(
                        functools.partial(
                            client.health.service,
                            service,
                            passing=True,
                            # index 0 means "answer now"; py-consul omits a falsy index.
                            index=index or None,
                            wait=self._watch_wait,
                        )
                    )
                except (requests.RequestException, consul.ConsulException) as error:
                    logger.warning(
                        "watching %r on Consul at %s failed (%s); retrying in %.1fs",
                        service,
                        self._address,
                        error,
                        retry_delay,
                    )
                    await asyncio.sleep(retry_delay)
                    retry_delay = min(retry_delay * 2, _RETRY_DELAY_MAX_SECONDS)
                    continue
                retry_delay = _RETRY_DELAY_FIRST_SECONDS
                index = _next_blocking_index(index, int(returned_index))
                endpoints = _endpoints_of(entries)
                if endpoints != previous:
                    previous = endpoints
                    yield list(endpoints)
        finally:
            # A cancelled query may still be in flight in its thread; closing the session
            # under it only makes that orphaned request fail, which nobody awaits.
            client.http.close()

    async def close(self) -> None:
        with self._client_lock:
            self._client.http.close()

    def _new_client(self) -> consul.Consul:
        # Bracket IPv6 literals: py-consul builds its base URL as f"{host}:{port}".
        host = f"[{self._address.host}]" if ":" in self._address.host else self._address.host
        client = consul.Consul(
            host=host,
            port=self._address.port,
            token=self._token,
            scheme=self._address.scheme,
            verify=self._verify,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override the token argument. Settings are
        # injected here, so the caller's value (including "no token") must win.
        client.token = self._token
        return client

    async def _call(self, operation: Callable[[consul.Consul], _Result]) -> _Result:
        def run_with_shared_client() -> _Result:
            with self._client_lock:
                return operation(self._client)

        try:
            return await asyncio.to_thread(run_with_shared_client)
        except requests.RequestException as error:
            raise DiscoveryUnavailable(
                f"the Consul agent at {self._address} is unreachable: {error}"
            ) from error
        except consul.ConsulException as error:
            raise DiscoveryError(
                f"the Consul agent at {self._address} rejected the request: {error}"
            ) from error


def _endpoints_of(entries: list[dict[str, Any]] | None) -> list[Endpoint]:
    """Endpoints from a /v1/health/service response, sorted and de-duplicated."""
    endpoints = set()
    for entry in entries or ():
        registered = entry["Service"]
        # Consul documents an empty service Address as "use the node's address".
        host = registered.get("Address") or entry["Node"]["Address"]
        endpoints.add(Endpoint(host, int(registered["Port"])))
    return sorted(endpoints)


def _next_blocking_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, per Consul's blocking-query rules."""
    if returned < previous:
        # Indexes can go backwards (snapshot restore, upgrades); restart the loop.
        return 0
    # An index of 0 never blocks; 1 is always safe and avoids a busy loop.
    return max(returned, 1)


class _TokenBucket:
    """Allows ``burst`` queries at once, then one every ``seconds_per_token``."""

    def __init__(self, burst: int, seconds_per_token: float) -> None:
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._seconds_per_token = seconds_per_token
        self._refilled_at = time.monotonic()

    async def acquire(self) -> None:
        self._refill()
        if self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) * self._seconds_per_token)
            self._refill()
        self._tokens -= 1

    def _refill(self) -> None:
        now = time.monotonic()
        earned = (now - self._refilled_at) / self._seconds_per_token
        self._tokens = min(self._capacity, self._tokens + earned)
        self._refilled_at = now


async def _run_in_daemon_thread(function: Callable[[], _Result]) -> _Result:
    """Run a blocking call in a daemon thread and await its result.

    Used for blocking queries instead of ``asyncio.to_thread``: a cancelled watch leaves
    its query running until the wait elapses, and in the default executor that would
    hold up event-loop shutdown (and process exit) for the whole wait.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[_Result] = loop.create_future()

    def settle(result: _Result | None, error: Exception | None) -> None:
        if outcome.done():
            return
        if error is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: _Result | None = None
        error: Exception | None = None
        try:
            result = function()
        except Exception as raised:  # handed to the awaiting task, which re-raises it
            error = raised
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop closed while the query was in flight: nobody is waiting

    threading.Thread(target=run, name="consul-blocking-query", daemon=True).start()
    return await outcome
