"""gRPC servicer of `maas.compressor.v1.CompressorService`: convert, call the domain, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from maas.common.v1 import job_pb2
from maas.compressor.v1 import (
    compression_job_pb2,
    compressor_service_pb2,
    compressor_service_pb2_grpc,
)
from maas_runtime.auth import current_principal
from maas_runtime.messages import validated_request

from maas_compressor.jobs import CompressionJobs
from maas_compressor.messages import compression_job_message, job_event_message, spec_fields


class CompressorServicer(compressor_service_pb2_grpc.CompressorServiceServicer):
    """Thin adapter: validation and behaviour live in `CompressionJobs`."""

    def __init__(self, jobs: CompressionJobs) -> None:
        self._jobs = jobs

    async def CreateCompressionJob(self, request: compressor_service_pb2.CreateCompressionJobRequest,
                                   context: grpc.aio.ServicerContext) -> compression_job_pb2.CompressionJob:
        compression_job = validated_request(request.compression_job, "compression_job")
        job = await self._jobs.create(request.compression_job_id,
                                      spec_fields(compression_job.spec), current_principal())
        return compression_job_message(job)

    async def GetCompressionJob(self, request: compressor_service_pb2.GetCompressionJobRequest,
                                context: grpc.aio.ServicerContext) -> compression_job_pb2.CompressionJob:
        return compression_job_message(await self._jobs.get(request.name, current_principal()))

    async def ListCompressionJobs(
            self, request: compressor_service_pb2.ListCompressionJobsRequest,
            context: grpc.aio.ServicerContext,
    ) -> compressor_service_pb2.ListCompressionJobsResponse:
        listing = await self._jobs.list(request.filter, request.page_size, request.page_token,
                                        current_principal())
        return compressor_service_pb2.ListCompressionJobsResponse(
            compression_jobs=[compression_job_message(job) for job in listing.items],
            next_page_token=listing.next_page_token)

    async def CancelCompressionJob(self, request: compressor_service_pb2.CancelCompressionJobRequest,
                                   context: grpc.aio.ServicerContext) -> compression_job_pb2.CompressionJob:
        return compression_job_message(await self._jobs.cancel(request.name, current_principal()))

    async def WatchCompressionJob(self, request: compressor_service_pb2.WatchCompressionJobRequest,
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[job_pb2.JobEvent]:
        async for event in self._jobs.watch(request.name, request.after_sequence,
                                            current_principal()):
            yield job_event_message(event)
