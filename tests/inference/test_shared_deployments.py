"""The deployment table shared by inference replicas: the store on SQLite and PostgreSQL, its
migrations, and the follower that makes every replica hear of another's change (LISTEN/NOTIFY)
and reconcile its live routes through the controller."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from typing import NamedTuple

import pytest
import sqlalchemy
from maas_inference.controller import DeploymentController, ServingDefaults
from maas_inference.replicas import DeploymentFollower, serving_fingerprint
from maas_inference.routing import RouteTable
from maas_inference.store import VERSION_TABLE, SqlDeploymentStore
from maas_inference.triton.model_repository import ModelRepository
from maas_runtime.auth import ANONYMOUS_ADMIN
from maas_runtime.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from maas_runtime.pagination import PageTokenCodec

from tests.inference.test_deployment_manager import VERSION, FakeTriton
from tests.support.postgres import postgres_database_or_skip


@pytest.fixture(params=["sqlite", "postgresql"])
def table_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'deployments.db'}"
        return
    with postgres_database_or_skip() as url:
        yield url


@pytest.fixture
def postgres_url():
    with postgres_database_or_skip() as url:
        yield url


def _record(deployment_id: str, version: int, state: str = "DEPLOYMENT_STATE_READY",
            batch: int = 8) -> dict:
    name = f"models/digits/versions/{version}"
    return {"name": f"deployments/{deployment_id}", "model": "models/digits@prod",
            "track_alias": False, "traffic": [], "shadow": None,
            "serving": {"max_batch_size": batch}, "state": state, "message": "",
            "serving_versions": [name], "resolved": {"models/digits@prod": name},
            "etag": f"e{version}{state}{batch}"}


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
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start_replica() -> None:
        try:
            barrier.wait()
            SqlDeploymentStore.open(postgres_url).close()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=start_replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    SqlDeploymentStore.open(postgres_url).close()  # idempotent
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as connection:
        versions = connection.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").all()
    engine.dispose()
    assert versions == [("0001",)]


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


# -- two controllers on one table -----------------------------------------------------------------


class TwoVersionRegistry:
    """models/digits/versions/1 and /2; `models/digits@prod` points at `prod`."""

    def __init__(self) -> None:
        self.prod = 1

    async def resolve(self, reference: str) -> dict:
        number = self.prod if reference.endswith("@prod") else int(reference.rsplit("/", 1)[1])
        return {**VERSION, "name": f"models/digits/versions/{number}",
                "artifact": {"sha256": f"{number}" * 64, "size_bytes": 3}}

    async def download_model_version(self, version: dict, destination) -> None:
        destination.write_bytes(b"abc")

    async def alias_changes(self):
        await asyncio.Event().wait()
        yield ""


class Replica(NamedTuple):
    store: SqlDeploymentStore
    controller: DeploymentController
    routes: RouteTable
    triton: FakeTriton
    follower: DeploymentFollower

    async def close(self) -> None:
        await self.follower.stop()
        await self.controller.close()
        self.store.close()


async def _replica(root, url: str, registry) -> Replica:
    store = SqlDeploymentStore.open(url)
    routes = RouteTable(store.get, lambda: True)
    triton = FakeTriton()
    controller = DeploymentController(
        store, registry, triton, ModelRepository(root / "models"), root / "artifacts",
        ServingDefaults(drain_seconds=1), routes, PageTokenCodec(b"k" * 32))
    await controller.reload_all()
    follower = DeploymentFollower(store, controller, resync_seconds=60)
    await follower.start()
    await asyncio.wait_for(follower.listening.wait(), 10)
    return Replica(store, controller, routes, triton, follower)


async def test_a_deployment_made_on_one_replica_is_loaded_by_the_other_within_a_second(
        postgres_url, tmp_path):
    registry = TwoVersionRegistry()
    a = await _replica(tmp_path / "a", postgres_url, registry)
    b = await _replica(tmp_path / "b", postgres_url, registry)
    try:
        await a.controller.create("digits", {"model": "models/digits@prod"}, ANONYMOUS_ADMIN)
        assert await _until(lambda: b.routes.get("digits") is not None, 1.0) < 1.0
        assert b.triton.loaded == {"digits.digits.v1"}
        assert b.routes.get("digits").route.models == {"digits.digits.v1"}

        registry.prod = 2  # a rollout on b this time (say, b heard of the alias move first)
        await b.controller.update({"name": "deployments/digits", "model": "models/digits@prod"},
                                  ["model"], ANONYMOUS_ADMIN)
        assert await _until(lambda: a.triton.loaded == {"digits.digits.v2"}, 3.0) < 3.0
        assert a.routes.get("digits").route.models == {"digits.digits.v2"}
        view = await a.controller.get("deployments/digits", ANONYMOUS_ADMIN)
        assert view["serving_versions"] == ["models/digits/versions/2"]

        await a.controller.delete("deployments/digits", ANONYMOUS_ADMIN)
        assert await _until(lambda: b.routes.get("digits") is None, 1.0) < 1.0
        assert await _until(lambda: not b.triton.loaded, 3.0) < 3.0
        assert a.triton.loaded == set()
    finally:
        await a.close()
        await b.close()


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
