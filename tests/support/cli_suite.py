"""The whole suite as a user starts it, `maas --state-dir DIR up` in a subprocess, for the SDK
and CLI tests: they find it as users do, through the `suite.json` it records in DIR."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAAS = [sys.executable, "-m", "maas_cli.main"]


class RunningSuite:
    """`maas up` on `state_dir` until `stop`; `env` points clients at it (MAAS_STATE_DIR)."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.log = state_dir.parent / f"{state_dir.name}-up.log"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "MAAS_STATE_DIR": str(self.state_dir), "MAAS_TOKEN": "",
                "MAAS_TARGET": ""}

    @property
    def endpoints(self) -> dict[str, str]:
        return json.loads((self.state_dir / "suite.json").read_text())["endpoints"]

    def start(self, timeout: float = 240) -> RunningSuite:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([*MAAS, "--state-dir", str(self.state_dir), "up"],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (self.state_dir / "suite.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"maas up did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def running_suite_fixture(name: str):
    """A module-scoped `suite` fixture: one `RunningSuite` in a temporary directory `name`."""

    @pytest.fixture(scope="module")
    def suite(tmp_path_factory):
        running = RunningSuite(tmp_path_factory.mktemp(name) / "suite").start()
        yield running
        running.stop()

    return suite


def suite_client_fixture():
    """A module-scoped `client` fixture: one SDK client of the module's `suite`."""

    @pytest.fixture(scope="module")
    def client(suite):
        import maas

        with maas.Client(state_dir=suite.state_dir) as connected:
            yield connected

    return client


def maas_cli_fixture():
    """A `maas` fixture: runs `maas ARGS` in-process (typer's CliRunner) against the module's
    `suite`, asserting the exit code (`code=`, default 0) and that no traceback was printed;
    returns the finished result, and `maas.json(ARGS)` parses its --json output."""

    @pytest.fixture
    def maas(suite, monkeypatch):
        from maas_cli.main import app
        from typer.testing import CliRunner

        monkeypatch.setenv("MAAS_STATE_DIR", str(suite.state_dir))
        for name in ("MAAS_TOKEN", "MAAS_TARGET"):
            monkeypatch.delenv(name, raising=False)
        runner = CliRunner()

        def run(*args: str, code: int = 0):
            result = runner.invoke(app, list(args), prog_name="maas")
            assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
            assert "Traceback" not in result.stdout + result.stderr
            return result

        def as_json(*args: str):
            return json.loads(run(*args).stdout)

        run.json = as_json  # type: ignore[attr-defined]
        return run

    return maas
