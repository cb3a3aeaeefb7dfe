"""Fair-share scheduling of queued jobs onto a pool of worker slots.

Within a tenant, jobs run by priority (higher first), then in submission order. Across
tenants, the next slot goes to the tenant that holds the fewest slots right now, and among
those to the one served least recently. So a tenant that floods the queue gets one job
started per turn like everybody else: another tenant's single job starts within one slot
turnover, however long the flood.

A job that needs more slots than are free blocks the pass instead of letting smaller jobs
overtake it ("reservation", not backfilling): otherwise a steady stream of one-slot jobs
could keep a multi-worker job waiting forever.

Pure logic, no I/O: the manager feeds it the queue and the current allocation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class QueuedJob:
    """What scheduling needs to know about a queued job."""

    job_id: str
    tenant: str
    workers: int
    priority: int
    queue_position: int
    """Submission order; older jobs first among equal priorities."""


@dataclass(frozen=True)
class SchedulingPlan:
    """The outcome of one scheduling pass."""

    start: list[QueuedJob] = field(default_factory=list)
    """Jobs to start now, in order; together they fit in the free slots."""
    unrunnable: list[QueuedJob] = field(default_factory=list)
    """Jobs that need more workers than the whole pool has: they would wait forever."""


class FairShareScheduler:
    """Decides which queued jobs start; remembers when each tenant was last served."""

    def __init__(self, pool_size: int) -> None:
        if pool_size < 1:
            raise ValueError(f"the pool needs at least one worker slot, got {pool_size}")
        self.pool_size = pool_size
        self._clock = 0
        self._last_served: dict[str, int] = {}

    def remember_service(self, last_start_times: Mapping[str, datetime]) -> None:
        """Seed the memory after a restart from when each tenant's jobs last started."""
        for tenant, _ in sorted(last_start_times.items(), key=lambda item: item[1]):
            self._clock += 1
            self._last_served[tenant] = self._clock

    def plan(self, queued: Iterable[QueuedJob], running_slots: Mapping[str, int]) -> SchedulingPlan:
        """Pick the jobs to start given the queue and the slots each tenant holds now."""
        plan = SchedulingPlan()
        queues: dict[str, list[QueuedJob]] = defaultdict(list)
        for job in queued:
            if job.workers > self.pool_size:
                plan.unrunnable.append(job)
            else:
                queues[job.tenant].append(job)
        for jobs in queues.values():
            # Reversed, so the next job of each tenant pops off the end.
            jobs.sort(key=lambda job: (job.priority, -job.queue_position))
        held = defaultdict(int, running_slots)
        free = self.pool_size - sum(running_slots.values())
        while free > 0 and queues:
            tenant = min(queues, key=lambda name: (held[name], self._last_served.get(name, 0), name))
            job = queues[tenant][-1]
            if job.workers > free:
                break
            queues[tenant].pop()
            if not queues[tenant]:
                del queues[tenant]
            plan.start.append(job)
            free -= job.workers
            held[tenant] += job.workers
            self._clock += 1
            self._last_served[tenant] = self._clock
        return plan


def slots_by_tenant(allocations: Sequence[tuple[str, int]]) -> dict[str, int]:
    """(tenant, workers) of every running job → slots held per tenant."""
    held: dict[str, int] = defaultdict(int)
    for tenant, workers in allocations:
        held[tenant] += workers
    return dict(held)
