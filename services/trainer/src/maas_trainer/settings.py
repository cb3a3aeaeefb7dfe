"""Settings of the trainer service (env prefix MAAS_TRAINER_)."""

from __future__ import annotations

import sys

from maas_runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class TrainerSettings(ServiceSettings):
    """Trainer settings; everything in `ServiceSettings` plus the pool and job runtime."""

    model_config = SettingsConfigDict(env_prefix="MAAS_TRAINER_", use_attribute_docstrings=True,
                                      extra="ignore")

    port: int = 50052
    """TCP port to listen on."""

    worker_slots: int = Field(default=2, ge=1)
    """Size of the resource pool: worker processes that may train at once. A job with
    `workers = n` takes n slots; jobs asking for more than the pool are refused."""

    torch_threads_per_worker: int = Field(default=1, ge=1)
    """Threads of each worker process. 1 keeps a resumed run bit-for-bit equal to an
    uninterrupted one and lets `worker_slots` match the machine's cores."""

    registry_target: str = ""
    """host:port of the registry; when empty it is found through discovery ("registry")."""

    python_executable: str = sys.executable
    """Interpreter that runs job processes (it must have maas-trainer installed)."""

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
