"""What a running local suite leaves in its state directory: a lock and `suite.json`.

`suite.lock` is held (`flock`) for as long as a suite runs on the directory, so a second
`maas up` (or `maas demo`) on it refuses at once, naming the pid that holds it, instead of
fighting the first over ports and files; the kernel drops the lock when that process dies,
so a crash never leaves a stale lock behind. `suite.json` records the pid, every service's
target and the TLS files clients need: `maas.Client()` and the CLI connect from it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

LOCK_FILE = "suite.lock"
SUITE_FILE = "suite.json"


class SuiteAlreadyRunning(RuntimeError):
    """Another process runs a suite on this state directory."""


class SuiteLock:
    """The exclusive right to run a suite on `root`, held until `release`."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SuiteAlreadyRunning(
                f"a suite is already running on {self.path.parent} (pid {holder}); stop it "
                "first (Ctrl-C where it runs) or pass another --state-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def write_suite_file(root: Path, endpoints: dict[str, str], tls: dict[str, str] | None) -> Path:
    """Record the running suite for clients: pid, service → target, TLS client files."""
    path = root / SUITE_FILE
    document: dict[str, Any] = {"pid": os.getpid(), "endpoints": endpoints}
    if tls:
        document["tls"] = tls
    temporary = path.with_name(f".{SUITE_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def remove_suite_file(root: Path) -> None:
    (root / SUITE_FILE).unlink(missing_ok=True)
