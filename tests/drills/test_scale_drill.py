"""Scale drill on loopback: two replicas of the registry, trainer and inference service, found
through Consul, one of each killed with SIGKILL under load and restarted.

Each service's replicas share one PostgreSQL database (one per service): the registries their
metadata (and one blob directory), the trainers their job table with leases (and one jobs
directory, where checkpoints are), the inference services their deployment table, each
loading what the table says on its own Triton. Every process registers in Consul (a real
agent when `consul` is on PATH, else the stand-in) and the client finds them there: one
`maas.Client` balances its calls over the healthy replicas and sends reads and predictions
that fail UNAVAILABLE again to the next one.

While threads predict, read the registry and upload versions continuously and a training
job runs, the registry replica, the trainer running the job and the inference replica are
killed with SIGKILL. Asserted: no prediction or read failed (after retries; an upload, a
write, may fail UNAVAILABLE or CANCELLED only); the job's lease lapses and the surviving trainer resumes it
from its checkpoint to the end; no model version is lost (every registry replica lists every
acknowledged version with its checksum, the trained one included); and each killed replica,
restarted, is passing in Consul and takes its share of the load again (then carries it alone
while the other gateway is killed in turn).
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
from typing import Any

import maas
import numpy as np
import pytest
from maas.common.v1 import job_pb2
from maas.registry.v1 import model_pb2
from maas.trainer.v1 import trainer_service_pb2_grpc
from maas_runtime.auth import ensure_admin_token
from maas_runtime.client import open_channel
from maas_runtime.discovery import ConsulDiscovery

from tests.support.consul_agent import ConsulUnderTest, any_consul
from tests.support.postgres import POSTGRES_URL_ENV, fresh_postgres_database
from tests.support.processes import ServiceProcess, process_table, process_tree_cpu_seconds
from tests.trainer.helpers import watch_events

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.triton]

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
"""The machine's PostgreSQL (trust auth), as .ci/run sets it."""
MODEL = "drill"
DEPLOYMENT = "drill"
ROWS = {"input": np.random.default_rng(0).random((2, 64)).astype(np.float32)}
DRILL_RETRIES = maas.RetryPolicy(max_attempts=8, initial_backoff_seconds=0.05,
                                 max_backoff_seconds=1.0)
"""Eight attempts over about three seconds: longer than a replica takes to drop out."""
EPOCHS = 60
JOB_LEASE_SECONDS = 3


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
    with (any_consul() as consul, fresh_postgres_database() as registry_db,
          fresh_postgres_database() as trainer_db, fresh_postgres_database() as inference_db):
        root = tmp_path
        ensure_admin_token(root / "admin.token", root / "tokens.json")
        drill = Suite(root, consul)
        # Replicas sharing a blob directory rely on the grace period to keep what another
        # replica is about to record (its own uploads are guarded in-process): not zero here.
        drill.registries = [replica(root, consul, "registry", root / "registry",
                                    database_url=registry_db, gc_grace_seconds="120")
                            for _ in range(2)]
        drill.trainers = [replica(root, consul, "trainer", root / f"trainer-{i}",
                                  worker_slots="1", database_url=trainer_db,
                                  jobs_dir=str(root / "trainer-jobs"), replica_id=f"trainer-{i}",
                                  job_lease_seconds=str(JOB_LEASE_SECONDS))
                          for i in range(2)]
        drill.inferences = [replica(root, consul, "inference", root / f"inference-{i}",
                                    database_url=inference_db)
                            for i in range(2)]
        try:
            started = time.monotonic()
            await asyncio.gather(*(registry.start() for registry in drill.registries))
            await asyncio.gather(*(process.start(timeout=180)
                                   for process in [*drill.trainers, *drill.inferences]))
            print(f"scale drill: six replicas serving after {time.monotonic() - started:.0f} s")
            yield drill
        finally:  # all at once: each may take its shutdown grace
            await asyncio.gather(*(asyncio.to_thread(process.terminate)
                                   for process in drill.processes))


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


