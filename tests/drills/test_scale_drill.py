"""Scale drill on loopback: two replicas of the registry, trainer and inference service, found
through Consul, one of each killed with SIGKILL under load and restarted.

The registries share one PostgreSQL database and one blob directory; each inference service
runs its own Triton; every process registers in Consul (a real agent when `consul` is on
PATH, else the stand-in) and the client finds them there. One `maas.Client` balances its calls
over the healthy replicas and sends reads and predictions that fail UNAVAILABLE again to the
next one. While threads predict continuously and a training job runs, one registry, one
trainer and one inference service are killed with SIGKILL. Asserted: no prediction failed
(after retries), the training job finished, no model version is lost (every replica lists
every version with its checksum), and each killed replica, restarted, is healthy in Consul and
serves again.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import maas
import numpy as np
import pytest
from maas.common.v1 import job_pb2
from maas_runtime.auth import ensure_admin_token
from maas_runtime.discovery import ConsulDiscovery

from tests.registry.helpers import fresh_postgres_database
from tests.support.consul_agent import ConsulUnderTest, any_consul
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.triton]

POSTGRES_URL_ENV = "MAAS_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
"""The machine's PostgreSQL (trust auth), as .ci/run sets it."""
MODEL = "drill"
DEPLOYMENT = "drill"
ROWS = {"input": np.random.default_rng(0).random((2, 64)).astype(np.float32)}
DRILL_RETRIES = maas.RetryPolicy(max_attempts=8, initial_backoff_seconds=0.05,
                                 max_backoff_seconds=1.0)
"""Eight attempts over about three seconds: longer than a replica takes to drop out."""


@dataclass
class Suite:
    """Two replicas of each service under `root`, registered in one Consul."""

    root: Path
    consul: ConsulUnderTest
    registries: list[ServiceProcess] = field(default_factory=list)
    trainers: list[ServiceProcess] = field(default_factory=list)
    inferences: list[ServiceProcess] = field(default_factory=list)

    @property
    def token(self) -> str:
        return (self.root / "admin.token").read_text().strip()

    @property
    def processes(self) -> list[ServiceProcess]:
        return [*self.registries, *self.trainers, *self.inferences]

    def client(self, **where) -> maas.Client:
        """Through Consul unless `where` names targets; retries as the drill needs."""
        if not where:
            where = {"consul": self.consul.http_address}
        return maas.Client(token=self.token, retry=DRILL_RETRIES, timeout=30, **where)

    def replica_client(self, process: ServiceProcess) -> maas.Client:
        """Only that replica (and, for its registry reads, the balanced registries)."""
        return self.client(targets={process.name: process.target})


def replica(suite_root: Path, consul: ConsulUnderTest, name: str, state_dir: Path,
            **settings: str) -> ServiceProcess:
    """A service process sharing the suite's tokens, registered in Consul, finding its peers
    there."""
    process = ServiceProcess(name, state_dir, tokens_file=str(suite_root / "tokens.json"),
                             admin_token_file=str(suite_root / "admin.token"), **settings)
    process.base_env = {key: value for key, value in os.environ.items()
                        if key not in ("MAAS_STATIC_ENDPOINTS", "MAAS_TARGET")}
    process.base_env["CONSUL_HTTP_ADDR"] = consul.http_address
    return process


@pytest.fixture
async def suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Suite]:
    monkeypatch.setenv(POSTGRES_URL_ENV, os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL))
    with any_consul() as consul, fresh_postgres_database() as registry_db:
        root = tmp_path
        ensure_admin_token(root / "admin.token", root / "tokens.json")
        drill = Suite(root, consul)
        drill.registries = [replica(root, consul, "registry", root / "registry",
                                    database_url=registry_db, gc_grace_seconds="0")
                            for _ in range(2)]
        drill.trainers = [replica(root, consul, "trainer", root / f"trainer-{i}",
                                  worker_slots="1")
                          for i in range(2)]
        drill.inferences = [replica(root, consul, "inference", root / f"inference-{i}")
                            for i in range(2)]
        try:
            await asyncio.gather(*(registry.start() for registry in drill.registries))
            await asyncio.gather(*(process.start(timeout=180)
                                   for process in [*drill.trainers, *drill.inferences]))
            yield drill
        finally:
            for process in drill.processes:
                process.terminate()


class PredictLoad:
    """Threads predicting through one balanced client until stopped; every outcome counted."""

    def __init__(self, client: maas.Client, threads: int = 3) -> None:
        self._client = client
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"predict-{i}")
                         for i in range(threads)]
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                reply = self._client.predict_detailed(DEPLOYMENT, ROWS)
            except maas.MaasError as error:
                self.failures.append(f"{error.code}: {error.message}")
                continue
            self.latencies.append(time.perf_counter() - started)
            self.answers[reply.model_version] += 1

    def __enter__(self) -> PredictLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def total(self) -> int:
        return sum(self.answers.values())


