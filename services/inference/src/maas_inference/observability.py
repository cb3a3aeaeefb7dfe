"""The inference service's own series: Triton readiness, whether this replica serves each
deployment, shadow agreement, and Triton's metrics re-exported per deployment.

Triton labels its series by Triton model (`digits.digits.v3`), a name only this service can
map back to what users know. `TritonMetricsCollector` fetches Triton's Prometheus text every
`poll_seconds` and gives each `nv_*` family to this service's `/metrics` as `maas_triton_*`
with `deployment`, `version` and `triton_model` labels taken from the live routes (a
canary's two versions, a shadow's too). Nothing here imports grpc.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Callable, Mapping

from maas_runtime import contract_enums
from opentelemetry.metrics import Observation

from maas_inference.routing import Route

_log = logging.getLogger(__name__)

TRITON_PREFIX = "nv_"
REEXPORT_PREFIX = "maas_triton_"


def register_inference_metrics(meter, triton_ready: Callable[[], bool],
                               shadow_stats: Callable[[], Mapping],
                               replica_loads: Callable[[], Mapping] = dict) -> None:
    """Observable series read at collection time: `maas.inference.triton.ready` (1/0),
    `maas.inference.deployment.replica_ready` (1 while this replica serves what the
    deployment's record holds, 0 while its own load failed or waits; labelled with that
    state, e.g. DEPLOYMENT_STATE_FAILED) and per-deployment shadow comparisons
    (`maas.inference.shadow.comparisons` by outcome compared/agreed/error, so agreement =
    agreed / compared)."""

    def observe_replica_loads(_options) -> list[Observation]:
        return [Observation(1 if load.state == contract_enums.DEPLOYMENT_STATE_READY else 0,
                            {"deployment": deployment, "state": load.state})
                for deployment, load in replica_loads().items()]

    def observe_ready(_options) -> list[Observation]:
        return [Observation(1 if triton_ready() else 0)]

    def observe_shadow(_options) -> list[Observation]:
        return [Observation(value, {"deployment": deployment, "outcome": outcome})
                for deployment, stats in shadow_stats().items()
                for outcome, value in (("compared", stats.compared),
                                       ("agreed", stats.argmax_agreed),
                                       ("error", stats.errors))]

    meter.create_observable_gauge(
        "maas.inference.triton.ready", callbacks=[observe_ready],
        description="1 while the Triton this service drives is ready, else 0")
    meter.create_observable_gauge(
        "maas.inference.deployment.replica_ready", callbacks=[observe_replica_loads],
        description="1 while this replica serves the deployment as recorded, else 0")
    meter.create_observable_counter(
        "maas.inference.shadow.comparisons", callbacks=[observe_shadow], unit="{request}",
        description="shadow comparisons per deployment: compared, argmax agreed, errors")


def triton_model_owners(routes: Mapping[str, Route]) -> dict[str, tuple[str, str]]:
    """Triton model name → (deployment id, registry version) over every target and shadow."""
    owners: dict[str, tuple[str, str]] = {}
    for deployment_id, route in routes.items():
        served = [model for model, _percent in route.targets]
        if route.shadow is not None:
            served.append(route.shadow)
        for model in served:
            owners[model.triton_model] = (deployment_id, model.version)
    return owners


class TritonMetricsCollector:
    """A `prometheus_client` collector re-exporting Triton's series per deployment."""

    def __init__(self, metrics_url: Callable[[], str], routes: Callable[[], Mapping[str, Route]],
                 poll_seconds: float = 5.0, timeout_seconds: float = 2.0):
        self._metrics_url = metrics_url
        self._routes = routes
        self._poll_seconds = poll_seconds
        self._timeout = timeout_seconds
        self._text = ""
        self.scrape_ok = False
        """Whether the last fetch of Triton's metrics succeeded."""

    async def refresh(self) -> None:
        url = self._metrics_url()
        if not url:
            return
        try:
            self._text = await asyncio.to_thread(self._fetch, url)
            self.scrape_ok = True
        except OSError as exc:  # restarting or unreachable: report it, keep the last values
            self.scrape_ok = False
            _log.debug("no Triton metrics from %s: %s", url, exc)

    def _fetch(self, url: str) -> str:
        with urllib.request.urlopen(url, timeout=self._timeout) as response:  # noqa: S310
            return response.read().decode()

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._poll_seconds)

    def describe(self) -> list:
        return []  # families are known only after the first fetch

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        up = GaugeMetricFamily(f"{REEXPORT_PREFIX}scrape_ok",
                               "1 when the last fetch of Triton's own metrics succeeded")
        up.add_metric([], 1.0 if self.scrape_ok else 0.0)
        yield up
        owners = triton_model_owners(self._routes())
        for family in text_string_to_metric_families(self._text):
            if not family.name.startswith(TRITON_PREFIX):
                continue
            name = REEXPORT_PREFIX + family.name.removeprefix(TRITON_PREFIX)
            renamed = Metric(name, family.documentation, family.type)
            for sample in family.samples:
                labels = dict(sample.labels)
                triton_model = labels.pop("model", "")
                labels.pop("version", None)
                if triton_model:
                    deployment, version = owners.get(triton_model, ("", ""))
                    labels.update(deployment=deployment, version=version,
                                  triton_model=triton_model)
                renamed.add_sample(REEXPORT_PREFIX + sample.name.removeprefix(TRITON_PREFIX),
                                   labels, sample.value)
            yield renamed
