"""One OS process per job: start it, forward its progress, stop it.

Each job runs in its own session (process group), so a crashing, leaking or hanging job can
take nothing down but itself, and stopping it reaches every process it started. Its stdout
carries the progress protocol (`maas_jobs.progress`); everything it prints, protocol or not,
is also appended to the job's log file.

The job manager starts jobs through a `JobLauncher`: `ProcessLauncher` (this module, the
default) or `maas_jobs.kubernetes_executor.KubernetesJobLauncher` (jobs as Kubernetes Jobs);
either hands back a `StartedJob` it forwards, waits for and stops the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from maas_jobs.progress import WATCH_PARENT_ENV, parse_progress_line
from maas_jobs.records import JobError, JobRecord, LogLevel

_log = logging.getLogger(__name__)
_LINE_LIMIT = 1024 * 1024
_KILLED_WAIT_SECONDS = 10.0
"""How long `JobProcess.stop` waits for a job to be seen ending after SIGKILL."""


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a job's process."""

    argv: list[str]
    cwd: Path
    log_path: Path
    """Every line the process writes is appended here (the full log; events get a sample)."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the service's environment."""


@dataclass(frozen=True)
class ProcessOutcome:
    """How a job process ended."""

    returncode: int
    reported_error: JobError | None
    """The last error the process reported over the protocol before exiting."""
    stopped: bool
    """True when `JobProcess.stop` ended it (cancel or service shutdown)."""

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.stopped

    def describe_exit(self) -> str:
        if self.returncode < 0:
            try:
                return f"was killed by signal {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"was killed by signal {-self.returncode}"
        return f"exited with status {self.returncode}"


class ProgressSink(Protocol):
    """Where a job's progress goes (the manager writes it to the job's event log)."""

    async def metrics(self, epoch: int, phase: str, values: dict[str, float]) -> None: ...

    async def log(self, level: LogLevel, message: str) -> None: ...


class ProgressForwarder:
    """Turns a job's output lines into progress: protocol lines become metrics, log events
    and the reported error; other lines become log events, up to a limit (libraries can print
    a lot: the event log keeps a sample, the job's log file keeps everything).

    Shared by every executor: a local process's pipes and a cluster pod's log stream alike.
    """

    def __init__(self, sink: ProgressSink, log_name: str, max_plain_log_lines: int) -> None:
        self._sink = sink
        self._log_name = log_name
        self._plain_lines_left = max_plain_log_lines
        self.reported_error: JobError | None = None
        """The last error the job reported over the protocol."""

    async def line(self, line: str, plain_level: LogLevel = LogLevel.INFO) -> None:
        """Forward one line (without its newline)."""
        message = parse_progress_line(line)
        try:
            if message is None:
                await self._forward_plain(plain_level, line)
            elif message.type == "metrics":
                payload = message.payload
                await self._sink.metrics(int(payload.get("epoch", 0)), str(payload.get("phase", "")),
                                         {str(k): float(v) for k, v in payload.get("values", {}).items()})
            elif message.type == "log":
                level = message.payload.get("level", "INFO")
                await self._sink.log(LogLevel(level) if level in LogLevel.__members__ else LogLevel.INFO,
                                     str(message.payload.get("message", "")))
            else:
                self.reported_error = JobError(str(message.payload.get("code", "INTERNAL")),
                                               str(message.payload.get("message", "")))
        except (TypeError, ValueError, AttributeError):
            await self._forward_plain(plain_level, line)

    async def _forward_plain(self, level: LogLevel, line: str) -> None:
        if not line.strip() or self._plain_lines_left < 0:
            return
        self._plain_lines_left -= 1
        if self._plain_lines_left < 0:
            await self._sink.log(LogLevel.WARNING, f"further output only in {self._log_name}")
            return
        await self._sink.log(level, line)


