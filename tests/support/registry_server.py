"""A real registry gRPC server started in this process on port 0, for tests that need a
registry without a subprocess."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

from maas_registry.server import build_server
from maas_registry.settings import RegistrySettings


class ServedRegistry(NamedTuple):
    """Where the registry answers and its admin token."""

    target: str
    token: str


@contextlib.asynccontextmanager
async def registry_in_process(root: Path, port: int = 0) -> AsyncIterator[ServedRegistry]:
    """A registry with its state in `root`/registry, stopped on exit. Started again on the
    same `root` and a fixed `port`, it is the same registry back after an outage."""
    server = build_server(RegistrySettings(state_dir=root / "registry", port=port))
    port = await server.start()
    try:
        yield ServedRegistry(f"127.0.0.1:{port}",
                             (root / "registry" / "admin.token").read_text().strip())
    finally:
        await server.stop(0)
