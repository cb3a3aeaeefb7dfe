"""The deployment table shared by inference replicas: the store on SQLite and PostgreSQL, its
migrations, the follower that makes every replica hear of another's change (LISTEN/NOTIFY)
and reconcile its live routes through the controller, and two controllers on one PostgreSQL
table, each with its own real tritonserver and the real registry: what one creates the other
loads, and what one replica fails to load stays that replica's own state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import sqlalchemy
import torch
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.controller import (
    DeploymentController,
    LeasePolicy,
    ReplicaLoad,
    ServingDefaults,
)
from maas_inference.observability import register_inference_metrics
from maas_inference.replicas import DeploymentFollower, serving_fingerprint
from maas_inference.routing import RouteTable
from maas_inference.store import VERSION_TABLE, SqlDeploymentStore
from maas_inference.triton import RawTensor, TritonClient, TritonServerProcess
from maas_inference.triton.model_repository import ModelRepository
from maas_runtime.auth import ANONYMOUS_ADMIN
from maas_runtime.client import open_channel
from maas_runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from maas_runtime.pagination import PageTokenCodec
from maas_runtime.peers import PeerChannel
from maas_runtime.registry_client import RegistryClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.inference.servers import triton_process_config
from tests.registry.helpers import model_upload_requests
from tests.support.postgres import (
    backend_url_fixture,
    database_schema,
    postgres_url_fixture,
    run_together,
)
from tests.support.registry_server import registry_in_process

table_url = backend_url_fixture("deployments.db")
postgres_url = postgres_url_fixture()


def _record(deployment_id: str, version: int, state: str = "DEPLOYMENT_STATE_READY",
            batch: int = 8) -> dict:
    name = f"models/digits/versions/{version}"
    return {"name": f"deployments/{deployment_id}", "model": "models/digits@prod",
            "track_alias": False, "traffic": [], "shadow": None,
            "serving": {"max_batch_size": batch}, "state": state, "message": "",
            "serving_versions": [name], "resolved": {"models/digits@prod": name},
            "etag": f"e{version}{state}{batch}"}


def _until_lapsed(store, deployment_id: str) -> None:
    """Waits (up to 30 s) until `deployment_id`'s lease is the only lapsed one."""
    deadline = time.monotonic() + 30
    while store.lapsed_leases() != [deployment_id]:
        assert time.monotonic() < deadline, store.lapsed_leases()
        time.sleep(0.05)


def _one_of_four_takes_over(stores, deployment_id: str) -> tuple[int, object]:
    """Four replicas race to take over `deployment_id`'s lapsed lease: exactly one wins;
    returns its number and its takeover."""
    taken: dict[int, object] = {}
    run_together(lambda number: taken.__setitem__(
        number, stores[number].take_over(deployment_id, f"replica-{number}", 30)), 4)
    winners = {number: result for number, result in taken.items() if result is not None}
    assert len(taken) == 4 and len(winners) == 1, taken
    (winner, takeover), = winners.items()
    return winner, takeover


def test_the_store_keeps_records_on_both_backends(table_url):
    store = SqlDeploymentStore.open(table_url)
    try:
        store.create("b", _record("b", 1))
        store.create("a", _record("a", 1))
        with pytest.raises(AlreadyExists):
            store.create("a", _record("a", 2))
        store.put("a", _record("a", 2))
        assert store.get("a")["serving_versions"] == ["models/digits/versions/2"]
        assert [deployment_id for deployment_id, _ in store.list("", 10)] == ["a", "b"]
        assert [deployment_id for deployment_id, _ in store.list("a", 10)] == ["b"]
        store.delete("a")
        with pytest.raises(NotFound):
            store.get("a")
        assert store.shared is table_url.startswith("postgresql")
    finally:
        store.close()


def test_a_change_conditional_on_the_etag_read_is_made_by_exactly_one_writer(table_url):
    """Replicas changing a deployment at once (two updates, or every replica following an
    alias move) race on the record's etag: exactly one takes it; the others are ABORTED
    (ETAG_MISMATCH) and the record is the winner's."""
    stores = [SqlDeploymentStore.open(table_url) for _ in range(4)]
    try:
        stores[0].create("d", _record("d", 1))
        read = stores[0].get("d")["etag"]
        outcomes: dict[int, str] = {}

        def roll_out(number: int) -> None:
            try:
                stores[number].put("d", {**_record("d", 10 + number), "etag": f"w{number}"},
                                   read)
                outcomes[number] = "took it"
            except Aborted as exc:
                outcomes[number] = exc.reason

        run_together(roll_out, len(stores), timeout=30)
        winners = [number for number, outcome in outcomes.items() if outcome == "took it"]
        assert len(winners) == 1 and len(outcomes) == len(stores)
        assert sorted(set(outcomes.values())) == ["ETAG_MISMATCH", "took it"]
        assert stores[1].get("d")["etag"] == f"w{winners[0]}"
        stores[2].delete("d")
        with pytest.raises(Aborted):  # gone meanwhile
            stores[0].put("d", _record("d", 2), f"w{winners[0]}")
    finally:
        for store in stores:
            store.close()


