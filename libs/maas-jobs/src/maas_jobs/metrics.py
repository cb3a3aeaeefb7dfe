"""Job metrics of a service that runs jobs (trainer, compressor): queue depth, jobs by state,
and how long the oldest queued job has waited.

The counts come from the job table (every replica sees the same), polled every
`poll_seconds` off the event loop; the OpenTelemetry callbacks only read the last poll, so
a scrape never touches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from opentelemetry.metrics import Observation

from maas_jobs.records import JobCollection, JobState
from maas_jobs.store import JobStateSummary, JobStore

_log = logging.getLogger(__name__)


class JobMetrics:
    """`maas.jobs` by state, `maas.jobs.queue_depth` and `maas.jobs.oldest_queued_age` (s),
    each labelled with the job collection (`kind`: trainingJobs, compressionJobs)."""

    def __init__(self, store: JobStore, collection: JobCollection, meter,
                 poll_seconds: float = 5.0):
        self._store = store
        self._kind = {"kind": collection.collection}
        self._poll_seconds = poll_seconds
        self._summary: JobStateSummary | None = None
        self._task: asyncio.Task | None = None
        meter.create_observable_gauge(
            "maas.jobs", callbacks=[self._observe_states], unit="{job}",
            description="jobs in the table, by state")
        meter.create_observable_gauge(
            "maas.jobs.queue_depth", callbacks=[self._observe_queue], unit="{job}",
            description="jobs waiting for worker slots (QUEUED)")
        meter.create_observable_gauge(
            "maas.jobs.oldest_queued_age", callbacks=[self._observe_age], unit="s",
            description="how long the oldest queued job has waited; 0 when none waits")

    async def refresh(self) -> None:
        self._summary = await asyncio.to_thread(self._store.state_summary)

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a locked or closing database: the next poll catches up
                _log.debug("no job counts this time", exc_info=True)
            await asyncio.sleep(self._poll_seconds)

    async def start(self) -> None:
        """Poll in the background until `stop`."""
        self._task = asyncio.create_task(self.run(), name="job-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _observe_states(self, _options) -> list[Observation]:
        if self._summary is None:
            return []
        return [Observation(count, {**self._kind, "state": state.value})
                for state, count in self._summary.counts.items()]

    def _observe_queue(self, _options) -> list[Observation]:
        if self._summary is None:
            return []
        return [Observation(self._summary.counts[JobState.QUEUED], self._kind)]

    def _observe_age(self, _options) -> list[Observation]:
        if self._summary is None:
            return []
        oldest = self._summary.oldest_queued
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
        return [Observation(max(age, 0.0), self._kind)]
