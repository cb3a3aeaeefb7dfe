"""Deployment table: what each deployment should serve, persisted across restarts.

A tiny SQLite table (stdlib sqlite3) holding each deployment as JSON: the inference service
needs no ORM, and on restart (its own or Triton's) it reloads every deployment from here.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
from pathlib import Path

from maas_runtime.errors import AlreadyExists, NotFound


class DeploymentStore(abc.ABC):
    """Persistence of deployment records (plain dicts in the contract's JSON shape)."""

    @abc.abstractmethod
    def create(self, deployment_id: str, record: dict) -> None: ...

    @abc.abstractmethod
    def get(self, deployment_id: str) -> dict: ...

    @abc.abstractmethod
    def put(self, deployment_id: str, record: dict) -> None: ...

    @abc.abstractmethod
    def delete(self, deployment_id: str) -> None: ...

    @abc.abstractmethod
    def list(self, after: str, limit: int) -> list[tuple[str, dict]]: ...


class SqliteDeploymentStore(DeploymentStore):
    """DeploymentStore in one SQLite file (WAL, fsynced commits)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS deployments (id TEXT PRIMARY KEY, record TEXT NOT NULL)")

    def create(self, deployment_id: str, record: dict) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO deployments (id, record) VALUES (?, ?)", (deployment_id, json.dumps(record))
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists("deployment", f"deployments/{deployment_id}") from None

    def get(self, deployment_id: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT record FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        if row is None:
            raise NotFound("deployment", f"deployments/{deployment_id}")
        return json.loads(row[0])

    def put(self, deployment_id: str, record: dict) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE deployments SET record = ? WHERE id = ?", (json.dumps(record), deployment_id)
            )

    def delete(self, deployment_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))

    def list(self, after: str, limit: int) -> list[tuple[str, dict]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, record FROM deployments WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [(deployment_id, json.loads(record)) for deployment_id, record in rows]

    def close(self) -> None:
        self._db.close()
