"""Settings every job service (trainer, compressor) adds to `ServiceSettings`.

Each service subclasses `JobServiceSettings` with its env prefix and port, and redeclares
the fields whose meaning it explains in its own terms (its pool, its threads, its package).
"""

from __future__ import annotations

import socket
import sys

from maas_runtime.settings import ServiceSettings
from pydantic import Field

from maas_jobs.kubernetes_executor import KubernetesExecutorSettings


class JobServiceSettings(ServiceSettings, KubernetesExecutorSettings):
    """The pool, the registry and the job runtime of a service that runs jobs (as local
    processes, or on Kubernetes: `KubernetesExecutorSettings`)."""

    model_config = ServiceSettings.model_config

    worker_slots: int = Field(default=1, ge=1)
    """Size of the resource pool: worker processes that may run at once."""

    torch_threads_per_worker: int = Field(default=1, ge=1)
    """Threads of each job process."""

    registry_target: str = ""
    """host:port of the registry; when empty it is found through discovery ("registry")."""

    python_executable: str = sys.executable
    """Interpreter that runs job processes (it must have the service's package installed)."""

    schedule_interval_seconds: float = Field(default=1.0, gt=0)
    """Scheduling runs on every submit and finish; this is how often it runs regardless."""

    watch_poll_seconds: float = Field(default=1.0, gt=0)
    """Watchers wake on every event; this is how often they look regardless."""

    job_stop_grace_seconds: float = Field(default=10.0, ge=0)
    """After SIGTERM (cancel, shutdown), how long a job may take to exit before SIGKILL."""

    max_logged_output_lines: int = Field(default=200, ge=0)
    """Lines a job prints outside the progress protocol that become log events; everything
    is kept in the job's `job.log`."""

    database_url: str = ""
    """SQLAlchemy URL of the job table; empty: SQLite (WAL) at `<state_dir>/<service>.db`.
    postgresql+psycopg://… lets several replicas share one table (one database per service:
    the trainer's and the compressor's tables have the same names)."""

    jobs_dir: str = ""
    """Where each job's working directory (staged inputs, checkpoints) lives; empty:
    `<state_dir>/jobs`. Replicas sharing a job table must share it (a volume), so the one
    that takes a job over resumes it from its checkpoint."""

    replica_id: str = ""
    """This replica's name on the leases of the jobs it runs; empty: `<host>:<state_dir>`.
    Keep it stable across restarts (a restarted replica resumes its own jobs at once) and
    unique among the replicas sharing a job table."""

    job_lease_seconds: float = Field(default=15.0, ge=1.0)
    """How long a running job stays with a replica that stops renewing its lease (killed,
    cut off from the database) before another replica takes it over."""

    def lease_owner(self) -> str:
        """`replica_id`, or `<host>:<state_dir>` (stable across restarts of one replica)."""
        return self.replica_id or f"{socket.gethostname()}:{self.state_dir.resolve()}"
