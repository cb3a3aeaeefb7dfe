"""Fixtures: a real registry gRPC server on port 0, over SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import pytest
from maas.registry.v1 import registry_service_pb2_grpc
from maas_registry.server import build_server
from maas_registry.settings import RegistrySettings
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel

from tests.registry.helpers import fresh_postgres_database, postgres_admin_url


def _postgres_reachable() -> str | None:
    url = postgres_admin_url()
    if not url:
        return "MAAS_TEST_POSTGRES_URL is not set (.ci/run sets it to the machine's PostgreSQL)"
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # any connection failure means: not here
        return f"PostgreSQL at MAAS_TEST_POSTGRES_URL is unreachable: {exc.__class__.__name__}"
    return None


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield ""  # the default: SQLite in the state directory
        return
    reason = _postgres_reachable()
    if reason:
        pytest.skip(reason)
    with fresh_postgres_database() as url:
        yield url


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
