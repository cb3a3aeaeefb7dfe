"""Settings every job service (trainer, compressor) adds to `ServiceSettings`.

Each service subclasses `JobServiceSettings` with its env prefix and port, and redeclares
the fields whose meaning it explains in its own terms (its pool, its threads, its package).
"""

from __future__ import annotations

import sys

from maas_runtime.settings import ServiceSettings
from pydantic import Field


class JobServiceSettings(ServiceSettings):
    """The pool, the registry and the job runtime of a service that runs jobs."""

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

    page_token_secret_file: str = ""
    """File holding the HMAC key of page tokens; defaults to `<state_dir>/page-token.key`."""
