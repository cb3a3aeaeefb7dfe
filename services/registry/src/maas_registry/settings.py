"""Settings of the registry service (env prefix MAAS_REGISTRY_)."""

from __future__ import annotations

from maas_runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RegistrySettings(ServiceSettings):
    """Registry settings; everything in `ServiceSettings` plus storage and limits."""

    model_config = SettingsConfigDict(env_prefix="MAAS_REGISTRY_", use_attribute_docstrings=True,
                                      extra="ignore")

    port: int = 50051
    """TCP port to listen on."""

    database_url: str = ""
    """SQLAlchemy URL; defaults to SQLite (WAL) at `<state_dir>/registry.db`. Use
    postgresql+psycopg://… to run several registry replicas on one database."""

    blob_dir: str = ""
    """Content-addressed blob store directory; defaults to `<state_dir>/blobs`. Replicas
    must share it (a volume or a mounted object store)."""

    max_artifact_bytes: int = Field(default=8 * 1024**3, ge=1)
    """Largest artifact accepted on upload; larger streams fail RESOURCE_EXHAUSTED."""

    download_chunk_bytes: int = Field(default=1024 * 1024, ge=4096, le=4 * 1024 * 1024)
    """Chunk size of download streams."""

    gc_grace_seconds: float = Field(default=300.0, ge=0)
    """Unreferenced blobs and abandoned staging files younger than this are kept (an upload
    may be about to commit them)."""

    gc_interval_seconds: float = Field(default=600.0, gt=0)
    """How often unreferenced blobs are collected."""

    storage_metrics_poll_seconds: float = Field(default=30.0, gt=0)
    """How often the blob store is measured for `maas_registry_blob_stored_bytes` and the
    disk's free bytes (a directory walk)."""

    event_poll_seconds: float = Field(default=0.5, gt=0)
    """How often WatchEvents looks for events committed by other replicas."""
