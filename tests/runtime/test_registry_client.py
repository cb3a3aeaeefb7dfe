"""The shared registry client against a real in-process gRPC registry stand-in.

The stand-in serves whatever bytes a test chooses (right, corrupt, too many, or a stream that
stalls), so each test pins one promise of `RegistryClient`: verified downloads, nothing left
behind on any error (cancellation included), deadlines on every call, and a connection
failure that names the transport (plaintext against a TLS registry).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from maas.registry.v1 import (
    artifact_pb2,
    model_pb2,
    registry_service_pb2 as rs,
    registry_service_pb2_grpc,
)
from maas_runtime import errors
from maas_runtime.peers import PeerChannel, PeerTransport
from maas_runtime.registry_client import RegistryClient
from maas_runtime.tls import channel_credentials, server_credentials

from tests.support.tls import make_certificates

ARTIFACT = b"model bytes " * 50_000  # several chunks
VERSION_NAME = "models/m/versions/1"


def recorded_version(content: bytes = ARTIFACT) -> dict:
    return {"name": VERSION_NAME, "artifact": {"sha256": hashlib.sha256(content).hexdigest(),
                                               "size_bytes": str(len(content))}}


class RegistryStandIn(registry_service_pb2_grpc.RegistryServiceServicer):
    """Serves `served` in 64 KiB chunks; with `stall_after_first_chunk` it then hangs."""

    def __init__(self) -> None:
        self.served = ARTIFACT
        self.stall_after_first_chunk = False
        self.stall_unary = False
        self.first_chunk_sent = asyncio.Event()

    async def GetModelVersion(self, request, context):
        if self.stall_unary:
            await asyncio.sleep(3600)
        return model_pb2.ModelVersion(name=request.name, artifact=artifact_pb2.ArtifactInfo(
            sha256=hashlib.sha256(self.served).hexdigest(), size_bytes=len(self.served)))

    async def DownloadModelVersion(self, request, context):
        for start in range(0, len(self.served), 64 * 1024):
            yield rs.DownloadModelVersionResponse(chunk=self.served[start:start + 64 * 1024])
            self.first_chunk_sent.set()
            if self.stall_after_first_chunk:
                await asyncio.sleep(3600)


async def start_server(servicer, credentials: grpc.ServerCredentials | None = None):
    server = grpc.aio.server()
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    return server, port


@pytest_asyncio.fixture
async def stand_in():
    servicer = RegistryStandIn()
    server, port = await start_server(servicer)
    yield servicer, port
    await server.stop(0)


async def opened_client(port: int, *, timeout_seconds: float = 30.0,
                        transport: PeerTransport | None = None) -> RegistryClient:
    client = RegistryClient(PeerChannel("registry", target=f"127.0.0.1:{port}",
                                        transport=transport),
                            timeout_seconds=timeout_seconds)
    await client.open()
    return client


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_a_verified_download_lands_whole_at_the_destination_and_nothing_else(
        stand_in, tmp_path):
    _, port = stand_in
    client = await opened_client(port)
    try:
        await client.download_model_version(recorded_version(), tmp_path / "artifact")
    finally:
        await client.close()
    assert (tmp_path / "artifact").read_bytes() == ARTIFACT
    assert files_in(tmp_path) == ["artifact"]


async def test_corrupt_bytes_are_refused_with_both_digests_and_leave_no_file(stand_in, tmp_path):
    servicer, port = stand_in
    servicer.served = ARTIFACT[:-1] + b"X"  # same size, one byte flipped
    client = await opened_client(port)
    try:
        with pytest.raises(errors.FailedPrecondition) as caught:
            await client.download_model_version(recorded_version(), tmp_path / "artifact")
    finally:
        await client.close()
    assert caught.value.reason == "ARTIFACT_CORRUPT"
    assert hashlib.sha256(ARTIFACT).hexdigest() in caught.value.message
    assert hashlib.sha256(servicer.served).hexdigest() in caught.value.message
    assert files_in(tmp_path) == []


async def test_more_bytes_than_recorded_are_refused_and_leave_no_file(stand_in, tmp_path):
    servicer, port = stand_in
    servicer.served = ARTIFACT + b"trailing garbage"
    client = await opened_client(port)
    try:
        with pytest.raises(errors.FailedPrecondition, match="bytes recorded"):
            await client.download_model_version(recorded_version(), tmp_path / "artifact")
    finally:
        await client.close()
    assert files_in(tmp_path) == []


async def test_an_existing_destination_survives_a_failed_download(stand_in, tmp_path):
    servicer, port = stand_in
    (tmp_path / "artifact").write_bytes(b"the good copy")
    servicer.served = b"not it"
    client = await opened_client(port)
    try:
        with pytest.raises(errors.FailedPrecondition):
            await client.download_model_version(recorded_version(), tmp_path / "artifact")
    finally:
        await client.close()
    assert (tmp_path / "artifact").read_bytes() == b"the good copy"
    assert files_in(tmp_path) == ["artifact"]


async def test_a_download_cancelled_midway_leaves_nothing_behind(stand_in, tmp_path):
    servicer, port = stand_in
    servicer.stall_after_first_chunk = True
    client = await opened_client(port)
    try:
        download = asyncio.create_task(
            client.download_model_version(recorded_version(), tmp_path / "artifact"))
        await asyncio.wait_for(servicer.first_chunk_sent.wait(), 10)
        deadline = time.monotonic() + 10
        while not any(name.endswith(".part") for name in files_in(tmp_path)):
            assert time.monotonic() < deadline, "the download never started writing"
            await asyncio.sleep(0.01)
        download.cancel()
        with pytest.raises(asyncio.CancelledError):
            await download
    finally:
        await client.close()
    assert files_in(tmp_path) == []


async def test_a_stalled_download_ends_at_the_deadline_and_leaves_nothing(stand_in, tmp_path):
    servicer, port = stand_in
    servicer.stall_after_first_chunk = True
    client = await opened_client(port, timeout_seconds=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(errors.DeadlineExceeded):
            await client.download_model_version(recorded_version(), tmp_path / "artifact")
    finally:
        await client.close()
    assert time.monotonic() - started < 5
    assert files_in(tmp_path) == []


async def test_a_stalled_lookup_ends_at_the_deadline(stand_in):
    servicer, port = stand_in
    servicer.stall_unary = True
    client = await opened_client(port, timeout_seconds=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(errors.DeadlineExceeded):
            await client.resolve("models/m@production")
    finally:
        await client.close()
    assert time.monotonic() - started < 5


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def tls_transport(certs: Path, *, client_certificate: bool) -> PeerTransport:
    credentials = (channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")
                   if client_certificate else channel_credentials(certs / "ca.pem"))
    return PeerTransport(credentials, mutual=client_certificate,
                         settings_prefix="MAAS_TRAINER_")


async def test_a_plaintext_peer_of_a_tls_registry_is_told_to_use_tls(certificates):
    server, port = await start_server(RegistryStandIn(), server_credentials(
        certificates / "server.pem", certificates / "server.key"))
    try:
        plaintext = await opened_client(port, timeout_seconds=5, transport=PeerTransport(
            settings_prefix="MAAS_TRAINER_"))
        try:
            with pytest.raises(errors.Unavailable) as caught:
                await plaintext.resolve("models/m@production")
        finally:
            await plaintext.close()
        with_tls = await opened_client(port, transport=tls_transport(
            certificates, client_certificate=False))
        try:
            assert (await with_tls.resolve("models/m@production"))["name"] == "models/m@production"
        finally:
            await with_tls.close()
    finally:
        await server.stop(0)
    message = caught.value.message
    assert "over plaintext" in message and "TLS" in message
    assert "MAAS_TRAINER_PEER_TLS_CA_FILE" in message


async def test_mutual_tls_needs_the_client_certificate_and_says_so(certificates):
    server, port = await start_server(RegistryStandIn(), server_credentials(
        certificates / "server.pem", certificates / "server.key", certificates / "ca.pem"))
    try:
        without = await opened_client(port, timeout_seconds=5, transport=tls_transport(
            certificates, client_certificate=False))
        try:
            with pytest.raises(errors.Unavailable) as caught:
                await without.resolve("models/m@production")
        finally:
            await without.close()
        mutual = await opened_client(port, transport=tls_transport(
            certificates, client_certificate=True))
        try:
            await mutual.resolve("models/m@production")
        finally:
            await mutual.close()
    finally:
        await server.stop(0)
    assert "over TLS" in caught.value.message
    assert "client certificate" in caught.value.message
