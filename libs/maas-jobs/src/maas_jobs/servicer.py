"""The gRPC side of what every job service shares: job and event messages, Get/List/Cancel/Watch.

A job service's servicer subclasses `JobServicer` with its `ScopedJobs` and its job
conversion; its Get, List, Cancel and Watch RPCs then only name their request and response
fields. Create stays the service's own (its spec is).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message
from maas.common.v1 import job_pb2
from maas_runtime.auth import current_principal
from maas_runtime.messages import to_message

from maas_jobs.records import JobEvent, JobRecord
from maas_jobs.resources import job_event_resource, job_status_fields
from maas_jobs.scoped import ScopedJobs

J = TypeVar("J", bound=ScopedJobs)
M = TypeVar("M", bound=Message)


def job_message(job: JobRecord, collection: str, message_type: type[M]) -> M:
    """The fields every job message has (name, state, times, progress, error) as a
    `message_type`; the service fills in its spec and results."""
    return to_message(job_status_fields(job, f"{collection}/{job.job_id}"), message_type)


def job_event_message(event: JobEvent) -> job_pb2.JobEvent:
    return to_message(job_event_resource(event), job_pb2.JobEvent)


class ListJobsRequest(Protocol):
    """The paging fields of every `List*Jobs` request."""

    filter: str
    page_size: int
    page_token: str


class JobServicer(Generic[J, M]):
    """Get, list, cancel and watch a service's jobs as the calling principal."""

    def __init__(self, jobs: J, job_message: Callable[[JobRecord], M]) -> None:
        self._jobs = jobs
        self._job_message = job_message

    async def get_job(self, name: str) -> M:
        return self._job_message(await self._jobs.get(name, current_principal()))

    async def list_jobs(self, request: ListJobsRequest) -> tuple[list[M], str]:
        """One page of jobs as messages, and the token of the next page."""
        listing = await self._jobs.list(request.filter, request.page_size, request.page_token,
                                        current_principal())
        return [self._job_message(job) for job in listing.items], listing.next_page_token

    async def cancel_job(self, name: str) -> M:
        return self._job_message(await self._jobs.cancel(name, current_principal()))

    async def watch_job(self, name: str, after_sequence: int) -> AsyncIterator[job_pb2.JobEvent]:
        async for event in self._jobs.watch(name, after_sequence, current_principal()):
            yield job_event_message(event)
