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
from maas_jobs.servicer import JobServicer
from maas_runtime.auth import current_principal
from maas_runtime.messages import validated_request

from maas_compressor.jobs import CompressionJobs
from maas_compressor.messages import compression_job_message, spec_fields


class CompressorServicer(JobServicer[CompressionJobs, compression_job_pb2.CompressionJob],
                         compressor_service_pb2_grpc.CompressorServiceServicer):
    """Thin adapter: validation and behaviour live in `CompressionJobs`."""

    def __init__(self, jobs: CompressionJobs) -> None:
        super().__init__(jobs, compression_job_message)

    async def CreateCompressionJob(self, request: compressor_service_pb2.CreateCompressionJobRequest,
                                   context: grpc.aio.ServicerContext) -> compression_job_pb2.CompressionJob:
        compression_job = validated_request(request.compression_job, "compression_job")
        job = await self._jobs.create(request.compression_job_id,
                                      spec_fields(compression_job.spec), current_principal())
        return compression_job_message(job)

    async def GetCompressionJob(self, request: compressor_service_pb2.GetCompressionJobRequest,
                                context: grpc.aio.ServicerContext) -> compression_job_pb2.CompressionJob:
        return await self.get_job(request.name)

    async def ListCompressionJobs(
            self, request: compressor_service_pb2.ListCompressionJobsRequest,
            context: grpc.aio.ServicerContext,
    ) -> compressor_service_pb2.ListCompressionJobsResponse:
        compression_jobs, next_page_token = await self.list_jobs(request)
        return compressor_service_pb2.ListCompressionJobsResponse(
            compression_jobs=compression_jobs, next_page_token=next_page_token)

    async def CancelCompressionJob(self, request: compressor_service_pb2.CancelCompressionJobRequest,
                                   context: grpc.aio.ServicerContext) -> compression_job_pb2.CompressionJob:
        return await self.cancel_job(request.name)

    async def WatchCompressionJob(self, request: compressor_service_pb2.WatchCompressionJobRequest,
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[job_pb2.JobEvent]:
        async for event in self.watch_job(request.name, request.after_sequence):
            yield event
