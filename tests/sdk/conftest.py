"""One running suite (`maas up` in a subprocess) and one client shared by the SDK tests."""

from __future__ import annotations

import pytest

from tests.support.cli_suite import RunningSuite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    running = RunningSuite(tmp_path_factory.mktemp("sdk") / "suite").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(suite):
    import maas

    with maas.Client(state_dir=suite.state_dir) as connected:
        yield connected
