"""A service's jobs as a caller may see them: get, list, cancel and watch within model scopes.

Each job service (trainer, compressor) subclasses `ScopedJobs` with its create use case and
`models_of`, the models one of its jobs involves. A token scoped to some models sees and
touches only jobs all of whose models are in its scope (`maas_runtime.scopes`); a list leaves
the others out, so its pages may come back shorter.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import AsyncIterator

from maas_runtime import scopes
from maas_runtime.auth import Principal
from maas_runtime.names import parse_parent

from maas_jobs.manager import JobListing, JobManager
from maas_jobs.records import JobEvent, JobRecord


def tenant_of(principal: Principal) -> str:
    """The tenant a principal's jobs count against by default: its name as a valid id."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", principal.name.lower()).strip("-._")[:63]
    return slug or "default"


class ScopedJobs(abc.ABC):
    """The standard job use cases of a service over its `JobManager`, checked against scopes."""

    def __init__(self, manager: JobManager, collection: str) -> None:
        self._manager = manager
        self._collection = collection

    @abc.abstractmethod
    def models_of(self, job: JobRecord) -> list[str]:
        """Every model `job` reads or writes: a scoped token must cover them all."""

    def job_id_from_name(self, name: str, field: str = "name") -> str:
        """`<collection>/{job}` → job id; INVALID_ARGUMENT on `field` otherwise."""
        return parse_parent(name, self._collection, field)

    async def get(self, name: str, principal: Principal) -> JobRecord:
        return self._in_scope(principal, await self._manager.get(self.job_id_from_name(name)))

    async def list(self, filter_text: str, page_size: int, page_token: str,
                   principal: Principal) -> JobListing:
        listing = await self._manager.list(filter_text, page_size, page_token)
        return dataclasses.replace(listing, items=scopes.visible(
            principal, listing.items, self.models_of))

    async def cancel(self, name: str, principal: Principal) -> JobRecord:
        job_id = self.job_id_from_name(name)
        self._in_scope(principal, await self._manager.get(job_id))
        return await self._manager.cancel(job_id, f"cancelled by {principal.name}")

    async def watch(self, name: str, after_sequence: int,
                    principal: Principal) -> AsyncIterator[JobEvent]:
        job_id = self.job_id_from_name(name)
        self._in_scope(principal, await self._manager.get(job_id))
        async for event in self._manager.watch(job_id, after_sequence):
            yield event

    def _in_scope(self, principal: Principal, job: JobRecord) -> JobRecord:
        scopes.require_models(principal, self.models_of(job))
        return job
