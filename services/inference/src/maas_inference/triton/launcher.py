"""Triton Inference Server lifecycle: the bundled local process, a remote server, a supervisor.

Locally the suite runs the `tritonserver` binary that ships inside the `nvidia-pytriton`
wheel. Started directly (not through pytriton), it needs three things the wheel does not
arrange by itself:

* `LD_LIBRARY_PATH` holding the running interpreter's libpython directory (sysconfig
  `LIBDIR`) — otherwise the Python-backend stub links against some other libpython and
  fails — and the wheel's `nvidia_pytriton.libs` (CUDA runtime stubs, libtritonserver);
* a backend directory whose `python/` folder holds the backend library, its
  `triton_python_backend_utils.py` and the `triton_python_backend_stub` built for *this*
  Python version (the wheel keeps one stub per version in `python_backend_stubs/`); pytriton
  itself copies these into a workspace and passes `--backend-directory`, as done here;
* `PATH` starting with this environment's `bin` directory: the embedded interpreter of the
  stub locates its `sys.prefix` (and so the venv's site-packages with torch) by finding
  `python` on `PATH`.

`TritonServerProcess` and `RemoteTriton` share the `TritonServer` interface, so the
`TritonSupervisor` (restart on death, `on_restart` reload callback, readiness event) and the
rest of the service use the same code against either.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import enum
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maas_runtime.errors import FailedPrecondition, Unavailable
from maas_runtime.peers import PeerTransport
from tritonclient.utils import InferenceServerException

from maas_inference.triton.client import control_client
from maas_inference.triton.lockdown import new_control_key, redacted, restricted_protocol_args

logger = logging.getLogger(__name__)

PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
PYTHON_BACKEND_STUB = "triton_python_backend_stub"
LOG_TAIL_LINES = 30
# Probes must notice a fresh listener quickly; gRPC's default reconnect backoff starts at 1 s.
_PROBE_CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.use_local_subchannel_pool", 1),
]
# tritonserver's words when a listener cannot bind: "Socket '127.0.0.1:8001' already in use".
_PORT_IN_USE_PATTERN = re.compile(r"'[^']*:(\d+)' already in use")
START_ATTEMPTS = 3


class TritonStartError(Unavailable):
    """Triton did not become ready; the message carries the tail of its log."""


@dataclass(frozen=True)
class BundledTriton:
    """The Triton distribution inside the installed `nvidia-pytriton` wheel."""

    package_dir: Path
    """The `pytriton` package directory in site-packages."""

    @classmethod
    def locate(cls) -> BundledTriton:
        # find_spec reads the location without executing pytriton's __init__ (which
        # configures third-party loggers as a side effect).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise FailedPrecondition("nvidia-pytriton is not installed: no bundled tritonserver",
                                     reason="TRITON_BINARY_MISSING")
        return cls(Path(next(iter(spec.submodule_search_locations))))

    @property
    def distribution_dir(self) -> Path:
        return self.package_dir / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.distribution_dir / "bin" / "tritonserver"

    @property
    def python_backend_dir(self) -> Path:
        return self.distribution_dir / "backends" / "python"

    @property
    def caches_dir(self) -> Path:
        return self.distribution_dir / "caches"

    @property
    def shared_libraries_dir(self) -> Path:
        """`nvidia_pytriton.libs`, the auditwheel-vendored libraries next to the package."""
        return self.package_dir.parent / "nvidia_pytriton.libs"

    def python_backend_stub(self, python_version: str) -> Path:
        return self.distribution_dir / "python_backend_stubs" / python_version / PYTHON_BACKEND_STUB


def running_python_version() -> str:
    """`major.minor` of this interpreter, the name of the stub folder that matches it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _prepend_path_list(entries: Sequence[str | os.PathLike[str]], existing: str | None) -> str:
    parts = [os.fspath(entry) for entry in entries if entry]
    if existing:
        parts.append(existing)
    return os.pathsep.join(parts)


