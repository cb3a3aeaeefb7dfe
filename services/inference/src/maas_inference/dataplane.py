"""The native data plane: a C++ front door that serves plain inference requests itself.

A Python gRPC hop costs about 0.5 ms of CPU per request on these machines, three times what
Triton spends serving it, so a gateway written in Python cannot keep up with Triton. The
data plane (`services/inference/native`, built by `make install`) owns the service's public
port instead. KServe-v2 ModelInfer and Predict requests that it can prove valid (known token
scoped to the deployment, deployment in the table, tensors matching the signature) go from
it straight to Triton, with concurrent requests sharing calls; every other call, and every
request it declines or Triton fails, is relayed unchanged to this service on a loopback port.
So every rule and every error keeps one implementation, here.

What it may serve is pushed to it as a routing table (JSON lines on its stdin, each
acknowledged), built from the deployment manager's live routes. A route with a shadow, or a
signature that cannot be split by rows, is left out: those requests come here. The process
dies with the service; if it dies alone it is started again on the same port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from google.rpc import code_pb2
from maas_runtime import errors
from opentelemetry import trace
from opentelemetry.metrics import Observation
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from maas_inference.routing import Route, ServedModel
from maas_inference.usage import PREDICT, UsageLedger, UsageMetrics, UsageRecord

_log = logging.getLogger(__name__)
_access_log = logging.getLogger("maas.access")

BINARY_NAME = "maas-inference-dataplane"
_UNLIMITED_CALLS = 1 << 30
_RESTART_DELAY_SECONDS = 0.5
W3C_TRACE_CONTEXT = TraceContextTextMapPropagator()


def find_binary(configured: str = "") -> Path:
    """The data plane executable: `configured`, else beside this interpreter, else on PATH."""
    candidates = [configured] if configured else [
        os.fspath(Path(sys.executable).parent / BINARY_NAME), shutil.which(BINARY_NAME) or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise errors.FailedPrecondition(
        f"the native data plane ({configured or BINARY_NAME}) is not installed: run `make "
        "install`, or set MAAS_INFERENCE_DATA_PLANE=python", reason="DATA_PLANE_MISSING")


def route_table(routes: Mapping[str, Route], triton_ready: bool, calls_per_instance: int,
                relay: tuple[bool, frozenset[str]] = (False, frozenset())) -> dict:
    """The table the data plane serves from: plain routes only (no shadow, split by rows).

    `relay` is (every tenant, these tenants): whose requests it must relay here for admission,
    because tenant limits on requests apply to them (`TenancyConfig.request_limited`).
    """
    plain = {
        deployment_id: {"targets": [_target(model, percent, calls_per_instance)
                                    for model, percent in route.targets]}
        for deployment_id, route in routes.items()
        if route.shadow is None and all(m.signature.splits_by_rows for m, _ in route.targets)
    }
    relay_all, relay_tenants = relay
    return {"triton_ready": triton_ready, "routes": plain, "relay_all": relay_all,
            "relay_tenants": sorted(relay_tenants)}


def _target(model: ServedModel, percent: int, calls_per_instance: int) -> dict:
    signature = model.signature
    return {
        "triton_model": model.triton_model, "version": model.version,
        "model_id": model.version.split("/")[1], "percent": percent,
        "max_batch_size": signature.max_batch_size,
        "max_calls_in_flight": (model.instances * calls_per_instance if calls_per_instance
                                else _UNLIMITED_CALLS),
        "inputs": [_tensor(rule) for rule in signature.inputs],
        "outputs": [_tensor(rule) for rule in signature.outputs],
    }


def _tensor(rule) -> dict:
    return {"name": rule.name, "datatype": rule.datatype, "shape": list(rule.shape)}


class NativeDataPlane:
    """Runs the data plane process as the service's front door and keeps its table current.

    `table()` gives the current `route_table(...)`; it is pushed (numbered) when the process
    starts and on every `publish()`.
    """

    def __init__(self, binary: Path, *, host: str, port: int, triton_target: Callable[[], str],
                 table: Callable[[], dict], tokens_file: Path | None, max_message_bytes: int,
                 shutdown_grace_seconds: float, tls_files: tuple[Path | None, ...] = (),
                 latency_buckets_ms: tuple[float, ...] = (), access_sample_every: int = 0):
        self._binary = binary
        self._host, self._port = host, port
        self._triton_target = triton_target
        self._table = table
        self._tokens_file = tokens_file
        self._max_message_bytes = max_message_bytes
        self._grace = shutdown_grace_seconds
        self._tls_files = tls_files
        self._latency_buckets_ms = latency_buckets_ms
        self._access_sample_every = access_sample_every
        self._backend_target = ""
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._generation = 0
        self._watcher: asyncio.Task | None = None
        self._closing = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def open(self, backend_target: str) -> int:
        self._backend_target = backend_target
        await self._start()
        self._watcher = asyncio.get_running_loop().create_task(self._restart_when_it_dies())
        return self._port

    def _arguments(self) -> list[str]:
        arguments = [f"--listen={self._host}:{self._port}",
                     f"--control-plane={self._backend_target}",
                     f"--triton={self._triton_target()}",
                     f"--max-message-bytes={self._max_message_bytes}",
                     f"--shutdown-grace-seconds={self._grace}"]
        if self._tokens_file is not None:
            arguments.append(f"--tokens-file={self._tokens_file}")
        if self._latency_buckets_ms:
            arguments.append("--latency-buckets-ms="
                             + ",".join(repr(float(b)) for b in self._latency_buckets_ms))
        if self._access_sample_every:
            arguments.append(f"--access-sample-every={self._access_sample_every}")
        for flag, path in zip(("tls-cert", "tls-key", "tls-client-ca"), self._tls_files,
                              strict=False):
            if path is not None:
                arguments.append(f"--{flag}={path}")
        return arguments

    def _running_process(self) -> tuple[asyncio.subprocess.Process, asyncio.StreamWriter,
                                        asyncio.StreamReader]:
        """The data plane's process and its control pipes; UNAVAILABLE before it started."""
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise errors.Unavailable("the data plane is not running (yet)",
                                     reason="DATA_PLANE_FAILED")
        return process, process.stdin, process.stdout

    async def _start(self) -> None:
        async with self._lock:
            self._process = await asyncio.create_subprocess_exec(
                os.fspath(self._binary), *self._arguments(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            process, _, stdout = self._running_process()
            line = (await stdout.readline()).decode().split()
            if line[:1] != ["listening"]:
                await process.wait()
                raise errors.Unavailable(
                    f"the data plane could not listen on {self._host}:{self._port} (exit "
                    f"{process.returncode})", reason="DATA_PLANE_FAILED")
            self._port = int(line[1])  # a restart binds the same port again
            await self._send_table()
        _log.info("data plane serving on %s:%d (pid %d)", self._host, self._port,
                  self._process.pid)

    @property
    def _running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def publish(self) -> None:
        """Push the current table; returns once the data plane serves from it."""
        async with self._lock:
            if not self._running:
                return  # not started yet, or being restarted: it gets the table when it starts
            try:
                await self._send_table()
            except errors.Unavailable:
                _log.warning("the data plane died while taking its table; its restart takes it")

    async def _send_table(self) -> None:
        self._generation += 1
        table = {**self._table(), "generation": self._generation}
        answer = await self._ask(json.dumps(table))
        if answer != f"applied {self._generation}":
            raise errors.Internal(f"the data plane refused its routing table: {answer}")

    async def stats(self) -> dict:
        """What the data plane did: requests served, declined (relayed here), Triton calls."""
        async with self._lock:
            if not self._running:
                raise errors.Unavailable("the data plane is not running (yet)",
                                         reason="DATA_PLANE_FAILED")
            answer = await self._ask('{"stats": true}')
        return json.loads(answer.removeprefix("stats "))

    async def spans(self) -> dict:
        """Takes the span records of the requests it served for callers that sent a
        traceparent, and of those it sampled for the access log (`"sampled": true`):
        `{"spans": [...], "dropped": N}` (records it had no room for)."""
        async with self._lock:
            if not self._running:
                raise errors.Unavailable("the data plane is not running (yet)",
                                         reason="DATA_PLANE_FAILED")
            answer = await self._ask('{"spans": true}')
        return json.loads(answer.removeprefix("spans "))

    async def _ask(self, line: str) -> str:
        """One line to the data plane and its one-line answer; UNAVAILABLE if it has died."""
        _, stdin, stdout = self._running_process()
        try:
            stdin.write(line.encode() + b"\n")
            await stdin.drain()
            answer = await stdout.readline()
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        if not answer:
            raise errors.Unavailable("the data plane stopped", reason="DATA_PLANE_FAILED")
        return answer.decode().strip()

    async def _restart_when_it_dies(self) -> None:
        while not self._closing:
            process, _, _ = self._running_process()
            await process.wait()
            if self._closing:
                return
            _log.error("the data plane exited (%s); starting it again", process.returncode)
            await asyncio.sleep(_RESTART_DELAY_SECONDS)
            try:
                await self._start()
            except (errors.MaasError, OSError):
                _log.exception("restarting the data plane failed; trying again")

    async def close(self) -> None:
        """End of its stdin: it stops accepting, finishes what is in flight, and exits."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        process = self._process
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(self._grace + 5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


class DataPlaneMetrics:
    """The data plane's counters as OpenTelemetry metrics, and its latency as a histogram.

    Requests it serves never reach this process's RPC interceptors, so its own counts are
    exported instead: `maas.inference.dataplane.requests` by deployment and outcome (served
    there, or relayed here) and `maas.inference.dataplane.triton_calls`. They are polled every
    `poll_seconds`; requests naming no deployment it knows count under deployment "".
    The latency of what it served, bucketed by the data plane itself, has no OpenTelemetry
    instrument (histograms cannot be observed), so `collector()` gives it to the Prometheus
    endpoint as `maas_inference_dataplane_duration_milliseconds` by deployment.
    """

    def __init__(self, data_plane: NativeDataPlane, meter, poll_seconds: float = 5.0):
        self._data_plane = data_plane
        self._poll_seconds = poll_seconds
        self._stats: dict = {}
        meter.create_observable_counter(
            "maas.inference.dataplane.requests", callbacks=[self._observe_requests],
            unit="{request}", description="requests the native data plane served or relayed")
        meter.create_observable_counter(
            "maas.inference.dataplane.triton_calls", callbacks=[self._observe_triton_calls],
            unit="{call}", description="calls the native data plane made to Triton")

    async def refresh(self) -> None:
        self._stats = await self._data_plane.stats()

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except errors.MaasError as exc:  # restarting: the next poll catches up
                _log.debug("no data plane counters this time: %s", exc.message)
            await asyncio.sleep(self._poll_seconds)

    def _observe_requests(self, _options) -> list[Observation]:
        return [Observation(counts[outcome], {"deployment": deployment, "outcome": outcome})
                for deployment, counts in self._stats.get("deployments", {}).items()
                for outcome in ("served", "declined")]

    def _observe_triton_calls(self, _options) -> list[Observation]:
        return [Observation(self._stats["triton_calls"])] if self._stats else []

    def collector(self) -> DataPlaneLatencyCollector:
        return DataPlaneLatencyCollector(lambda: self._stats)


class DataPlaneLatencyCollector:
    """A `prometheus_client` collector of the data plane's per-deployment latency buckets."""

    NAME = "maas_inference_dataplane_duration_milliseconds"

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def describe(self) -> list:
        return []  # unknown until the first poll; nothing to check at registration

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        stats = self._stats()
        bounds = stats.get("latency_bounds_ms", [])
        family = HistogramMetricFamily(
            self.NAME, "time the native data plane took to serve a request (accepted to "
            "answered)", labels=["deployment"])
        for deployment, counts in stats.get("deployments", {}).items():
            per_bucket = counts.get("latency_buckets") or []
            if not per_bucket:
                continue
            cumulative, buckets = 0, []
            for bound, count in zip([*map(_le, bounds), "+Inf"], per_bucket, strict=False):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([deployment], buckets, counts.get("latency_sum_ms", 0.0))
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


class DataPlaneUsage:
    """Usage records for the requests the native data plane served itself.

    The data plane counts, per deployment, version, principal and tenant (the token's, as
    `maas_runtime.auth` reads it), the requests it served and their rows (`"usage"` in its
    stats, cumulative since it started). Every `poll_seconds` the growth since the previous
    poll becomes one Predict record per (deployment, version, principal) with `requests` and
    `rows` set, starting at the previous poll and lasting the
    interval. A restarted data plane (a new pid) counts from zero again; what it served since
    the last poll before it died is lost, as is the last interval on a kill -9 of this service.
    Requests it relays here are metered by the Predictor like every other call.
    """

    def __init__(self, data_plane: NativeDataPlane, ledger: UsageLedger,
                 metrics: UsageMetrics | None = None, poll_seconds: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._data_plane = data_plane
        self._ledger = ledger
        self._metrics = metrics
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._seen: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        self._seen_pid: int | None = None
        self._since = clock()

    async def collect(self) -> int:
        """Append the records of what was served since the last call; returns how many."""
        stats = await self._data_plane.stats()
        now = self._clock()
        if self._data_plane.pid != self._seen_pid:
            self._seen, self._seen_pid = {}, self._data_plane.pid
        start = datetime.fromtimestamp(self._since, UTC)
        appended = 0
        for entry in stats.get("usage", []):
            tenant = entry.get("tenant") or entry["principal"]
            key = (entry["deployment"], entry["version"], entry["principal"], tenant)
            requests, rows = int(entry["requests"]), int(entry["rows"])
            seen_requests, seen_rows = self._seen.get(key, (0, 0))
            self._seen[key] = (requests, rows)
            if requests <= seen_requests:
                continue
            record = UsageRecord(
                tenant=tenant, principal=entry["principal"],
                deployment=entry["deployment"], version=entry["version"], kind=PREDICT,
                start_time=start, duration_seconds=max(now - self._since, 0.0), outcome="OK",
                requests=requests - seen_requests, rows=max(rows - seen_rows, 0))
            self._ledger.append(record)
            if self._metrics is not None:
                self._metrics.record(record)
            appended += 1
        self._since = now
        return appended

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.collect()
            except errors.MaasError as exc:  # restarting: its counts since the last poll are lost
                _log.debug("no data plane usage this time: %s", exc.message)


class DataPlaneSpans:
    """Spans and access log lines for the requests the data plane served.

    The data plane exports nothing itself: it keeps, for each request it served that carried
    a W3C `traceparent`, and for one in every `access_sample_every` it served, when it was
    accepted and answered, by whom and how it ended (a bounded buffer). This polls those
    records every `poll_seconds`; with a `tracer` each traced one becomes a SERVER span with
    its real start and end times, parented on the caller's span (the sampler decides as for
    any incoming call); each sampled one becomes an access log line like the interceptor's
    (`served_by: data-plane`, `sample_every`), with the caller's trace id when it sent one.
    """

    def __init__(self, data_plane: NativeDataPlane, tracer=None, poll_seconds: float = 1.0,
                 sample_every: int = 0):
        self._data_plane = data_plane
        self._tracer = tracer
        self._poll_seconds = poll_seconds
        self._sample_every = sample_every
        self.dropped = 0
        """Records the data plane had no room for (it was not polled in time)."""

    async def export(self) -> int:
        """Emit the spans and log lines recorded since the last call; returns how many
        records there were."""
        taken = await self._data_plane.spans()
        self.dropped += taken["dropped"]
        for record in taken["spans"]:
            if self._tracer is not None and record["traceparent"]:
                self._emit(record)
            if record.get("sampled"):
                self._log_access(record)
        return len(taken["spans"])

    def _log_access(self, record: dict) -> None:
        duration_ms = (record["end_unix_nanos"] - record["start_unix_nanos"]) / 1e6
        extra = {"rpc_method": record["method"], "grpc_code": record["outcome"],
                 "outcome": record["outcome"], "duration_ms": round(duration_ms, 3),
                 "principal": record.get("principal", ""), "deployment": record["deployment"],
                 "served_by": "data-plane", "sample_every": self._sample_every}
        trace_id = _trace_id(record["traceparent"])
        if trace_id:
            extra["trace_id"] = trace_id
        level = logging.INFO if record["outcome"] in ("OK", "CANCELLED") else logging.WARNING
        _access_log.log(level, "rpc %s %s %.2fms", record["method"], record["outcome"],
                        duration_ms, extra=extra)

    def _emit(self, record: dict) -> None:
        caller = W3C_TRACE_CONTEXT.extract({"traceparent": record["traceparent"]})
        if not trace.get_current_span(caller).get_span_context().is_valid:
            return  # a malformed traceparent: no trace to join
        service, _, method = record["method"].strip("/").rpartition("/")
        span = self._tracer.start_span(
            f"{service}/{method}", context=caller, kind=trace.SpanKind.SERVER,
            start_time=record["start_unix_nanos"],
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                        "rpc.grpc.status_code": grpc_status_number(record["outcome"]),
                        "maas.deployment": record["deployment"],
                        "maas.triton_model": record["triton_model"],
                        "maas.served_by": "data-plane"})
        if record["outcome"] != "OK":
            span.set_status(trace.Status(trace.StatusCode.ERROR, record["outcome"]))
        span.end(end_time=record["end_unix_nanos"])

    async def run(self) -> None:
        while True:
            try:
                await self.export()
            except errors.MaasError as exc:  # restarting: its records since then are lost
                _log.debug("no data plane spans this time: %s", exc.message)
            await asyncio.sleep(self._poll_seconds)


def _trace_id(traceparent: str) -> str:
    """The trace id of a W3C traceparent ("00-<trace id>-<span id>-<flags>"), or ""."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def grpc_status_number(code_name: str) -> int:
    """The numeric gRPC status for a code name ("OK" → 0), as OpenTelemetry records it."""
    return code_pb2.Code.Value(code_name) if code_name in code_pb2.Code.keys() else 2