class UploadLoad(PredictLoad):
    """One thread registering versions of MODEL (the same TorchScript file) until stopped.
    Uploads are writes, never repeated by the client: one cut by a kill fails UNAVAILABLE or
    CANCELLED (and may or may not have committed); every acknowledged one must stay."""

    def __init__(self, client: maas.Client, model_file: Path,
                 signature: model_pb2.Signature) -> None:
        super().__init__(client, threads=1)
        self._file, self._signature = model_file, signature
        self.acknowledged: dict[str, str] = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._client.upload_model(MODEL, self._file, format="torchscript",
                                                    signature=self._signature)
            except maas.MaasError as error:
                self.failures.append(f"{error.code}: {error.message}")
                continue
            self.acknowledged[version.name] = version.artifact.sha256
            self.answers["uploaded"] += 1
            time.sleep(0.1)


class JobWaiter:
    """`client.wait(job)` on a thread, recording the epoch of each metrics event it passed."""

    def __init__(self, client: maas.Client, job: str) -> None:
        self.epochs_reported: list[int] = []
        self._outcome: list[Any] = []
        self._thread = threading.Thread(target=self._wait, args=(client, job), name="wait")
        self._thread.start()

    def _wait(self, client: maas.Client, job: str) -> None:
        try:
            self._outcome.append(client.wait(job, self._progress))
        except maas.MaasError as error:
            self._outcome.append(error)

    def _progress(self, update: maas.JobProgress) -> None:
        if update.kind == "metrics":
            self.epochs_reported.append(update.epoch)

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if not self._outcome:
            raise AssertionError(f"waiting on the job did not end within {timeout:.0f} s")
        if isinstance(self._outcome[0], maas.MaasError):
            raise self._outcome[0]
        return self._outcome[0]


async def job_events(trainer: ServiceProcess, token: str, job: str) -> list[job_pb2.JobEvent]:
    """Every event of the (final) job, as one trainer replica's Watch replays them."""
    async with open_channel(trainer.target, token=token) as channel:
        return await watch_events(trainer_service_pb2_grpc.TrainerServiceStub(channel), job)


def kill_9(process: ServiceProcess) -> None:
    """SIGKILL the service process alone, as a crash would (its Triton and data plane follow
    through the parent-death signal and stdin's end)."""
    process.kill()


def running_the_job(trainers: list[ServiceProcess]) -> ServiceProcess:
    """The trainer replica whose child process runs the (only) job."""
    parents = {info.parent for info in process_table().values()}
    holding = [trainer for trainer in trainers if trainer.process.pid in parents]
    assert len(holding) == 1, f"{len(holding)} trainers run a job process"
    return holding[0]


def gateway_cpu_seconds(gateway: ServiceProcess) -> float:
    """CPU time of the gateway's process tree: service, data plane, Triton, model stubs."""
    return process_tree_cpu_seconds([gateway.process.pid])


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


def torchscript_file(client: maas.Client, version: str, directory: Path) -> Path:
    """The artifact of `version`, downloaded (and checked against its sha256)."""
    return client.download(version, directory / "model.pt")


def versions_listed(client: maas.Client) -> dict[str, str]:
    return {version.name: version.artifact.sha256 for version in client.list_versions(MODEL)}


