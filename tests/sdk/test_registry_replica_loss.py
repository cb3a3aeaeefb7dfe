"""Registry streams survive the replica serving them being killed (-9): a download goes on at
the byte it reached on the other replica, and the file checks out; an event watch goes on
after the last event it gave, and every event comes once.

Two real registry processes share one PostgreSQL database and one blob directory (as the
scale drill runs them); the dataset is sent in small chunks so the download is still running
when the test catches the replica that holds the blob open (stopped with SIGSTOP, so it can
neither finish nor send more, then killed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import maas
import numpy as np
import pytest
from maas_runtime.registry_client import file_sha256

from tests.support.postgres import postgres_database_or_skip
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.postgres

CHUNK_BYTES = 64 * 1024
RETRIES = maas.RetryPolicy(max_attempts=4, initial_backoff_seconds=0.05,
                           max_backoff_seconds=0.2)


@pytest.fixture
def registries(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    with postgres_database_or_skip() as database_url:
        replicas = [ServiceProcess("registry", tmp_path / "registry", database_url=database_url,
                                   gc_grace_seconds="120",
                                   download_chunk_bytes=str(CHUNK_BYTES))
                    for _ in range(2)]
        try:
            for replica in replicas:  # one after the other: the first writes the admin token
                asyncio.run(replica.start())
            yield replicas
        finally:
            for replica in replicas:
                if replica.alive():
                    replica.terminate()


def holds_open(pid: int, blob_name: str) -> bool:
    """Whether process `pid` has a file named `blob_name` open (it is streaming that blob)."""
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor).endswith(blob_name):
                return True
        except OSError:
            continue
    return False


def partial_bytes(directory: Path) -> int:
    return sum(part.stat().st_size for part in directory.glob(".*.part"))


class DownloadUnderWay:
    """`client.download` running on a thread until the test caught the replica serving it."""

    def __init__(self, client: maas.Client, registries: list[ServiceProcess], version,
                 destination: Path) -> None:
        self.destination = destination
        self.outcome: dict[str, object] = {}
        self.worker = threading.Thread(target=self._download, args=(client, version.name))
        self.worker.start()
        self.serving = self._replica_streaming(registries, version.artifact.sha256)
        self.serving.process.send_signal(signal.SIGSTOP)  # nothing more leaves it
        self.received = partial_bytes(destination.parent)

    def _download(self, client: maas.Client, name: str) -> None:
        try:
            self.outcome["path"] = client.download(name, self.destination)
        except Exception as error:  # noqa: BLE001 - the test asserts on it
            self.outcome["error"] = error

    def _replica_streaming(self, registries: list[ServiceProcess], sha256: str) -> ServiceProcess:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.worker.is_alive():
            if partial_bytes(self.destination.parent) > 0:
                for replica in registries:
                    if holds_open(replica.process.pid, sha256):
                        return replica
            time.sleep(0.002)
        raise AssertionError("the download ended before the serving replica was caught")

    def result(self) -> dict[str, object]:
        self.worker.join(timeout=120)
        assert not self.worker.is_alive()
        return self.outcome


def upload(client: maas.Client, tmp_path: Path, rows: int) -> tuple[Path, object]:
    """A dataset of `rows` x 256 random float32 registered from an .npz file; (file, version)."""
    features = np.random.default_rng(rows).random((rows, 256), dtype=np.float32)
    source = tmp_path / f"data-{rows}.npz"
    np.savez(source, features=features, labels=np.arange(rows) % 10)
    version = client.upload_dataset(f"data-{rows}", source, label_column="labels")
    assert version.artifact.sha256 == file_sha256(source)
    return source, version


def client_of(registries: list[ServiceProcess]) -> maas.Client:
    return maas.Client(targets={"registry": ",".join(r.target for r in registries)},
                       token=registries[0].admin_token(), retry=RETRIES, timeout=30)


def test_a_download_resumes_on_the_other_replica_after_the_serving_one_is_killed(
        registries, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="maas_runtime.registry_client")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with client_of(registries) as client:
        source, version = upload(client, tmp_path, rows=32 * 1024)  # 32 MiB
        download = DownloadUnderWay(client, registries, version, downloads / "data.npz")
        download.serving.kill()
        outcome = download.result()

    assert "error" not in outcome, outcome.get("error")
    assert outcome["path"] == download.destination
    assert file_sha256(download.destination) == version.artifact.sha256
    assert list(downloads.iterdir()) == [download.destination]  # no partial file left behind
    resumed = [record.getMessage() for record in caplog.records
               if "resuming" in record.getMessage()]
    assert len(resumed) == 1, resumed
    resumed_at = int(resumed[0].split(" at byte ")[1].split()[0])
    assert 0 < download.received <= resumed_at < source.stat().st_size  # not started over
    with np.load(download.destination) as loaded, np.load(source) as sent:
        np.testing.assert_array_equal(loaded["features"], sent["features"])


def test_a_download_no_replica_can_finish_raises_unavailable_and_leaves_nothing(
        registries, tmp_path: Path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with client_of(registries) as client:
        _, version = upload(client, tmp_path, rows=32 * 1024)
        download = DownloadUnderWay(client, registries, version, downloads / "data.npz")
        for replica in registries:
            replica.kill()
        outcome = download.result()

    assert isinstance(outcome.get("error"), maas.Unavailable), outcome
    assert list(downloads.iterdir()) == []  # neither the file nor its partial copy


def test_event_watches_resume_after_their_last_event_when_their_replica_is_killed(
        registries, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="maas_sdk.client")
    with client_of(registries) as client:
        client.create_model("m0")
        seen: list[list[str]] = [[], []]
        failures: list[Exception] = []

        def follow(resources: list[str]) -> None:
            try:
                for event in client.watch_events(types=["EVENT_TYPE_MODEL_CREATED"],
                                                  timeout=90):
                    resources.append(event.resource)
                    if len(resources) == 6:
                        return
            except Exception as error:  # noqa: BLE001 - the test reports it
                failures.append(error)

        def when_seen(count: int) -> None:
            deadline = time.monotonic() + 30
            while min(map(len, seen)) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            assert min(map(len, seen)) >= count, (seen, failures)

        watches = [threading.Thread(target=follow, args=(resources,)) for resources in seen]
        for watch in watches:
            watch.start()
        client.create_model("m1")
        when_seen(2)
        # Each replica killed in turn (the other restarted first): every watch loses its
        # replica once, wherever it was. Writes go to the surviving replica by name (the SDK
        # never repeats a write that met a dead replica).
        for index, replica in enumerate(registries):
            replica.kill()
            with client_of([registries[1 - index]]) as writer:
                writer.create_model(f"m{2 + 2 * index}")
                writer.create_model(f"m{3 + 2 * index}")
            when_seen(4 + 2 * index)
            asyncio.run(replica.start())
            reconnect_deadline = time.monotonic() + 3  # past the channel's reconnect backoff
            while time.monotonic() < reconnect_deadline:
                client.list_models()
                time.sleep(0.2)
        for watch in watches:
            watch.join(timeout=60)

    assert failures == []
    assert seen == [[f"models/m{index}" for index in range(6)]] * 2  # each once, in order
    resumed = [r.getMessage() for r in caplog.records if "event watch" in r.getMessage()]
    assert len(resumed) >= 2, resumed
