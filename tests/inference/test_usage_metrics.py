"""Usage metrics and the data plane's usage records (domain, no servers): counters per tenant
with a bounded tenant label (configured tenants, or the first N named by the limits file, the
rest "other"), rejections per limit, and the growth of the data plane's counts turned into
records (a restarted data plane counting from zero again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from maas_inference.dataplane import DataPlaneUsage, route_table
from maas_inference.tenancy import QuotaExceeded, TenancyConfigSource, TenantLimiter
from maas_inference.usage import TenantLabels, UsageMetrics, UsageRecord
from maas_runtime.auth import Principal, Role
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader


def points(reader: InMemoryMetricReader) -> dict[str, dict[tuple, float]]:
    data = reader.get_metrics_data()
    return {metric.name: {tuple(sorted(p.attributes.items())): p.value
                          for p in metric.data.data_points}
            for resource in data.resource_metrics
            for scope in resource.scope_metrics for metric in scope.metrics}


def test_the_tenant_label_is_bounded():
    named = TenantLabels((), lambda: ["zed", "acme", "bob", "carol"], max_tenants=2)
    assert [named.label(t) for t in ("acme", "bob", "carol", "zed", "mallory")] == [
        "acme", "bob", "other", "other", "other"]
    configured = TenantLabels(("carol",), lambda: ["acme"], max_tenants=2)
    assert [configured.label(t) for t in ("carol", "acme")] == ["carol", "other"]


async def test_usage_and_rejections_are_counted_per_bounded_tenant(tmp_path: Path):
    limits = tmp_path / "limits.yaml"
    limits.write_text("default: {requests_per_minute: 1}\ntenants: {acme: {}}\n")
    reader = InMemoryMetricReader()
    metrics = UsageMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"),
                           TenantLabels((), lambda: ["acme"], max_tenants=5))
    limiter = TenantLimiter(TenancyConfigSource(limits), metrics=metrics)
    for name in ("acme", "mallory"):
        async with limiter.admit_request(Principal(name, Role.VIEWER), "digits", rows=4):
            pass
        with pytest.raises(QuotaExceeded):
            async with limiter.admit_request(Principal(name, Role.VIEWER), "digits", rows=4):
                pass
    async with limiter.admit(Principal("eve", Role.VIEWER), "chat", prompt_tokens=7) as lease:
        lease.charge(5)
    seen = points(reader)
    assert seen["maas.inference.usage.rows"] == {
        (("deployment", "digits"), ("tenant", "acme")): 4,
        (("deployment", "digits"), ("tenant", "other")): 4}
    assert seen["maas.inference.usage.tokens"] == {
        (("deployment", "chat"), ("tenant", "other"), ("token", "prompt")): 7,
        (("deployment", "chat"), ("tenant", "other"), ("token", "completion")): 5}
    assert seen["maas.inference.limit.rejections"] == {
        (("limit", "requests_per_minute"), ("tenant", "acme")): 1,
        (("limit", "requests_per_minute"), ("tenant", "other")): 1}
    assert sum(seen["maas.inference.usage.requests"].values()) == 3


class FakeDataPlane:
    """What DataPlaneUsage reads of the data plane: its usage counts and its pid."""

    def __init__(self) -> None:
        self.pid = 100
        self.usage: list[dict[str, Any]] = []

    async def stats(self) -> dict[str, Any]:
        return {"usage": self.usage}


class Ledger:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def append(self, record: UsageRecord) -> None:
        self.records.append(record)


def counts(requests: int, rows: int, principal: str = "alice",
           tenant: str = "") -> dict[str, Any]:
    return {"deployment": "digits", "version": "models/digits/versions/1",
            "principal": principal, "tenant": tenant or principal, "requests": requests,
            "rows": rows}


async def test_the_data_plane_counts_become_records_of_their_growth():
    plane, ledger, clock = FakeDataPlane(), Ledger(), [1000.0]
    usage = DataPlaneUsage(plane, ledger, clock=lambda: clock[0])  # type: ignore[arg-type]
    plane.usage = [counts(3, 12), counts(1, 1, "bob", tenant="acme")]
    clock[0] = 1002.0
    assert await usage.collect() == 2
    plane.usage = [counts(5, 20), counts(1, 1, "bob", tenant="acme")]  # bob idle: no record
    clock[0] = 1003.0
    assert await usage.collect() == 1
    plane.pid, plane.usage = 101, [counts(2, 2)]  # restarted: counting from zero
    assert await usage.collect() == 1
    assert [(r.tenant, r.requests, r.rows, r.kind, r.outcome) for r in ledger.records] == [
        ("alice", 3, 12, "predict", "OK"), ("acme", 1, 1, "predict", "OK"),
        ("alice", 2, 8, "predict", "OK"), ("alice", 2, 2, "predict", "OK")]
    first = ledger.records[0]
    assert (first.start_time.timestamp(), first.duration_seconds) == (1000.0, 2.0)


def test_the_route_table_names_whom_the_data_plane_must_relay():
    table = route_table({}, True, 1, relay=(False, frozenset({"acme", "bob"})))
    assert (table["relay_all"], table["relay_tenants"]) == (False, ["acme", "bob"])
    assert route_table({}, True, 1)["relay_tenants"] == []