def triton_environment(bundle: BundledTriton, base_environment: Mapping[str, str]) -> dict[str, str]:
    """The environment `tritonserver` and its Python-backend stubs need (see module doc).

    The stubs run this interpreter's Python version in this interpreter's environment: the
    stub binary, libpython and site-packages all come from the running service.
    """
    environment = dict(base_environment)
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    environment["LD_LIBRARY_PATH"] = _prepend_path_list(
        [libpython_dir, bundle.shared_libraries_dir], environment.get("LD_LIBRARY_PATH")
    )
    # Not resolved: a venv's bin/python is a symlink, and the venv is what must be found.
    environment["PATH"] = _prepend_path_list([Path(sys.executable).parent], environment.get("PATH"))
    return environment


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.exists():
        source_stat, target_stat = source.stat(), target.stat()
        if (source_stat.st_size, int(source_stat.st_mtime)) == (
            target_stat.st_size,
            int(target_stat.st_mtime),
        ):
            return
    # Copy beside, then rename: a stub still running from the old file keeps its inode.
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def prepare_backend_directory(
    bundle: BundledTriton, backends_dir: Path, *, python_version: str | None = None
) -> Path:
    """Fills `<backends_dir>/python/` with the backend and this Python's stub; returns it.

    This is what pytriton does with its workspace: the stub for the running interpreter sits
    next to `libtriton_python.so`, where the backend looks for it.
    """
    version = python_version or running_python_version()
    stub = bundle.python_backend_stub(version)
    if not stub.is_file():
        raise FailedPrecondition(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})",
                                 reason="PYTHON_BACKEND_STUB_MISSING")
    target = backends_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        _copy_if_changed(bundle.python_backend_dir / name, target / name)
    _copy_if_changed(stub, target / PYTHON_BACKEND_STUB)
    return backends_dir


