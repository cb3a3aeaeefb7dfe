"""The Kubernetes launcher through the official `kubernetes` client, against a stand-in API
server on loopback (no cluster is reachable here).

The stand-in answers the REST calls the launcher makes (create, delete, read status, list pods,
follow a pod's log) the way the API server does, and records them; so these tests check the
requests the real client sends for our manifests: the paths, the bodies, the delete
propagation, the log streaming, and that the job's conditions decide its outcome.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client
from maas_jobs.executor import LaunchSpec
from maas_jobs.kubernetes_executor import (
    ClientApi,
    KubernetesExecutorSettings,
    KubernetesJobLauncher,
)
from maas_jobs.progress import PROGRESS_PREFIX
from maas_jobs.records import LogLevel

from tests.jobs.test_kubernetes_executor import NAMESPACE, RecordingSink, job_record

IMAGE = "ghcr.io/maas/trainer:1.0.0"


class StandInApiServer:
    """Objects by (collection path, name); pods of created Jobs run and print `log_lines`."""

    def __init__(self, log_lines: list[str], final_condition: str = "Complete") -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        self.log_lines = log_lines
        self.final_condition = final_condition
        self.status_reads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> dict[str, Any] | None:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _send(self, status: int, document: Any, content_type: str = "application/json") -> None:
                payload = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self._body()
                server.requests.append(("POST", self.path, body))
                assert body is not None
                key = (urlparse(self.path).path, body["metadata"]["name"])
                if key in server.objects:
                    self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
                    return
                server.objects[key] = body
                self._send(201, body)

            def do_DELETE(self) -> None:  # noqa: N802
                body = self._body()
                server.requests.append(("DELETE", self.path, body))
                url = urlparse(self.path)
                selector = parse_qs(url.query).get("labelSelector")
                if selector:  # deletecollection
                    wanted = dict(part.split("=") for part in selector[0].split(","))
                    for key, found in list(server.objects.items()):
                        if key[0] == url.path and wanted.items() <= found["metadata"]["labels"].items():
                            del server.objects[key]
                    self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                    return
                collection, _, name = url.path.rpartition("/")
                if server.objects.pop((collection, name), None) is None:
                    self._send(404, {"kind": "Status", "apiVersion": "v1", "code": 404,
                                     "reason": "NotFound"})
                    return
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(("GET", self.path, None))
                url = urlparse(self.path)
                if url.path.endswith("/status"):
                    collection, _, name = url.path.removesuffix("/status").rpartition("/")
                    found = server.objects.get((collection, name))
                    if found is None:
                        self._send(404, {"kind": "Status", "apiVersion": "v1", "code": 404,
                                         "reason": "NotFound"})
                        return
                    server.status_reads += 1
                    conditions = [{"type": server.final_condition, "status": "True"}]
                    self._send(200, {**found, "status": {"conditions": conditions}})
                elif url.path.endswith("/log"):
                    text = "".join(line + "\n" for line in server.log_lines).encode()
                    self._send(200, text, "text/plain")
                elif url.path == f"/api/v1/namespaces/{NAMESPACE}/pods":
                    selector = parse_qs(url.query)["labelSelector"][0]
                    job_name = dict(part.split("=") for part in selector.split(","))["job-name"]
                    pod = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": f"{job_name}-0-abcde", "namespace": NAMESPACE,
                                        "creationTimestamp": "2026-01-01T00:00:00Z"},
                           "status": {"phase": "Running"}}
                    self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                                     "items": [pod]})
                else:
                    self._send(404, {"kind": "Status", "apiVersion": "v1", "code": 404})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture
def api_server() -> Iterator[StandInApiServer]:
    metrics = PROGRESS_PREFIX + json.dumps({"type": "metrics", "epoch": 1, "phase": "train",
                                            "values": {"loss": 0.75}})
    server = StandInApiServer(["warming up", metrics])
    server.thread.start()
    yield server
    server.http.shutdown()
    server.http.server_close()


def _launcher(server: StandInApiServer) -> KubernetesJobLauncher:
    configuration = client.Configuration()
    configuration.host = server.url
    settings = KubernetesExecutorSettings(job_executor="kubernetes", kubernetes_job_image=IMAGE,
                                          kubernetes_work_claim="maas-trainer-state",
                                          kubernetes_poll_seconds=0.01)
    return KubernetesJobLauncher(service="trainer", settings=settings, namespace=NAMESPACE,
                                 state_dir=Path("/var/lib/maas"), run_as=10001,
                                 api_factory=lambda: ClientApi(client.ApiClient(configuration)))


def _launch(tmp_path: Path, workers: int) -> LaunchSpec:
    workdir = Path("/var/lib/maas/jobs/j-42")
    argv = ["/opt/venv/bin/python", "-m", "maas_trainer.job_process", str(workdir)]
    if workers > 1:
        argv = ["/opt/venv/bin/python", "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={workers}", "-m", "maas_trainer.job_process", str(workdir)]
    return LaunchSpec(argv=argv, cwd=workdir, log_path=tmp_path / "job.log")


async def test_an_indexed_job_goes_through_the_real_client_and_succeeds(api_server, tmp_path):
    started = await _launcher(api_server).start(job_record(workers=2), _launch(tmp_path, 2))
    name = started.rendered.name
    jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    services = f"/api/v1/namespaces/{NAMESPACE}/services"
    posts = [(path, body["kind"]) for method, path, body in api_server.requests
             if method == "POST" and body]
    assert posts == [(services, "Service"), (jobs, "Job")]
    assert api_server.objects[(jobs, name)]["spec"]["completionMode"] == "Indexed"

    sink = RecordingSink()
    outcome = await asyncio.wait_for(started.wait_and_forward(sink), 10)
    assert outcome.succeeded
    assert sink.metric_reports == [(1, "train", {"loss": 0.75})]
    assert sink.logs == [(LogLevel.INFO, "warming up")]
    # The lead pod was found by the Indexed Job's completion index, its log followed.
    pod_lists = [path for method, path, _ in api_server.requests if path.startswith(
        f"/api/v1/namespaces/{NAMESPACE}/pods?")]
    assert "job-completion-index%3D0" in pod_lists[0]
    assert any(path.startswith(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}-0-abcde/log")
               and "follow=true" in path for _, path, _ in api_server.requests)


async def test_stop_deletes_with_foreground_propagation(api_server, tmp_path):
    api_server.final_condition = "Running"  # never finishes by itself
    started = await _launcher(api_server).start(job_record(), _launch(tmp_path, 1))
    await started.stop(grace_seconds=1)
    deletes = [urlparse(path) for method, path, _ in api_server.requests if method == "DELETE"]
    jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    services = f"/api/v1/namespaces/{NAMESPACE}/services"
    # Before creating: every earlier attempt's Jobs and Services, by the job's labels; to stop:
    # this attempt's Job by name. Pods go with their Job (Foreground).
    assert [url.path for url in deletes] == [jobs, services, f"{jobs}/{started.rendered.name}"]
    assert "maas.io/job-id=j-42" in parse_qs(deletes[0].query)["labelSelector"][0]
    assert parse_qs(deletes[0].query)["propagationPolicy"] == ["Foreground"]
    assert parse_qs(deletes[-1].query)["propagationPolicy"] == ["Foreground"]
    assert api_server.objects == {}


async def test_a_failed_condition_fails_the_job(api_server, tmp_path):
    api_server.final_condition = "Failed"
    started = await _launcher(api_server).start(job_record(), _launch(tmp_path, 1))
    outcome = await asyncio.wait_for(started.wait_and_forward(RecordingSink()), 10)
    assert not outcome.succeeded and outcome.returncode == 1 and not outcome.stopped
