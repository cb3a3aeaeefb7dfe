"""Settings of the compressor service (env prefix MAAS_COMPRESSOR_)."""

from __future__ import annotations

import sys

from maas_jobs.settings import JobServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class CompressorSettings(JobServiceSettings):
    """Compressor settings; everything in `JobServiceSettings` (server, pool, job runtime)."""

    model_config = SettingsConfigDict(env_prefix="MAAS_COMPRESSOR_",
                                      use_attribute_docstrings=True, extra="ignore")

    port: int = 50053
    """TCP port to listen on."""

    worker_slots: int = Field(default=1, ge=1)
    """Size of the resource pool: compression jobs that may run at once (one process each)."""

    torch_threads_per_worker: int = Field(default=1, ge=1)
    """Threads of each job process. Latencies in the report are measured on one thread
    regardless; more threads only speed up fine-tuning and distillation."""

    python_executable: str = sys.executable
    """Interpreter that runs job processes (it must have maas-compressor installed)."""