def test_a_deployment_table_from_before_migrations_is_adopted(tmp_path):
    path = tmp_path / "deployments.db"
    with sqlite3.connect(path) as connection:  # what the service wrote with sqlite3
        connection.execute("CREATE TABLE deployments (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        connection.execute("INSERT INTO deployments VALUES (?, ?)",
                           ("old", json.dumps(_record("old", 3))))
    store = SqlDeploymentStore.open_sqlite(path)
    try:
        assert store.get("old") == _record("old", 3)
        store.put("old", _record("old", 4))
    finally:
        store.close()
    with sqlite3.connect(path) as connection:
        (text,) = connection.execute("SELECT record FROM deployments").fetchone()
    assert json.loads(text)["serving_versions"] == ["models/digits/versions/4"]


def test_replicas_starting_together_migrate_the_deployment_table_once(postgres_url):
    run_together(lambda _: SqlDeploymentStore.open(postgres_url).close())
    SqlDeploymentStore.open(postgres_url).close()  # idempotent
    assert database_schema(postgres_url, VERSION_TABLE).versions == ["0002"]


# -- create leases: a create whose replica died is taken over -------------------------------------

CREATING = "DEPLOYMENT_STATE_CREATING"


def test_a_create_lease_renewed_is_kept_and_a_lapsed_one_is_taken_over_by_one_replica(
        table_url):
    """What a replica that died mid-create leaves: a CREATING record whose lease nobody
    renews. Once it lapsed, exactly one of the replicas racing for it takes it over (with a
    new etag, so the old holder can neither record nor delete it), and the interruption is
    counted; a lease given up is taken over without counting one."""
    stores = [SqlDeploymentStore.open(table_url) for _ in range(4)]
    first = stores[0]
    try:
        first.create("live", _record("live", 1, CREATING), "alive", 60)
        first.create("dead", _record("dead", 1, CREATING), "died", 1)
        first.create("done", _record("done", 1, CREATING), "alive", 1)
        first.put("done", _record("done", 1))  # recorded READY: no lease any more
        assert first.renew_lease("live", "alive", 60)
        assert not first.renew_lease("live", "someone-else", 60)
        assert not {"live", "done"} & set(first.lapsed_leases())
        _until_lapsed(first, "dead")  # nobody renews it: it lapses
        assert first.take_over("live", "thief", 30) is None
        assert first.take_over("done", "thief", 30) is None

        winner, takeover = _one_of_four_takes_over(stores, "dead")
        assert takeover.interruptions == 1
        assert takeover.record["etag"] != _record("dead", 1, CREATING)["etag"]
        assert takeover.record == {**first.get("dead"), "etag": takeover.record["etag"]}
        assert first.lapsed_leases() == []
        # The dead holder's writes (were it only stalled) fail; the taker's lease is its own.
        with pytest.raises(Aborted):
            first.put("dead", _record("dead", 1), _record("dead", 1, CREATING)["etag"])
        assert not first.delete("dead", _record("dead", 1, CREATING)["etag"])
        assert not first.renew_lease("dead", "died", 30)
        assert first.renew_lease("dead", f"replica-{winner}", 30)

        first.release_lease("dead", f"replica-{winner}")  # e.g. the registry is down
        assert first.lapsed_leases() == ["dead"]
        again = first.take_over("dead", "replica-9", 30)
        assert again is not None and again.interruptions == 1  # given up, not interrupted
        assert first.delete("dead", again.record["etag"])
        with pytest.raises(NotFound):
            first.get("dead")
    finally:
        for store in stores:
            store.close()


def test_creating_records_from_before_create_leases_are_taken_over(postgres_url):
    """A CREATING row without a lease (written before migration 0002) is no replica's."""
    store = SqlDeploymentStore.open(postgres_url)
    try:
        store.create("old", _record("old", 1, CREATING))
        assert store.lapsed_leases() == ["old"]
        taken = store.take_over("old", "new-replica", 30)
        assert taken is not None and taken.interruptions == 0
    finally:
        store.close()


ROLLING_OUT = "DEPLOYMENT_STATE_ROLLING_OUT"


def _left_rolling_out(record: dict, model: str, etag: str) -> dict:
    """The record a replica writes when it starts rolling `record` out to `model` (what it
    leaves behind when it dies before recording READY): what was served, and the target."""
    spec = {key: record[key] for key in ("model", "track_alias", "traffic", "shadow",
                                         "serving")}
    return {**record, "state": ROLLING_OUT, "etag": etag,
            "rollout": {"spec": {**spec, "model": model}, "pinned": None,
                        "from_state": record["state"]}}