async def test_one_replica_of_each_service_killed_under_load_costs_nothing_and_rejoins(
        suite: Suite, tmp_path: Path) -> None:
    drill_started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = time.monotonic() - drill_started
    client = suite.client()
    try:
        uploaded = upload_versions(client, range(4))
        client.deploy(DEPLOYMENT, f"{MODEL}@production", max_batch_size=8)
        for gateway in suite.inferences:  # the other replica follows the shared table
            with suite.replica_client(gateway) as direct:
                wait_for(lambda direct=direct: serves(direct), 120,
                         f"the deployment served by {gateway.target}")
        job = client.train(dataset="builtin:digits", arch="mlp", model="drill-trained",
                           epochs=EPOCHS, alias="latest")
        waiter = JobWaiter(client, job.name)  # follows the job's Watch across the kill
        wait_for(lambda: client.get_job(job.name).epoch >= 1, 120,
                 "the training job finishing its first epoch")

        killed_registry, killed_inference = suite.registries[0], suite.inferences[0]
        model_file = torchscript_file(client, f"{MODEL}@production", tmp_path)
        signature = client.get_version(f"{MODEL}@production").signature
        with (PredictLoad(client) as load, ReadLoad(client) as reads,
              UploadLoad(client, model_file, signature) as uploads):
            wait_for(lambda: load.total >= 30, 30, "predictions flowing")
            phase("kills")
            kill_9(killed_registry)
            time.sleep(1.0)
            killed_trainer = running_the_job(suite.trainers)
            assert client.get_job(job.name).state == job_pb2.JOB_STATE_RUNNING
            kill_9(killed_trainer)
            time.sleep(1.0)
            kill_9(killed_inference)
            before_restart = load.total
            wait_for(lambda: load.total >= before_restart + 60, 60,
                     "predictions flowing on the surviving gateway")
            await wait_healthy_in_consul(suite.consul, killed_inference, present=False)
            phase("restarts")
            await asyncio.gather(*(process.start(timeout=180) for process in (
                killed_registry, killed_trainer, killed_inference)))
            phase("restarted")
            for process in (killed_registry, killed_trainer, killed_inference):
                await wait_healthy_in_consul(suite.consul, process)
            # The restarted gateway takes its share of the load again.
            surviving = suite.inferences[1]
            cpu_before = gateway_cpu_seconds(killed_inference), gateway_cpu_seconds(surviving)
            rejoined = load.total
            wait_for(lambda: load.total >= rejoined + 1500, 60,
                     "predictions flowing after the rejoin")
            rejoined_cpu = gateway_cpu_seconds(killed_inference) - cpu_before[0]
            surviving_cpu = gateway_cpu_seconds(surviving) - cpu_before[1]
            # Then the other gateway goes: the rejoined one carries the whole load alone.
            kill_9(surviving)
            alone = load.total
            wait_for(lambda: load.total >= alone + 600, 60,
                     "predictions flowing on the rejoined gateway alone")
            await surviving.start(timeout=180)
            await wait_healthy_in_consul(suite.consul, surviving)
        assert load.failures == [], load.failures[:5]
        assert reads.failures == [], reads.failures[:5]
        assert reads.total > 0
        assert uploads.total > 0 and all(f.startswith(("UNAVAILABLE", "CANCELLED"))
                                         for f in uploads.failures), uploads.failures[:5]
        assert rejoined_cpu >= 0.25 * surviving_cpu, (rejoined_cpu, surviving_cpu)

        # The job's lease lapsed; the surviving trainer resumed it from its checkpoint, and
        # the client waiting on it followed its Watch over to that trainer.
        final = waiter.result(timeout=180)
        phase("job done")
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
        assert (final.epoch, final.resume_count >= 1) == (EPOCHS, True)
        # Every metrics event the job has, once each, reached the waiting client (a run
        # killed between its checkpoint and its report leaves that epoch's report out).
        recorded = [event.metrics.epoch for event in await job_events(
            suite.trainers[1], suite.token, job.name) if event.WhichOneof("kind") == "metrics"]
        assert waiter.epochs_reported == recorded and recorded[-1] == EPOCHS

        # Every replica serves again: each gateway from its own Triton, each registry with
        # every version (and its checksum), each trainer the shared job table.
        for gateway in suite.inferences:
            with suite.replica_client(gateway) as direct:
                assert serves(direct)
        # Acknowledged versions all stay; an upload cut by the kill may have committed
        # (its reply lost) or not, never half: at most one version more per failed upload.
        uploaded |= uploads.acknowledged | upload_versions(client, range(4, 6))
        for registry in suite.registries:
            with suite.replica_client(registry) as direct:
                listed = versions_listed(direct)
                assert {name: listed.get(name) for name in uploaded} == uploaded
                assert len(listed) - len(uploaded) <= len(uploads.failures)
                assert direct.get_version(final.model_version).name == final.model_version
        for trainer in suite.trainers:
            with suite.replica_client(trainer) as direct:
                assert [listed.name for listed in direct.list_jobs("training")] == [job.name]
    finally:
        client.close()
    print(f"scale drill: {time.monotonic() - drill_started:.0f} s after start-up "
          f"({', '.join(f'{name} at {at:.0f} s' for name, at in phases.items())}); "
          f"{load.total} predictions, 0 failed; {reads.total} registry reads; "
          f"{uploads.total} uploads acknowledged, {len(uploads.failures)} cut; job resumed "
          f"{final.resume_count}x; CPU s after the rejoin {rejoined_cpu:.1f} (restarted "
          f"gateway) vs {surviving_cpu:.1f}")


def serves(direct: maas.Client) -> bool:
    """Whether that gateway answers the deployment with a batch of logits."""
    try:
        outputs = direct.predict(DEPLOYMENT, ROWS)
    except (maas.NotFound, maas.Unavailable, maas.FailedPrecondition):
        return False
    return [output.shape for output in outputs.values()] == [(2, 10)]
