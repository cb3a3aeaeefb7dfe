"""The composition root every job service shares: settings → job store, registry, manager → server.

A job service (trainer, compressor) supplies only what is its own: its runner, built on the
registry client, and the gRPC binding of its servicer, built on the manager. Everything
else is wired here once: the job table (SQLite under `state_dir`, or PostgreSQL at
`database_url` shared by replicas), the registry peer channel
(TLS, traces, discovery), page tokens, the manager's pool and timings, the executor (local
processes, or Kubernetes Jobs with `job_executor`), job metrics, and the order things open
and close in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from maas_runtime.pagination import PageTokenCodec
from maas_runtime.peers import PeerChannel
from maas_runtime.registry_client import RegistryClient
from maas_runtime.server import ServiceBinding, ServiceServer
from maas_runtime.telemetry import Telemetry

from maas_jobs.kubernetes_executor import launcher_for
from maas_jobs.manager import JobManager, JobManagerConfig, JobRunner
from maas_jobs.metrics import JobMetrics
from maas_jobs.records import JobCollection
from maas_jobs.settings import JobServiceSettings
from maas_jobs.store import SqlJobStore

if TYPE_CHECKING:
    from maas_runtime.discovery import ServiceDiscovery

REGISTRY_SERVICE = "registry"
"""The name the registry is found under in discovery."""

R = TypeVar("R", bound=JobRunner)


@dataclass(frozen=True)
class JobServiceParts(Generic[R]):
    """What a job service's servicer is built on."""

    registry: RegistryClient
    runner: R
    manager: JobManager
    work_root: Path
    """Directory holding one subdirectory per job."""


def build_job_server(name: str, settings: JobServiceSettings, collection: JobCollection,
                     runner_for: Callable[[RegistryClient], R],
                     binding_for: Callable[[JobServiceParts[R]], ServiceBinding],
                     telemetry: Telemetry | None = None,
                     discovery: ServiceDiscovery | None = None) -> ServiceServer:
    """The server of job service `name` (its job table is `database_url`, else
    `<state_dir>/<name>.db`)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = (SqlJobStore.open(settings.database_url, collection) if settings.database_url
             else SqlJobStore.open_sqlite(settings.state_dir / f"{name}.db", collection))
    if not settings.registry_target and discovery is None:
        env_prefix = settings.model_config.get("env_prefix", "")
        raise ValueError(f"set {env_prefix}REGISTRY_TARGET or configure discovery")
    registry = RegistryClient(
        PeerChannel.from_settings(settings, REGISTRY_SERVICE, target=settings.registry_target,
                                  discovery=discovery, telemetry=telemetry),
        timeout_seconds=settings.registry_timeout_seconds)
    runner = runner_for(registry)
    work_root = Path(settings.jobs_dir) if settings.jobs_dir else settings.state_dir / "jobs"
    manager = JobManager(
        store=store, runner=runner, collection=collection,
        config=JobManagerConfig(
            pool_size=settings.worker_slots, work_root=work_root,
            stop_grace_seconds=settings.job_stop_grace_seconds,
            schedule_interval_seconds=settings.schedule_interval_seconds,
            watch_poll_seconds=settings.watch_poll_seconds,
            max_plain_log_lines=settings.max_logged_output_lines,
            replica_id=settings.lease_owner(), lease_seconds=settings.job_lease_seconds,
            launcher=launcher_for(settings, name)),
        page_tokens=PageTokenCodec.from_secret_file(settings.resolved_page_token_secret_file))
    binding = binding_for(JobServiceParts(registry, runner, manager, work_root))
    server = ServiceServer(name, settings, [binding], telemetry=telemetry, discovery=discovery)

    async def close_store() -> None:
        store.close()

    server.on_start.extend([registry.open, manager.start])
    server.on_stop.extend([manager.stop, registry.close, close_store])
    if telemetry is not None:
        job_metrics = JobMetrics(store, collection, telemetry.meter("maas.jobs"))
        server.on_start.append(job_metrics.start)
        server.on_stop.insert(0, job_metrics.stop)
    return server