def test_a_lapsed_rollout_lease_is_taken_over_by_one_replica_and_its_holder_refused(
        table_url):
    """What a replica that died mid-rollout leaves: a ROLLING_OUT record (what was served,
    and where it goes) whose lease nobody renews. Once it lapsed, exactly one of the replicas
    racing for it takes it over, the rollout's target kept and a new etag given, so the old
    holder, were it only stalled, can neither record its rollout, renew its lease nor delete
    the deployment. The lease ends when the rollout is recorded; a next rollout's
    interruptions count from 0 again."""
    stores = [SqlDeploymentStore.open(table_url) for _ in range(4)]
    first = stores[0]
    try:
        first.create("d", _record("d", 1))
        first.create("live", _record("live", 1))
        assert first.lapsed_leases() == []  # READY: no lease to lapse
        rolling = _left_rolling_out(first.get("d"), "models/digits/versions/2", "rolling")
        with pytest.raises(Aborted):  # the rollout starts only from the record it read
            first.put("d", rolling, "not-the-etag", "holder", 1)
        first.put("d", rolling, _record("d", 1)["etag"], "holder", 1)
        first.put("live", _left_rolling_out(first.get("live"), "models/digits/versions/2",
                                            "live-rolling"), _record("live", 1)["etag"],
                  "alive", 60)
        assert first.renew_lease("d", "holder", 1)
        assert not first.renew_lease("d", "someone-else", 1)
        assert first.take_over("live", "thief", 30) is None
        _until_lapsed(first, "d")  # the holder stopped renewing: it lapses

        winner, takeover = _one_of_four_takes_over(stores, "d")
        assert takeover.interruptions == 1
        assert takeover.record["etag"] != "rolling"
        assert takeover.record == {**rolling, "etag": takeover.record["etag"]}  # target kept
        assert first.get("d") == takeover.record
        assert first.lapsed_leases() == []
        # The stalled holder's late writes are refused; the taker's lease is its own.
        with pytest.raises(Aborted) as late:
            first.put("d", _record("d", 2), "rolling")
        assert late.value.reason == "ETAG_MISMATCH"
        assert not first.delete("d", "rolling")
        assert not first.renew_lease("d", "holder", 30)
        assert first.renew_lease("d", f"replica-{winner}", 30)
        assert first.get("d")["state"] == ROLLING_OUT

        recorded = {**_record("d", 2), "etag": "recorded"}
        first.put("d", recorded, takeover.record["etag"])  # the taker records it READY
        assert first.get("d") == recorded
        assert not first.renew_lease("d", f"replica-{winner}", 30)  # the lease ended with it
        first.put("d", _left_rolling_out(recorded, "models/digits/versions/3", "next"),
                  "recorded", "next-holder", 0.1)
        time.sleep(0.3)
        again = first.take_over("d", "replica-9", 30)
        assert again is not None and again.interruptions == 1  # this rollout's first
    finally:
        for store in stores:
            store.close()


class RecordingController:
    """Stands in for a replica's controller: serves whatever `follow_table` reads."""

    def __init__(self, store: SqlDeploymentStore) -> None:
        self.store = store
        self.live: dict[str, dict] = {}
        self.follows: list[tuple[str, float]] = []
        self.changed = asyncio.Event()

    async def follow_table(self, deployment_id: str) -> dict | None:
        self.follows.append((deployment_id, time.monotonic()))
        try:
            record = await asyncio.to_thread(self.store.get, deployment_id)
            self.live[deployment_id] = record
        except NotFound:
            record = None
            self.live.pop(deployment_id, None)
        self.changed.set()
        return record

    def live_deployments(self) -> set[str]:
        return set(self.live)

    async def take_over_lapsed_leases(self) -> None:
        """Nothing to take over here (the store tests take creates over themselves)."""


