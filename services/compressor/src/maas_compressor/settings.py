"""Settings of the compressor service (env prefix MAAS_COMPRESSOR_)."""

from __future__ import annotations

import sys

from maas_runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class CompressorSettings(ServiceSettings):
    """Compressor settings; everything in `ServiceSettings` plus the pool and job runtime."""

    model_config = SettingsConfigDict(env_prefix="MAAS_COMPRESSOR_",
                                      use_attribute_docstrings=True, extra="ignore")

    port: int = 50053
    """TCP port to listen on."""

    worker_slots: int = Field(default=1, ge=1)
    """Size of the resource pool: compression jobs that may run at once (one process each)."""

    torch_threads_per_worker: int = Field(default=1, ge=1)
    """Threads of each job process. Latencies in the report are measured on one thread
    regardless; more threads only speed up fine-tuning and distillation."""

    registry_target: str = ""
    """host:port of the registry; when empty it is found through discovery ("registry")."""

    python_executable: str = sys.executable
    """Interpreter that runs job processes (it must have maas-compressor installed)."""

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
