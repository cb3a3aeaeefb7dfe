"""A real Prometheus scraping the suite as `maas up` runs it, after some traffic.

Debian's `prometheus` binary runs with its own config and storage in tmp_path, scraping every
service's metrics port each second. A tiny training job, a deployment, Predicts through the
native data plane and a few registry calls later, its HTTP API must hold every series the
README promises, with values that agree with the traffic sent. The same scrape feeds the
dashboard check: every metric its PromQL names is one the services export.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from maas.registry.v1 import registry_service_pb2 as rs
from maas_cli.local_suite import LocalSuite, free_port

from tests.support import suite_flow

pytestmark = [pytest.mark.triton, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus (Debian package) missing")]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "helm" / "maas" / "files" / "maas-dashboard.json"
SERVICES = ("registry", "trainer", "compressor", "inference")
PREDICTS = 12
REGISTRY_GETS = 3


def start_prometheus(tmp_path: Path, suite: LocalSuite) -> tuple[subprocess.Popen, str]:
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [
                  {"job_name": name, "static_configs": [{"targets": [
                      urllib.parse.urlparse(service.metrics_url).netloc]}]}
                  for name, service in suite.services.items()]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    return process, f"http://127.0.0.1:{port}"


def query(prometheus: str, expression: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]
    except OSError:
        return []  # not up yet


def value(result: list[dict]) -> float:
    return sum(float(sample["value"][1]) for sample in result)


async def eventually(prometheus: str, expression: str, at_least: float,
                     timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    seen = 0.0
    while time.monotonic() < deadline:
        seen = value(query(prometheus, expression))
        if seen >= at_least:
            return seen
        await asyncio.sleep(0.5)
    raise AssertionError(f"{expression} stayed at {seen}, wanted >= {at_least}")


async def data_plane_access_lines(log_file: Path, timeout: float = 30) -> list[dict]:
    """The access log lines of requests the data plane served, once there are any."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in log_file.read_text().splitlines()
                 if '"served_by": "data-plane"' in line]
        if lines or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.5)


def exported_metric_names(prometheus: str) -> set[str]:
    with urllib.request.urlopen(f"{prometheus}/api/v1/label/__name__/values", timeout=5) as r:
        return set(json.loads(r.read())["data"])


async def test_prometheus_scrapes_every_series_after_traffic(tmp_path):
    fast = {"triton_metrics_poll_seconds": "0.5", "access_log_sample_every": "1"}
    suite = LocalSuite(tmp_path / "suite", fixed_ports=False,
                       settings={"registry": {"storage_metrics_poll_seconds": "0.5"},
                                 "inference": fast})
    await suite.start()
    prometheus, api = start_prometheus(tmp_path, suite)
    channels = [suite.open_channel(name) for name in ("registry", "trainer", "inference")]
    try:
        stubs = suite_flow.SuiteStubs(*channels)
        await suite_flow.train_and_register(stubs, "digits")
        deployment = await suite_flow.deploy(stubs, "digits")
        for _ in range(PREDICTS):
            await suite_flow.predict(stubs, deployment.name)
        for _ in range(REGISTRY_GETS):
            await stubs.registry.GetModelVersion(rs.GetModelVersionRequest(
                name="models/digits@production"))

        # Every service is scraped.
        assert await eventually(api, 'sum(up{job=~"registry|trainer|compressor|inference"})',
                                len(SERVICES)) == len(SERVICES)
        # Per-RPC counts with outcome, at least what was sent.
        gets = ('maas_rpc_server_requests_total{service="registry",'
                'rpc_method="/maas.registry.v1.RegistryService/GetModelVersion",'
                'rpc_grpc_status_code="OK"}')
        assert await eventually(api, gets, REGISTRY_GETS) >= REGISTRY_GETS
        # Latency buckets are cumulative: never decreasing in `le`, ending at the count.
        buckets = query(api, 'maas_rpc_server_duration_milliseconds_bucket{service="registry",'
                             'rpc_method="/maas.registry.v1.RegistryService/GetModelVersion"}')
        counts = [float(b["value"][1]) for b in sorted(
            buckets, key=lambda b: float(b["metric"]["le"].replace("+Inf", "inf")))]
        assert len(counts) > 2 and counts == sorted(counts) and counts[-1] >= REGISTRY_GETS
        # Predicts served by the data plane, counted and timed per deployment.
        served = ('maas_inference_dataplane_requests_total{deployment="digits",'
                  'outcome="served"}')
        declined = 'maas_inference_dataplane_requests_total{deployment="digits",outcome="declined"}'
        # The data plane's counts reach the service at its next stats poll: wait for all of them.
        handled = f'sum({served}) + sum({declined})'
        assert await eventually(api, handled, PREDICTS) >= PREDICTS
        assert value(query(api, served)) > 0
        timed = await eventually(api, 'maas_inference_dataplane_duration_milliseconds_count'
                                      '{deployment="digits"}', 1)
        assert timed == value(query(api, served))
        # Triton's own series, re-exported under the deployment's name.
        triton_ok = await eventually(
            api, 'sum(maas_triton_inference_request_success_total{deployment="digits"})', 1)
        assert triton_ok >= 1
        assert value(query(api, "maas_inference_triton_ready")) == 1
        # Jobs: the training job succeeded, nothing waits.
        assert await eventually(api, 'maas_jobs{kind="trainingJobs",state="SUCCEEDED"}', 1) == 1
        assert value(query(api, 'maas_jobs_queue_depth{kind="trainingJobs"}')) == 0
        assert query(api, 'maas_jobs_queue_depth{kind="compressionJobs"}')
        # Registry storage: the trained artifact is stored; it was uploaded and downloaded.
        assert await eventually(api, "maas_registry_blob_stored_bytes", 1) > 0
        assert value(query(api, "maas_registry_upload_bytes_total")) > 0
        assert value(query(api, "maas_registry_download_bytes_total")) > 0
        assert 0 < value(query(api, "maas_registry_disk_free_bytes")) <= value(
            query(api, "maas_registry_disk_size_bytes"))

        # The dashboard names only metrics the suite exports.
        exported = exported_metric_names(api)
        used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
        assert used and used <= exported, used - exported

        # The data plane's served requests reach the access log (sampled 1 in 1 here) at the
        # inference service's next poll of the data plane's records: wait for them.
        lines = await data_plane_access_lines(suite.services["inference"].log_file)
        assert lines and {line["deployment"] for line in lines} == {"digits"}
        assert {line["principal"] for line in lines} == {"admin"}
    finally:
        for channel in channels:
            await channel.close()
        prometheus.terminate()
        prometheus.wait(10)
        await suite.stop()


_METRIC = re.compile(r"\b(maas_[a-z0-9_]+|up)\b")


def dashboard_metric_names(dashboard: dict) -> set[str]:
    """Metric names (maas_*, up) in every PromQL expression of the dashboard's panels, with
    histogram suffixes kept as Prometheus stores them (_bucket, _count, _sum)."""
    expressions = [target["expr"] for panel in dashboard["panels"]
                   for target in panel.get("targets", [])]
    return {name for expression in expressions for name in _METRIC.findall(expression)}