class JobProcess:
    """A started job process."""

    def __init__(self, process: asyncio.subprocess.Process, launch: LaunchSpec,
                 max_plain_log_lines: int) -> None:
        if process.stdout is None or process.stderr is None:
            raise ValueError("a job process is started with piped stdout and stderr")
        self._process = process
        self._stdout, self._stderr = process.stdout, process.stderr
        self._launch = launch
        self._max_plain_log_lines = max_plain_log_lines
        self.stopped = False

    @classmethod
    async def start(cls, launch: LaunchSpec, *, max_plain_log_lines: int = 200) -> JobProcess:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        process = await asyncio.create_subprocess_exec(
            *launch.argv, cwd=launch.cwd, env={**os.environ, **launch.env, WATCH_PARENT_ENV: "1"},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=_LINE_LIMIT)
        return cls(process, launch, max_plain_log_lines)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exited(self) -> bool:
        return self._process.returncode is not None

    async def wait_and_forward(self, sink: ProgressSink) -> ProcessOutcome:
        """Forward progress until the process exits; then reap what is left of its group."""
        forwarder = ProgressForwarder(sink, self._launch.log_path.name, self._max_plain_log_lines)
        with self._launch.log_path.open("a", encoding="utf-8", errors="replace") as log_file:
            await asyncio.gather(
                self._forward(self._stdout, forwarder, log_file, LogLevel.INFO),
                self._forward(self._stderr, forwarder, log_file, LogLevel.WARNING))
        returncode = await self._process.wait()
        self._kill_group(signal.SIGKILL)  # helpers the job left behind
        return ProcessOutcome(returncode, forwarder.reported_error, self.stopped)

    @staticmethod
    async def _forward(stream: asyncio.StreamReader, forwarder: ProgressForwarder, log_file: IO[str],
                       plain_level: LogLevel) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line beyond the limit: keep its head, drop the rest
                raw = await stream.read(_LINE_LIMIT)
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            log_file.write(line + "\n")
            log_file.flush()
            await forwarder.line(line, plain_level)

    async def stop(self, grace_seconds: float) -> None:
        """End the job: close its stdin (its parent watch fires), SIGTERM, then SIGKILL.

        Returns at the latest `_KILLED_WAIT_SECONDS` after the SIGKILL, saying so in the log:
        asyncio sees a process end only once its pipes are closed too, and a process outside
        the job's group (beyond the reach of the signals) may still hold them.
        """
        self.stopped = True
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._kill_group(signal.SIGTERM)
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that
        # arrives in the loop turn the process ends, and our caller would go on uncancelled.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_seconds):
                await self._process.wait()
                return
        self._kill_group(signal.SIGKILL)
        try:
            async with asyncio.timeout(_KILLED_WAIT_SECONDS):
                await self._process.wait()
        except TimeoutError:
            _log.error("job process %d (%s) was killed %.0f s ago but its output pipes are "
                       "still open (held by a process outside its group?); no longer waiting",
                       self.pid, "exited" if self.exited else "not reaped yet",
                       _KILLED_WAIT_SECONDS)

    def _kill_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)


class StartedJob(Protocol):
    """What the job manager holds of a running job, whichever executor started it."""

    @property
    def pid(self) -> int: ...

    @property
    def exited(self) -> bool: ...

    async def wait_and_forward(self, sink: ProgressSink) -> ProcessOutcome: ...

    async def stop(self, grace_seconds: float) -> None: ...


class JobLauncher(Protocol):
    """Starts a prepared job: as a local process or on the cluster."""

    async def start(self, job: JobRecord, launch: LaunchSpec) -> StartedJob: ...


@dataclass(frozen=True)
class ProcessLauncher:
    """The default: every job is an OS process of the service (`JobProcess`)."""

    max_plain_log_lines: int = 200

    async def start(self, job: JobRecord, launch: LaunchSpec) -> StartedJob:
        return await JobProcess.start(launch, max_plain_log_lines=self.max_plain_log_lines)


def reap_stale_process(process_id: int | None, marker: str) -> bool:
    """Kill the process group a previous service instance left running, if it is still there.

    `marker` (the job's working directory) must be one of the process's arguments, exactly
    (`jobs/j1` is not `jobs/j10`), so a recycled pid that now belongs to something else is
    never touched.
    """
    if not process_id:
        return False
    try:
        arguments = Path(f"/proc/{process_id}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if marker.encode() not in arguments:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process_id, signal.SIGKILL)
        _log.warning("killed job process group %d left over from a previous run", process_id)
    return True