def pick_free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free right now on `host` (they may be taken before use)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((host, 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@dataclass(frozen=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int


class TritonServer(abc.ABC):
    """A Triton the service can use: where to reach it, where its models live, is it up."""

    @property
    @abc.abstractmethod
    def grpc_url(self) -> str:
        """`host:port` of the KServe-v2 gRPC endpoint."""

    @property
    @abc.abstractmethod
    def model_repository(self) -> Path:
        """The directory Triton loads models from, as this process sees it."""

    @property
    @abc.abstractmethod
    def is_running(self) -> bool:
        """Whether the server is believed up right now."""

    @property
    def control_key(self) -> str:
        """The key that opens Triton's administrative protocols (`lockdown`); empty: none."""
        return ""

    @property
    def transport(self) -> PeerTransport:
        """How the service dials it: plaintext, or TLS/mTLS from the `peer_tls_*` settings."""
        return PeerTransport()

    @abc.abstractmethod
    async def start(self) -> None:
        """Returns once the server answers ServerReady; raises `TritonStartError` otherwise."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Releases the server (a local process is terminated)."""

    @abc.abstractmethod
    async def wait_until_down(self) -> None:
        """Returns when the server has gone away; its loaded models are then lost."""


async def _probe_until_ready(grpc_url: str, probe_interval_seconds: float,
                             transport: PeerTransport) -> None:
    async with control_client(grpc_url, transport, _PROBE_CHANNEL_ARGS) as client:
        while True:
            with contextlib.suppress(InferenceServerException):
                if await client.is_server_ready(client_timeout=1.0):
                    return
            await asyncio.sleep(probe_interval_seconds)


async def wait_for_server_ready(
    grpc_url: str,
    timeout_seconds: float,
    *,
    gave_up: asyncio.Future | None = None,
    probe_interval_seconds: float = 0.05,
    transport: PeerTransport | None = None,
) -> bool:
    """True once ServerReady answers true; False after `timeout_seconds` or when `gave_up`
    (e.g. the process exiting) completes first."""
    probing = asyncio.ensure_future(
        _probe_until_ready(grpc_url, probe_interval_seconds, transport or PeerTransport()))
    waiters = {probing} if gave_up is None else {probing, gave_up}
    done, _ = await asyncio.wait(waiters, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
    if probing in done:
        return True
    probing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probing
    return False


@dataclass(frozen=True)
class TritonProcessConfig:
    """How the local `tritonserver` runs; built by the service from its settings."""

    state_dir: Path
    """Holds the backend directory and logs (`<state_dir>/backends`, `tritonserver.log`)."""

    model_repository: Path
    """The model repository the service writes and Triton loads from."""

    host: str = "127.0.0.1"
    """Address every endpoint binds to; loopback keeps Triton behind the gateway."""

    grpc_port: int = 0
    """Fixed gRPC port, or 0 to pick a free one at the first start."""

    http_port: int = 0
    """Fixed HTTP port, or 0 to pick a free one at the first start."""

    metrics_port: int = 0
    """Fixed metrics port, or 0 to pick a free one at the first start."""

    allow_http: bool = False
    """Open Triton's HTTP endpoint too (loopback, restricted like gRPC); off by default: the
    gateway is the way in."""

    control_key: str = ""
    """The key Triton's administrative protocols demand (`lockdown`); empty makes a random
    one for this `TritonServerProcess`, kept across its restarts."""

    startup_timeout_seconds: float = 60.0
    """How long a start may take until ServerReady answers true."""

    stop_timeout_seconds: float = 15.0
    """After SIGTERM, how long to wait before SIGKILL."""

    exit_timeout_seconds: int = 5
    """`--exit-timeout-secs`: how long Triton lets in-flight requests finish on SIGTERM."""

    log_verbose: int = 0
    """`--log-verbose` level."""

    extra_args: tuple[str, ...] = ()
    """More `tritonserver` flags, appended last."""

    client_transport: PeerTransport = PeerTransport()
    """How the service dials it: plaintext on loopback, TLS when `extra_args` make it serve
    TLS (`--grpc-use-ssl`)."""

    environment: Mapping[str, str] | None = None
    """Base environment; the service's own when None."""


_PR_SET_PDEATHSIG = 1


def _parent_death_signal_setter() -> Callable[[], None]:
    """A preexec function: if the service dies (even by SIGKILL), the kernel sends Triton
    SIGTERM instead of leaving it orphaned on its ports (pytriton does the same)."""
    # Resolved here, in the parent: between fork and exec the child should only make the call.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_parent_death_signal


class TritonServerProcess(TritonServer):
    """Runs the wheel's `tritonserver` as a child process in explicit model-control mode.

    Ports are chosen at the first start and reused by later starts, so a restarted server
    answers at the same URL (new ones are picked only if a port got taken meanwhile). Each
    start runs in its own process group so the Python-backend stubs it spawns can be
    cleaned up with it, and gets its own shared-memory prefix so regions a killed server
    leaves in /dev/shm can be removed.
    """

    def __init__(self, config: TritonProcessConfig, *, bundle: BundledTriton | None = None):
        self._config = config
        self._bundle = bundle
        self._process: asyncio.subprocess.Process | None = None
        self._ports: TritonPorts | None = None
        self._shm_prefix = ""
        self._cleaned_up_pid: int | None = None
        self._control_key = config.control_key or new_control_key()
        self.start_count = 0

    @property
    def config(self) -> TritonProcessConfig:
        return self._config

    @property
    def log_file(self) -> Path:
        return self._config.state_dir / "tritonserver.log"

    @property
    def ports(self) -> TritonPorts:
        if self._ports is None:
            raise FailedPrecondition("tritonserver has not been started", reason="TRITON_NOT_STARTED")
        return self._ports

    @property
    def grpc_url(self) -> str:
        return f"{self._config.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self._config.host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._config.host}:{self.ports.metrics}/metrics"

    @property
    def model_repository(self) -> Path:
        return self._config.model_repository

    @property
    def control_key(self) -> str:
        return self._control_key

    @property
    def transport(self) -> PeerTransport:
        return self._config.client_transport

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def shm_region_prefix(self) -> str:
        """Names of this start's Python-backend shared-memory regions in /dev/shm begin so."""
        return self._shm_prefix

    def command_line(self) -> list[str]:
        """The full `tritonserver` invocation for the current ports (for the log and tests)."""
        bundle = self._bundle or BundledTriton.locate()
        ports = self.ports
        host = self._config.host
        return [
            os.fspath(bundle.binary),
            f"--model-repository={self._config.model_repository}",
            "--model-control-mode=explicit",
            # Ready means "able to serve", not "every model it ever saw is loaded": with strict
            # readiness an unloaded (deleted, rolled-out) model turns the server unready for good.
            "--strict-readiness=false",
            f"--backend-directory={self._config.state_dir / 'backends'}",
            f"--cache-directory={bundle.caches_dir}",
            f"--grpc-address={host}",
            f"--grpc-port={ports.grpc}",
            f"--http-address={host}",
            f"--http-port={ports.http}",
            f"--metrics-address={host}",
            f"--metrics-port={ports.metrics}",
            f"--allow-http={str(self._config.allow_http).lower()}",
            *restricted_protocol_args(self._control_key, http=self._config.allow_http),
            "--allow-metrics=true",
            f"--exit-timeout-secs={self._config.exit_timeout_seconds}",
            f"--log-verbose={self._config.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self._config.extra_args,
        ]

    def _choose_ports(self, *, fresh: bool) -> None:
        config = self._config
        wanted = (config.grpc_port, config.http_port, config.metrics_port)
        if self._ports is not None and not fresh:
            return
        free = iter(pick_free_ports(config.host, 3))
        self._ports = TritonPorts(*(port or next(free) for port in wanted))

    async def start(self) -> None:
        if self.is_running:
            raise FailedPrecondition(f"tritonserver is already running (pid {self.pid})",
                                     reason="TRITON_ALREADY_RUNNING")
        bundle = self._bundle = self._bundle or BundledTriton.locate()
        self._config.state_dir.mkdir(parents=True, exist_ok=True)
        self._config.model_repository.mkdir(parents=True, exist_ok=True)
        prepare_backend_directory(bundle, self._config.state_dir / "backends")
        self._choose_ports(fresh=False)
        for attempt in range(1, START_ATTEMPTS + 1):
            if await self._start_once(bundle):
                return
            # Only a picked port taken between picking and binding is worth another try;
            # a configured port stays what it is.
            taken = self._port_taken_according_to_log()
            if taken is None or taken in self._configured_ports() or attempt == START_ATTEMPTS:
                break
            logger.warning("port %d was taken; restarting tritonserver on new ports", taken)
            self._choose_ports(fresh=True)
        raise TritonStartError(
            f"tritonserver did not become ready; last log lines:\n{self.log_tail()}",
            metadata={"log_file": os.fspath(self.log_file)},
        )

    def _configured_ports(self) -> set[int]:
        config = self._config
        return {port for port in (config.grpc_port, config.http_port, config.metrics_port) if port}

    async def _start_once(self, bundle: BundledTriton) -> bool:
        config = self._config
        self._shm_prefix = f"maas-triton-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._rotate_log()
        command = self.command_line()
        environment = triton_environment(
            bundle, config.environment if config.environment is not None else os.environ
        )
        with self.log_file.open("ab") as log:
            shown = " ".join(redacted(command, self._control_key))
            log.write(f"# maas: starting {shown}\n".encode())
            log.flush()
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
                preexec_fn=_parent_death_signal_setter(),
            )
        self.start_count += 1
        logger.info("tritonserver started (pid %d, grpc %s)", self._process.pid, self.grpc_url)
        exited = asyncio.ensure_future(self._process.wait())
        try:
            ready = await wait_for_server_ready(self.grpc_url, config.startup_timeout_seconds,
                                                gave_up=exited, transport=config.client_transport)
        finally:
            if not exited.done():
                exited.cancel()
        if ready:
            return True
        await self._terminate()
        return False

    def _rotate_log(self) -> None:
        # Keep the previous run's log: after a crash it is the one worth reading.
        if self.log_file.exists():
            os.replace(self.log_file, self.log_file.with_name(self.log_file.name + ".1"))

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _port_taken_according_to_log(self) -> int | None:
        match = _PORT_IN_USE_PATTERN.search(self.log_tail(200))
        return int(match.group(1)) if match else None

    async def wait_until_down(self) -> None:
        if self._process is None:
            return
        await self._process.wait()
        self._clean_up_after_exit()

    async def stop(self) -> None:
        await self._terminate()

    async def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._config.stop_timeout_seconds):
                    await process.wait()
            except TimeoutError:
                logger.warning("tritonserver ignored SIGTERM; killing pid %d", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._clean_up_after_exit()

    def kill(self) -> None:
        """SIGKILL to the server alone, like a crash (tests and fault drills)."""
        if self._process is not None and self.is_running:
            os.kill(self._process.pid, signal.SIGKILL)

    def _clean_up_after_exit(self) -> None:
        process = self._process
        # Once per process, right after its exit: later its id (= process group id) could
        # belong to someone else.
        if process is None or self._cleaned_up_pid == process.pid:
            return
        self._cleaned_up_pid = process.pid
        # The process group is the server's own (start_new_session); after a crash its
        # Python-backend stubs may linger in it for a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*") if self._shm_prefix else ():
            with contextlib.suppress(FileNotFoundError):
                region.unlink()


class RemoteTriton(TritonServer):
    """An external Triton (a pod or sidecar) reached by URL, sharing a model repository path.

    No process to manage: `start` waits for readiness and `wait_until_down` watches
    ServerLive, so a supervisor notices a remote restart (which loses every loaded model)
    the same way it notices a local crash.
    """

    def __init__(
        self,
        grpc_url: str,
        model_repository: Path,
        *,
        startup_timeout_seconds: float = 60.0,
        probe_interval_seconds: float = 1.0,
        failures_before_down: int = 3,
        control_key: str = "",
        transport: PeerTransport | None = None,
    ) -> None:
        self._grpc_url = grpc_url
        self._control_key = control_key
        self._transport = transport or PeerTransport()
        self._model_repository = model_repository
        self._startup_timeout_seconds = startup_timeout_seconds
        self._probe_interval_seconds = probe_interval_seconds
        self._failures_before_down = failures_before_down
        self._running = False

    @property
    def grpc_url(self) -> str:
        return self._grpc_url

    @property
    def model_repository(self) -> Path:
        return self._model_repository

    @property
    def control_key(self) -> str:
        return self._control_key

    @property
    def transport(self) -> PeerTransport:
        return self._transport

    @property
    def is_running(self) -> bool:
        return self._running

    async def start(self) -> None:
        if not await wait_for_server_ready(self._grpc_url, self._startup_timeout_seconds,
                                           transport=self._transport):
            raise TritonStartError(
                f"remote Triton at {self._grpc_url} was not ready within {self._startup_timeout_seconds:g} s"
            )
        self._running = True

    async def stop(self) -> None:
        self._running = False

    async def wait_until_down(self) -> None:
        failures = 0
        async with control_client(self._grpc_url, self._transport, _PROBE_CHANNEL_ARGS) as client:
            while failures < self._failures_before_down:
                await asyncio.sleep(self._probe_interval_seconds)
                try:
                    live = await client.is_server_live(client_timeout=self._probe_interval_seconds)
                except InferenceServerException:
                    live = False
                failures = 0 if live else failures + 1
        self._running = False


class TritonHealth(enum.Enum):
    """What the supervisor knows about Triton; SERVING only once deployments are reloaded."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    SERVING = "SERVING"
    RESTARTING = "RESTARTING"


RestartCallback = Callable[[], Awaitable[None]]
HealthListener = Callable[[TritonHealth], None]


@dataclass
class _Backoff:
    initial_seconds: float
    maximum_seconds: float
    current_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.current_seconds = self.initial_seconds

    def next_delay(self) -> float:
        delay = self.current_seconds
        # Doubling from an immediate (0 s) first retry would stay at 0: start from 0.1 s.
        self.current_seconds = min(self.maximum_seconds, max(delay * 2, 0.1))
        return delay


class TritonSupervisor:
    """Keeps a `TritonServer` up: restarts it when it goes down, then reloads the models.

    `ready` is set while Triton serves and every deployment has been reloaded; it is clear
    during a restart, which is when the service's health must say NOT_SERVING. After each
    restart `on_restart()` is awaited before `ready` is set again: Triton comes back with no
    models loaded, and the service reloads every deployment there.
    """

    def __init__(
        self,
        server: TritonServer,
        *,
        on_restart: RestartCallback,
        on_health_change: HealthListener | None = None,
        initial_restart_delay_seconds: float = 0.0,
        max_restart_delay_seconds: float = 10.0,
    ) -> None:
        self.server = server
        self.ready = asyncio.Event()
        self.restart_count = 0
        self._on_restart = on_restart
        self._on_health_change = on_health_change
        self._backoff = _Backoff(initial_restart_delay_seconds, max_restart_delay_seconds)
        self._health = TritonHealth.STOPPED
        self._watcher: asyncio.Task | None = None

    @property
    def health(self) -> TritonHealth:
        return self._health

    def _set_health(self, health: TritonHealth) -> None:
        if health is self._health:
            return
        self._health = health
        if health is TritonHealth.SERVING:
            self.ready.set()
        else:
            self.ready.clear()
        if self._on_health_change is not None:
            self._on_health_change(health)

    async def start(self) -> None:
        """Starts the server (raising if it cannot) and begins watching it."""
        self._set_health(TritonHealth.STARTING)
        try:
            await self.server.start()
        except BaseException:
            self._set_health(TritonHealth.STOPPED)
            raise
        self._set_health(TritonHealth.SERVING)
        self._watcher = asyncio.create_task(self._watch(), name="triton-supervisor")

    async def stop(self) -> None:
        """Stops watching first, so the intentional stop is not taken for a crash."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.server.stop()
        self._set_health(TritonHealth.STOPPED)

    async def _watch(self) -> None:
        while True:
            await self.server.wait_until_down()
            logger.warning("Triton at %s went down; restarting", self.server.grpc_url)
            self._set_health(TritonHealth.RESTARTING)
            await self._restart_until_up()
            self.restart_count += 1
            try:
                await self._on_restart()
            except Exception:
                # Triton itself is up; the callback owns per-deployment failures and their
                # reporting, and a broken callback must not stop the supervision.
                logger.exception("on_restart callback failed after a Triton restart")
            self._set_health(TritonHealth.SERVING)

    async def _restart_until_up(self) -> None:
        self._backoff.reset()
        while True:
            await asyncio.sleep(self._backoff.next_delay())
            try:
                await self.server.start()
                return
            except Exception:
                logger.exception("Triton restart failed; retrying")
