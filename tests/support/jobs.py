"""Helpers for tests of the job services (trainer, compressor): waiting on a job, its states."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from maas.common.v1 import job_pb2

FINAL_STATES = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}

J = TypeVar("J")


async def wait_for_job(get_job: Callable[[str], Awaitable[J]], name: str,
                       predicate: Callable[[J], bool], timeout: float) -> J:
    """Poll `get_job(name)` until `predicate(job)` holds; fail with the job's last state otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        job = await get_job(name)
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never got there; last seen:\n{job}")
        await asyncio.sleep(0.1)


def is_final(job: Any) -> bool:
    return job.state in FINAL_STATES


def states_of(events) -> list[int]:
    """The states a job's Watch events moved it through, in order."""
    return [e.state_change.state for e in events if e.WhichOneof("kind") == "state_change"]
