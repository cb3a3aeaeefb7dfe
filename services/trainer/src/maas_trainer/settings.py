"""Settings of the trainer service (env prefix MAAS_TRAINER_)."""

from __future__ import annotations

import sys

from maas_jobs.settings import JobServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class TrainerSettings(JobServiceSettings):
    """Trainer settings; everything in `JobServiceSettings` (server, pool, job runtime)."""

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

    python_executable: str = sys.executable
    """Interpreter that runs job processes (it must have maas-trainer installed)."""