async def _until(predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_change_on_one_replica_is_followed_by_the_other_within_a_second(postgres_url):
    writer = SqlDeploymentStore.open(postgres_url)
    reader = SqlDeploymentStore.open(postgres_url)
    controller = RecordingController(reader)
    follower = DeploymentFollower(reader, controller, resync_seconds=60)
    await follower.start()
    try:
        await asyncio.wait_for(follower.listening.wait(), 10)
        await asyncio.to_thread(writer.create, "d", _record("d", 1, "DEPLOYMENT_STATE_CREATING"))
        await asyncio.sleep(0.3)
        assert controller.follows == []  # the writer is still loading it: nothing to follow

        await asyncio.to_thread(writer.put, "d", _record("d", 1))
        assert await _until(lambda: "d" in controller.live, 1.0) < 1.0
        await asyncio.to_thread(writer.put, "d", {**_record("d", 1), "message": "note"})
        await asyncio.sleep(0.3)
        assert len(controller.follows) == 1  # bookkeeping only: nothing to load

        await asyncio.to_thread(writer.put, "d", _record("d", 1, batch=16))
        assert await _until(lambda: controller.live["d"]["serving"]["max_batch_size"] == 16,
                            1.0) < 1.0
        await asyncio.to_thread(writer.put, "d", _record("d", 2))
        assert await _until(lambda: controller.live["d"]["serving_versions"] ==
                            ["models/digits/versions/2"], 1.0) < 1.0

        await asyncio.to_thread(reader.put, "d", _record("d", 3))  # the follower's own write
        await asyncio.sleep(0.3)
        assert controller.live["d"]["serving_versions"] == ["models/digits/versions/2"]

        await asyncio.to_thread(writer.delete, "d")
        assert await _until(lambda: "d" not in controller.live, 1.0) < 1.0
        assert [deployment_id for deployment_id, _ in controller.follows] == ["d"] * 4
    finally:
        await follower.stop()
        writer.close()
        reader.close()


async def test_changes_made_while_a_replica_was_not_listening_are_followed_on_start(
        postgres_url):
    writer = SqlDeploymentStore.open(postgres_url)
    reader = SqlDeploymentStore.open(postgres_url)
    writer.create("missed", _record("missed", 5))
    writer.create("gone", _record("gone", 1))
    controller = RecordingController(reader)
    controller.live["gone"] = _record("gone", 1)
    controller.live["stale"] = _record("stale", 1)  # deleted while this replica was away
    follower = DeploymentFollower(reader, controller, resync_seconds=60)
    await follower.start()
    try:
        await _until(lambda: "missed" in controller.live and "stale" not in controller.live, 5)
        assert serving_fingerprint(controller.live["missed"]) == serving_fingerprint(
            _record("missed", 5))
        assert "gone" not in {deployment_id for deployment_id, _ in controller.follows}
    finally:
        await follower.stop()
        writer.close()
        reader.close()


# -- two controllers on one table, each with its own real tritonserver ------------------------------


class Replica(NamedTuple):
    """One inference replica's deployment side: its controller on the shared table, its own
    tritonserver, and the follower of the other replicas' changes."""

    store: SqlDeploymentStore
    controller: DeploymentController
    routes: RouteTable
    triton: TritonClient
    repository: ModelRepository
    artifacts: Path

    async def start_following(self) -> DeploymentFollower:
        follower = DeploymentFollower(self.store, self.controller, resync_seconds=60)
        await follower.start()
        await asyncio.wait_for(follower.listening.wait(), 10)
        return follower


class Registry(NamedTuple):
    """The real registry service in this process, holding models/digits versions 1 and 2."""

    target: str
    token: str
    modules: dict[int, torch.nn.Module]
    sha256s: dict[int, str]
    """Each version's artifact digest (the name replicas cache it under)."""


@contextlib.asynccontextmanager
async def _registry(root: Path) -> AsyncIterator[Registry]:
    modules, sha256s = {}, {}
    async with registry_in_process(root) as served:
        async with open_channel(served.target, token=served.token) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
            for number in (1, 2):
                modules[number] = zoo_model("mlp", {"hidden_sizes": [8]}, [64], seed=number)
                package = root / f"digits-{number}.safetensors"
                save_zoo_package(package, modules[number], kind="mlp",
                                 hyperparameters={"hidden_sizes": [8]}, input_shape=[64])
                version = await stub.UploadModelVersion(model_upload_requests(
                    "models/digits", package.read_bytes()))
                sha256s[number] = version.artifact.sha256
        yield Registry(served.target, served.token, modules, sha256s)


@contextlib.asynccontextmanager
async def _replica(root: Path, url: str, registry: Registry,
                   leases: LeasePolicy = LeasePolicy()
                   ) -> AsyncIterator[Replica]:
    """A replica: its own tritonserver (started for real) and controller, on the table at
    `url`, after its start-up reload (as the service starts)."""
    triton_process = TritonServerProcess(triton_process_config(root / "triton"))
    await triton_process.start()
    registry_client = RegistryClient(PeerChannel("registry", target=registry.target,
                                                 token=registry.token))
    await registry_client.open()
    store = SqlDeploymentStore.open(url)
    routes = RouteTable(store.get, lambda: True)
    repository = ModelRepository(triton_process.model_repository)
    try:
        async with TritonClient(triton_process.grpc_url,
                                control_key=triton_process.control_key) as triton:
            controller = DeploymentController(
                store, registry_client, triton, repository, root / "artifacts",
                ServingDefaults(drain_seconds=1), routes, PageTokenCodec(b"k" * 32),
                leases)
            try:
                await controller.reload_all()
                yield Replica(store, controller, routes, triton, repository, root / "artifacts")
            finally:
                await controller.close()
    finally:
        store.close()
        await registry_client.close()
        await triton_process.stop()


def _replica_ready_series(replica: Replica) -> dict[tuple[str, str], int]:
    """`maas.inference.deployment.replica_ready` as the replica's /metrics would export it."""
    reader = InMemoryMetricReader()
    register_inference_metrics(MeterProvider(metric_readers=[reader]).get_meter("test"),
                               lambda: True, dict, replica.controller.replica_loads)
    return {(point.attributes["deployment"], point.attributes["state"]): point.value
            for resource in reader.get_metrics_data().resource_metrics
            for scope in resource.scope_metrics for metric in scope.metrics
            if metric.name == "maas.inference.deployment.replica_ready"
            for point in metric.data.data_points}


async def _predict(replica: Replica, data: np.ndarray) -> np.ndarray:
    """What the replica's own Triton answers for deployments/digits now."""
    model = replica.routes.live("digits").route.pick("")
    (features,), (logits,) = model.signature.inputs, model.signature.outputs
    reply = await replica.triton.infer(model.triton_model,
                                       [RawTensor.from_numpy(features.name, data)], timeout=30)
    return reply.output(logits.name).to_numpy()


@pytest.mark.triton
async def test_a_deployment_made_on_one_replica_is_loaded_by_the_other(postgres_url, tmp_path):
    """Heard within a second, loaded on b's own Triton with the same answers, dropped from it
    on delete. (A rollout followed back, through two whole services, is the drill's:
    tests/drills/test_inference_replicas_drill.py.)"""
    data = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    async with (_registry(tmp_path) as registry,
                _replica(tmp_path / "a", postgres_url, registry) as a,
                _replica(tmp_path / "b", postgres_url, registry) as b):
        followers = [await a.start_following(), await b.start_following()]
        try:
            await a.controller.create("digits", {"model": "models/digits/versions/1"},
                                      ANONYMOUS_ADMIN)
            # b heard of it within a second (its model directory is written before Triton
            # loads it), then serves it from its own Triton.
            assert await _until(lambda: (b.repository.root / "digits.digits.v1").exists(),
                                1.0) < 1.0
            await _until(lambda: b.routes.get("digits") is not None, 60)
            assert await b.triton.is_model_ready("digits.digits.v1")
            assert b.controller.replica_loads()["digits"].state == "DEPLOYMENT_STATE_READY"
            with torch.inference_mode():
                expected_1 = registry.modules[1](torch.from_numpy(data)).numpy()
            np.testing.assert_allclose(await _predict(b, data), expected_1, rtol=1e-4,
                                       atol=1e-4)

            await a.controller.delete("deployments/digits", ANONYMOUS_ADMIN)
            assert await _until(lambda: b.routes.get("digits") is None, 1.0) < 1.0
            await _until(lambda: not (b.repository.root / "digits.digits.v1").exists(), 10)
            assert not await b.triton.is_model_ready("digits.digits.v1")  # drained, unloaded
            assert b.controller.replica_loads() == {}
        finally:
            for follower in followers:
                await follower.stop()


@pytest.mark.triton
async def test_a_replica_that_cannot_load_a_deployment_keeps_it_to_itself(
        postgres_url, tmp_path):
    """A replica reloading (a restart, or its Triton's) while another creates a deployment
    leaves the record to its writer; a replica whose own load fails (its cached artifact is
    corrupt) reports it (Get on that replica, its replica loads) while the shared record stays
    what the create wrote and the other replica serves on."""
    async with (_registry(tmp_path) as registry,
                _replica(tmp_path / "a", postgres_url, registry) as a,
                _replica(tmp_path / "b", postgres_url, registry) as b):
        b.artifacts.joinpath(registry.sha256s[1]).write_bytes(b"not a package")

        creating = asyncio.create_task(a.controller.create(
            "digits", {"model": "models/digits/versions/1"}, ANONYMOUS_ADMIN))
        await _until(lambda: [deployment_id for deployment_id, _ in a.store.list("", 10)]
                     == ["digits"], 10)
        await b.controller.reload_all()  # b restarts meanwhile
        assert not creating.done(), "the create must still be loading for this check"
        assert a.store.get("digits")["state"] == "DEPLOYMENT_STATE_CREATING"  # not READY by b
        assert b.routes.get("digits") is None and b.controller.replica_loads() == {}
        created = await creating
        record = a.store.get("digits")
        assert record["state"] == "DEPLOYMENT_STATE_READY"

        await b.controller.reload_all()  # b's Triton restarted: its load of "digits" fails
        assert a.store.get("digits") == record  # nothing written by b
        assert b.controller.replica_loads() == {"digits": ReplicaLoad(
            "DEPLOYMENT_STATE_FAILED", b.controller.replica_loads()["digits"].message)}
        on_b = await b.controller.get("deployments/digits", ANONYMOUS_ADMIN)
        assert on_b["state"] == "DEPLOYMENT_STATE_FAILED"
        assert on_b["message"].startswith("on this replica: reload failed: Triton could not")
        with pytest.raises(Unavailable):  # b knows it but cannot serve it
            b.routes.live("digits")
        assert _replica_ready_series(b) == {("digits", "DEPLOYMENT_STATE_FAILED"): 0}
        assert _replica_ready_series(a) == {("digits", "DEPLOYMENT_STATE_READY"): 1}
        on_a = await a.controller.get("deployments/digits", ANONYMOUS_ADMIN)
        assert (on_a["state"], on_a["etag"]) == ("DEPLOYMENT_STATE_READY", created["etag"])
        assert a.controller.replica_loads()["digits"].state == "DEPLOYMENT_STATE_READY"
        assert a.routes.get("digits") is not None

        # Deleted through b while a is still creating it: a's create does not resurrect it.
        creating = asyncio.create_task(a.controller.create(
            "brief", {"model": "models/digits/versions/1"}, ANONYMOUS_ADMIN))
        await _until(lambda: "brief" in dict(a.store.list("", 10)), 10)
        await b.controller.delete("deployments/brief", ANONYMOUS_ADMIN)
        assert not creating.done(), "the create must still be loading for this check"
        with pytest.raises(Aborted) as aborted:
            await creating
        assert aborted.value.reason == "DELETED_WHILE_CREATING"
        with pytest.raises(NotFound):
            a.store.get("brief")
        assert a.routes.get("brief") is None and "brief" not in a.controller.replica_loads()
        assert not await a.triton.is_model_ready("brief.digits.v1")


def _left_creating(deployment_id: str, model: str) -> dict:
    """The record a replica writes when it starts creating a deployment (what it leaves
    behind when it dies before recording READY)."""
    return {"name": f"deployments/{deployment_id}", "model": model, "track_alias": False,
            "traffic": [], "shadow": None,
            "serving": {"max_batch_size": 8, "instance_count": 1,
                        "max_queue_delay_microseconds": 100, "dynamic_batching": True,
                        "preferred_batch_sizes": []},
            "state": CREATING, "message": "", "serving_versions": [], "served_versions": [],
            "resolved": {}, "create_time": "2026-01-01T00:00:00Z",
            "update_time": "2026-01-01T00:00:00Z", "etag": f"left-{deployment_id}"}


@pytest.mark.triton
async def test_a_create_whose_replica_died_is_finished_by_another_or_recorded_failed(
        postgres_url, tmp_path):
    """A replica that died mid-create leaves a CREATING record under a lease nobody renews.
    Once it lapsed, the surviving replica's follower takes the create over: it loads the
    recorded spec on its own Triton and records READY. A create that cannot be served is
    recorded FAILED with the reason; one interrupted more often than the policy allows (a
    model that brings down whichever replica loads it) is recorded FAILED without loading."""
    data = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    policy = LeasePolicy(lease_seconds=1.0, max_takeovers=1)
    async with (_registry(tmp_path) as registry,
                _replica(tmp_path / "b", postgres_url, registry, policy) as b):
        dead = SqlDeploymentStore.open(postgres_url)
        follower = DeploymentFollower(b.store, b.controller, resync_seconds=60,
                                      takeover_seconds=0.2)
        try:
            dead.create("digits", _left_creating("digits", "models/digits/versions/1"),
                        "dead-replica", 0.5)
            dead.create("missing", _left_creating("missing", "models/digits/versions/99"),
                        "dead-replica", 0.5)
            dead.create("poison", _left_creating("poison", "models/digits/versions/2"),
                        "dead-replica", 0.1)
            time.sleep(0.2)  # the first holder of "poison" died; so does the second
            assert dead.take_over("poison", "dead-too", 0.1) is not None
            await follower.start()

            await _until(lambda: b.store.get("digits")["state"] != CREATING, 60)
            record = b.store.get("digits")
            assert record["state"] == "DEPLOYMENT_STATE_READY", record
            assert record["serving_versions"] == ["models/digits/versions/1"]
            assert record["create_time"] == "2026-01-01T00:00:00Z"  # the user's create
            assert b.controller.replica_loads()["digits"] == ReplicaLoad("DEPLOYMENT_STATE_READY")
            with torch.inference_mode():
                expected = registry.modules[1](torch.from_numpy(data)).numpy()
            np.testing.assert_allclose(await _predict(b, data), expected, rtol=1e-4, atol=1e-4)

            await _until(lambda: b.store.get("missing")["state"] != CREATING
                         and b.store.get("poison")["state"] != CREATING, 30)
            missing = b.store.get("missing")
            assert missing["state"] == "DEPLOYMENT_STATE_FAILED"
            assert missing["message"].startswith("create failed:")
            assert "versions/99" in missing["message"]
            poison = b.store.get("poison")
            assert poison["state"] == "DEPLOYMENT_STATE_FAILED"
            assert poison["message"].startswith("the create was interrupted 2 times")
            assert not await b.triton.is_model_ready("poison.digits.v2")  # never loaded
            assert b.routes.get("missing") is None and b.routes.get("poison") is None
            assert b.store.lapsed_leases() == []
            # The user deletes a FAILED deployment and may create it again.
            await b.controller.delete("deployments/poison", ANONYMOUS_ADMIN)
            created = await b.controller.create("poison", {"model": "models/digits/versions/2"},
                                                ANONYMOUS_ADMIN)
            assert created["state"] == "DEPLOYMENT_STATE_READY"
        finally:
            await follower.stop()
            dead.close()


@pytest.mark.triton
async def test_a_rollout_whose_replica_died_is_finished_by_another_or_rolled_back(
        postgres_url, tmp_path):
    """A replica that died mid-rollout leaves a ROLLING_OUT record under a lease nobody
    renews; the surviving replica serves what was served meanwhile. Once the lease lapsed,
    its follower takes the rollout over: it loads the new version on its own Triton, switches,
    records READY with the new spec and a new etag, and unloads the old version. A rollout
    that cannot complete is rolled back (READY, serving what it served, saying why); one
    interrupted more often than the policy allows is rolled back without loading anything,
    once (no takeover loop)."""
    data = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    policy = LeasePolicy(lease_seconds=1.0, max_takeovers=1)
    async with (_registry(tmp_path) as registry,
                _replica(tmp_path / "b", postgres_url, registry, policy) as b):
        for deployment_id in ("digits", "missing", "poison"):
            await b.controller.create(deployment_id, {"model": "models/digits/versions/1"},
                                      ANONYMOUS_ADMIN)
        before = {deployment_id: b.store.get(deployment_id)
                  for deployment_id in ("digits", "missing", "poison")}
        dead = SqlDeploymentStore.open(postgres_url)
        follower = DeploymentFollower(b.store, b.controller, resync_seconds=60,
                                      takeover_seconds=0.2)
        try:
            for deployment_id, target, seconds in (("digits", 2, 0.5), ("missing", 99, 0.5),
                                                   ("poison", 2, 0.1)):
                dead.put(deployment_id, _left_rolling_out(
                    before[deployment_id], f"models/digits/versions/{target}",
                    f"left-{deployment_id}"), before[deployment_id]["etag"], "dead-replica",
                         seconds)
            time.sleep(0.2)  # the first holder of "poison" died; so does the second
            assert dead.take_over("poison", "dead-too", 0.1) is not None
            on_b = await b.controller.get("deployments/digits", ANONYMOUS_ADMIN)
            assert on_b["state"] == ROLLING_OUT and "rollout" not in on_b
            await follower.start()

            await _until(lambda: b.store.get("digits")["state"] != ROLLING_OUT, 60)
            record = b.store.get("digits")
            assert record["state"] == "DEPLOYMENT_STATE_READY", record
            assert record["model"] == "models/digits/versions/2"
            assert record["serving_versions"] == ["models/digits/versions/2"]
            assert record["etag"] not in (before["digits"]["etag"], "left-digits")
            assert record["create_time"] == before["digits"]["create_time"]
            assert "rollout" not in record
            with torch.inference_mode():
                expected_2 = registry.modules[2](torch.from_numpy(data)).numpy()
            np.testing.assert_allclose(await _predict(b, data), expected_2, rtol=1e-4,
                                       atol=1e-4)
            await _until(lambda: not (b.repository.root / "digits.digits.v1").exists(), 10)
            assert not await b.triton.is_model_ready("digits.digits.v1")  # drained, unloaded

            await _until(lambda: b.store.get("missing")["state"] != ROLLING_OUT
                         and b.store.get("poison")["state"] != ROLLING_OUT, 30)
            missing = b.store.get("missing")
            assert missing["state"] == "DEPLOYMENT_STATE_READY", missing
            assert missing["message"].startswith(
                "rollout to models/digits/versions/99 rolled back:"), missing["message"]
            assert missing["model"] == "models/digits/versions/1"
            assert missing["serving_versions"] == ["models/digits/versions/1"]
            assert missing["etag"] not in (before["missing"]["etag"], "left-missing")
            assert b.routes.get("missing") is not None
            assert await b.triton.is_model_ready("missing.digits.v1")  # served throughout
            poison = b.store.get("poison")
            assert poison["state"] == "DEPLOYMENT_STATE_READY", poison
            assert poison["message"] == ("rollout to models/digits/versions/2 rolled back: the "
                                         "rollout was interrupted 2 times (each replica rolling "
                                         "it out stopped while loading it)")
            assert poison["serving_versions"] == ["models/digits/versions/1"]
            assert not await b.triton.is_model_ready("poison.digits.v2")  # never loaded
            assert await b.triton.is_model_ready("poison.digits.v1")
            assert b.store.lapsed_leases() == []
            await asyncio.sleep(1.0)  # resolved once: no takeover comes back to it
            assert b.store.get("poison") == poison and b.store.get("missing") == missing
            # The user updates the rolled-back deployment as any other.
            updated = await b.controller.update(
                {"name": "deployments/poison", "model": "models/digits/versions/2"}, ["model"],
                ANONYMOUS_ADMIN)
            assert updated["state"] == "DEPLOYMENT_STATE_READY"
            assert updated["serving_versions"] == ["models/digits/versions/2"]
        finally:
            await follower.stop()
            dead.close()


@pytest.mark.triton
async def test_a_stalled_rollout_holder_whose_lease_was_taken_over_cannot_record_it(
        postgres_url, tmp_path):
    """A replica that stalls mid-rollout past its lease (it renews nothing) finds the rollout
    taken over when it comes back: its record of READY is refused (ABORTED, ETAG_MISMATCH),
    the taker's record stays, and it serves what it served before again (the new version it
    loaded unloaded), leaving the rest to the taker and its follower."""
    data = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    async with (_registry(tmp_path) as registry,
                _replica(tmp_path / "a", postgres_url, registry,
                         LeasePolicy(lease_seconds=0.5)) as a):
        await a.controller.create("digits", {"model": "models/digits/versions/1"},
                                  ANONYMOUS_ADMIN)
        thief = SqlDeploymentStore.open(postgres_url)
        loading, load_model = asyncio.Event(), a.triton.load_model

        async def stalled_load(name: str, **options) -> None:
            await loading.wait()
            await load_model(name, **options)

        a.store.renew_lease = lambda *_: True  # stalled: its lease is never renewed
        a.triton.load_model = stalled_load
        try:
            updating = asyncio.create_task(a.controller.update(
                {"name": "deployments/digits", "model": "models/digits/versions/2"}, ["model"],
                ANONYMOUS_ADMIN))
            await _until(lambda: thief.lapsed_leases() == ["digits"], 10)
            taken = thief.take_over("digits", "another-replica", 30)
            assert taken is not None and taken.interruptions == 1
            assert not updating.done()
            loading.set()
            with pytest.raises(Aborted) as late:
                await updating
            assert late.value.reason == "ETAG_MISMATCH"
            assert a.store.get("digits") == taken.record  # the taker's, as it wrote it
            with torch.inference_mode():
                expected_1 = registry.modules[1](torch.from_numpy(data)).numpy()
            np.testing.assert_allclose(await _predict(a, data), expected_1, rtol=1e-4,
                                       atol=1e-4)
            assert not await a.triton.is_model_ready("digits.digits.v2")
            assert not (a.repository.root / "digits.digits.v2").exists()
        finally:
            loading.set()
            thief.close()


@pytest.mark.triton
async def test_rollouts_left_by_replicas_of_an_older_release_are_rolled_back_once_old(
        postgres_url, tmp_path):
    """ROLLING_OUT rows written before rollouts held a lease and recorded their target (the
    rows this left ROLLING_OUT for good): one written longer ago than a load may take is
    rolled back to what it serves (READY, saying why); a recent one is left to the older
    replica that may still be rolling it out (a rolling upgrade of the service)."""
    async with (_registry(tmp_path) as registry,
                _replica(tmp_path / "b", postgres_url, registry) as b):
        for deployment_id in ("stuck", "recent"):
            await b.controller.create(deployment_id, {"model": "models/digits/versions/1"},
                                      ANONYMOUS_ADMIN)
        older = SqlDeploymentStore.open(postgres_url)
        try:
            for deployment_id, written in (("stuck", "2026-01-01T00:00:00Z"),
                                           ("recent", datetime.now(UTC).isoformat())):
                record = older.get(deployment_id)
                older.put(deployment_id, {**record, "state": ROLLING_OUT, "update_time": written,
                                          "etag": f"old-{deployment_id}"}, record["etag"])
            assert sorted(older.lapsed_leases()) == ["recent", "stuck"]  # nobody's lease

            await b.controller.take_over_lapsed_leases()
            stuck = older.get("stuck")
            assert stuck["state"] == "DEPLOYMENT_STATE_READY", stuck
            assert stuck["message"] == ("rollout to an unrecorded target rolled back: it was left "
                                        "unfinished by a replica of an older release")
            assert stuck["serving_versions"] == ["models/digits/versions/1"]
            assert stuck["etag"] != "old-stuck"
            recent = older.get("recent")
            assert (recent["state"], recent["etag"]) == (ROLLING_OUT, "old-recent")
            assert older.lapsed_leases() == ["recent"]
        finally:
            older.close()


class FailingController(RecordingController):
    """Fails `follow_table` with each error of `failures` first."""

    def __init__(self, store: SqlDeploymentStore, failures: list[Exception]) -> None:
        super().__init__(store)
        self.failures = failures

    async def follow_table(self, deployment_id: str) -> dict | None:
        if self.failures:
            self.follows.append((deployment_id, time.monotonic()))
            raise self.failures.pop(0)
        return await super().follow_table(deployment_id)


async def test_a_follow_is_retried_while_unavailable_and_not_in_a_loop_when_it_cannot_be(
        postgres_url):
    writer = SqlDeploymentStore.open(postgres_url)
    reader = SqlDeploymentStore.open(postgres_url)
    controller = FailingController(reader, [Unavailable("the registry is down"),
                                            Unavailable("the registry is down")])
    follower = DeploymentFollower(reader, controller, resync_seconds=60)
    await follower.start()
    try:
        await asyncio.wait_for(follower.listening.wait(), 10)
        await asyncio.to_thread(writer.create, "d", _record("d", 1))
        await _until(lambda: "d" in controller.live, 5)
        assert len(controller.follows) == 3  # two UNAVAILABLE, then loaded

        controller.failures = [FailedPrecondition("not servable here", reason="FORMAT")]
        await asyncio.to_thread(writer.put, "d", _record("d", 2))
        await asyncio.sleep(2)
        assert len(controller.follows) == 4  # tried once; the next change or resync retries
        assert controller.live["d"]["serving_versions"] == ["models/digits/versions/1"]
    finally:
        await follower.stop()
        writer.close()
        reader.close()


async def test_a_replica_whose_listening_connection_dies_reconnects_and_catches_up(
        postgres_url):
    writer = SqlDeploymentStore.open(postgres_url)
    reader = SqlDeploymentStore.open(postgres_url)
    controller = RecordingController(reader)
    follower = DeploymentFollower(reader, controller, resync_seconds=60)
    await follower.start()
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        await asyncio.wait_for(follower.listening.wait(), 10)
        with admin.connect() as connection:
            killed = connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%%'").all()
        assert killed == [(True,)]
        await asyncio.to_thread(writer.create, "while-away", _record("while-away", 1))
        await _until(lambda: "while-away" in controller.live, 10)  # resynced on reconnect
        await asyncio.to_thread(writer.create, "after", _record("after", 1))
        assert await _until(lambda: "after" in controller.live, 1.0) < 1.0  # listening again
    finally:
        admin.dispose()
        await follower.stop()
        writer.close()
        reader.close()