class ReadLoad(PredictLoad):
    """One thread reading the registry (a version by alias, the version list) until stopped."""

    def __init__(self, client: maas.Client) -> None:
        super().__init__(client, threads=1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.list_versions(MODEL)
                self.answers[self._client.get_version(f"{MODEL}@production").name] += 1
            except maas.MaasError as error:
                self.failures.append(f"{error.code}: {error.message}")
            time.sleep(0.05)


def kill_9(process: ServiceProcess) -> None:
    """SIGKILL the service process alone, as a crash would (its Triton and data plane follow
    through the parent-death signal and stdin's end)."""
    process.kill()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f} s: {what}")
        time.sleep(0.2)


async def healthy_in_consul(consul: ConsulUnderTest, service: str) -> set[str]:
    async with ConsulDiscovery(consul.http_address) as discovery:
        return {endpoint.address for endpoint in await discovery.resolve(service)}


async def wait_healthy_in_consul(consul: ConsulUnderTest, process: ServiceProcess,
                                 present: bool = True) -> None:
    deadline = time.monotonic() + consul.settle_seconds + 10
    while (process.target in await healthy_in_consul(consul, process.name)) != present:
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.name} at {process.target} is "
                                 f"{'not ' if present else ''}passing in Consul")
        await asyncio.sleep(0.2)


def upload_versions(client: maas.Client, seeds: range) -> dict[str, str]:
    """One TorchScript version per seed (a 64-16-10 MLP); version name → sha256."""
    import torch

    uploaded = {}
    for seed in seeds:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 10)).eval()
        version = client.upload_module(MODEL, net, torch.from_numpy(ROWS["input"]),
                                       alias="production" if seed == 0 else "")
        uploaded[version.name] = version.artifact.sha256
    return uploaded


def versions_listed(client: maas.Client) -> dict[str, str]:
    return {version.name: version.artifact.sha256 for version in client.list_versions(MODEL)}


async def test_one_replica_of_each_service_killed_under_load_costs_nothing_and_rejoins(
        suite: Suite, tmp_path: Path) -> None:
    drill_started = time.monotonic()
    client = suite.client()
    try:
        uploaded = upload_versions(client, range(4))
        for inference in suite.inferences:  # each replica keeps its own deployment table
            with suite.replica_client(inference) as direct:
                direct.deploy(DEPLOYMENT, f"{MODEL}@production", max_batch_size=8)
        job_trainer, spare_trainer = suite.trainers
        with suite.replica_client(job_trainer) as trainer_client:
            job = trainer_client.train(dataset="builtin:digits", arch="mlp", model="drill-trained",
                                       epochs=40, alias="latest")
            wait_for(lambda: trainer_client.get_job(job.name).epoch >= 1, 120,
                     "the training job finishing its first epoch")

            killed_registry, killed_inference = suite.registries[0], suite.inferences[0]
            with PredictLoad(client) as load, ReadLoad(client) as reads:
                wait_for(lambda: load.total >= 30, 30, "predictions flowing")
                kill_9(killed_registry)
                time.sleep(1.0)
                kill_9(spare_trainer)
                time.sleep(1.0)
                kill_9(killed_inference)
                before_restart = load.total
                wait_for(lambda: load.total >= before_restart + 60, 60,
                         "predictions flowing on the surviving gateway")
                await wait_healthy_in_consul(suite.consul, killed_inference, present=False)
                for process in (killed_registry, spare_trainer, killed_inference):
                    await process.start(timeout=180)
                for process in (killed_registry, spare_trainer, killed_inference):
                    await wait_healthy_in_consul(suite.consul, process)
                rejoined = load.total
                wait_for(lambda: load.total >= rejoined + 60, 60,
                         "predictions flowing after the rejoin")
            assert load.failures == [], load.failures[:5]
            assert reads.failures == [], reads.failures[:5]
            assert reads.total > 0

            wait_for(lambda: trainer_client.get_job(job.name).state in (
                job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED,
                job_pb2.JOB_STATE_CANCELLED), 180, "the training job finishing")
            final = trainer_client.get_job(job.name)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
            assert final.epoch == 40

        # Every replica serves again: the restarted gateway from its own Triton, the restarted
        # registry with every version (and its checksum), the restarted trainer its jobs.
        with suite.replica_client(killed_inference) as direct:
            assert [output.shape for output in direct.predict(DEPLOYMENT, ROWS).values()] == [
                (2, 10)]
        uploaded |= upload_versions(client, range(4, 6))
        for registry in suite.registries:
            with suite.replica_client(registry) as direct:
                assert versions_listed(direct) == uploaded
                assert direct.get_version(final.model_version).name == final.model_version
        with suite.replica_client(spare_trainer) as direct:
            assert direct.list_jobs("training") == []  # its own (empty) table, serving
    finally:
        client.close()
    print(f"scale drill: {time.monotonic() - drill_started:.0f} s after start-up; "
          f"{load.total} predictions, 0 failed; {reads.total} registry reads")
