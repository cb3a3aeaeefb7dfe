"""The line protocol between a job process and the service that runs it.

A job process reports on its stdout, one JSON object per line behind a fixed prefix:

    @maas-job {"type": "metrics", "epoch": 3, "phase": "train", "values": {"loss": 0.2}}
    @maas-job {"type": "log", "level": "INFO", "message": "resumed from epoch 3"}
    @maas-job {"type": "error", "code": "FAILED_PRECONDITION", "message": "..."}

Stdout is the channel (not a dedicated pipe) because torchrun's worker processes inherit
exactly stdin, stdout and stderr from the launcher; any other descriptor would be closed.
Lines without the prefix (a library printing) are kept as plain log lines by the executor.

The service holds the write end of the job's stdin. `exit_when_parent_dies` makes the job
kill itself when that pipe reaches end-of-file, i.e. when the service died (even by kill -9)
or cancelled it: a job never outlives the service that would forward its progress.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

from maas_jobs.records import LogLevel

PROGRESS_PREFIX = "@maas-job "
WATCH_PARENT_ENV = "MAAS_JOB_WATCH_PARENT"
"""Set to "1" by the executor: stdin is a pipe from the service, EOF means it is gone."""
MAX_MESSAGE_CHARS = 4000


@dataclass(frozen=True)
class ProgressMessage:
    """One decoded progress line."""

    type: str
    """"metrics", "log" or "error"."""
    payload: dict[str, Any]


def parse_progress_line(line: str) -> ProgressMessage | None:
    """The message on `line`, or None for a line that is not (valid) protocol."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        document = json.loads(line[len(PROGRESS_PREFIX):])
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("type") not in ("metrics", "log", "error"):
        return None
    return ProgressMessage(document.pop("type"), document)


class ProgressReporter:
    """Writes progress lines; only one process of a distributed job should have `enabled`."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream or sys.stdout
        self._enabled = enabled
        self._lock = threading.Lock()

    def _emit(self, document: dict[str, Any]) -> None:
        if not self._enabled:
            return
        line = PROGRESS_PREFIX + json.dumps(document, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def metrics(self, epoch: int, phase: str, values: dict[str, float]) -> None:
        """Report finite metric values (NaN and infinities cannot travel as JSON numbers)."""
        finite = {name: float(value) for name, value in values.items() if math.isfinite(value)}
        self._emit({"type": "metrics", "epoch": epoch, "phase": phase, "values": finite})

    def log(self, level: LogLevel | str, message: str) -> None:
        self._emit({"type": "log", "level": LogLevel(level).value,
                    "message": message[:MAX_MESSAGE_CHARS]})

    def error(self, code: str, message: str) -> None:
        """Say why the process is about to exit unsuccessfully; the job fails with this."""
        self._emit({"type": "error", "code": code, "message": message[:MAX_MESSAGE_CHARS]})


def exit_when_parent_dies() -> None:
    """Watch stdin in a daemon thread and kill this process (group) on end-of-file.

    Does nothing unless the executor set `WATCH_PARENT_ENV`, so running a job entry point by
    hand from a shell (stdin a terminal, or /dev/null) never kills anything.
    """
    if os.environ.get(WATCH_PARENT_ENV) != "1":
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        # Only a process group leader takes its group along (torchrun workers lead their own
        # sessions); anything else ends just itself.
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
