"""One running suite (`maas up` in a subprocess) and one client shared by the SDK tests."""

from __future__ import annotations

from tests.support.cli_suite import running_suite_fixture, suite_client_fixture

suite = running_suite_fixture("sdk")
client = suite_client_fixture()
