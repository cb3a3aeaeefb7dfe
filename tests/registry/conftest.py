"""Fixtures: a real registry gRPC server on port 0, over SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import pytest
from maas.registry.v1 import registry_service_pb2_grpc
from maas_registry.server import build_server
from maas_registry.settings import RegistrySettings
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel

from tests.support.postgres import backend_url_fixture

database_url = backend_url_fixture()  # "" for SQLite: the default, in the state directory


class RegistryClient:
    """Stubs for the admin and for extra principals, closed at teardown."""

    def __init__(self, target: str, settings: RegistrySettings):
        self.target = target
        self.settings = settings
        self._channels = []
        self.admin = self.as_token((settings.state_dir / "admin.token").read_text().strip())

    def as_token(self, token: str):
        channel = open_channel(self.target, token=token, max_message_bytes=64 * 1024 * 1024)
        self._channels.append(channel)
        return registry_service_pb2_grpc.RegistryServiceStub(channel)

    def as_role(self, principal: str, role: Role, models=()):
        return self.as_token(add_token(self.settings.resolved_tokens_file, principal, role, models))

    async def close(self):
        for channel in self._channels:
            await channel.close()


@pytest.fixture
async def registry(tmp_path, database_url):
    settings = RegistrySettings(state_dir=tmp_path / "state", port=0, database_url=database_url,
                                max_artifact_bytes=4 * 1024 * 1024, gc_grace_seconds=0,
                                event_poll_seconds=0.1, max_message_bytes=8 * 1024 * 1024)
    server = build_server(settings)
    port = await server.start()
    client = RegistryClient(f"127.0.0.1:{port}", settings)
    yield client
    await client.close()
    await server.stop(0)
