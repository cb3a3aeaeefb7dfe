"""gRPC servicer of `maas.trainer.v1.TrainerService`: convert, call the domain, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from maas.common.v1 import job_pb2
from maas.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc, training_job_pb2
from maas_jobs.servicer import JobServicer
from maas_runtime.auth import current_principal
from maas_runtime.messages import validated_request

from maas_trainer.jobs import TrainingJobs
from maas_trainer.messages import spec_fields, training_job_message


class TrainerServicer(JobServicer[TrainingJobs, training_job_pb2.TrainingJob],
                      trainer_service_pb2_grpc.TrainerServiceServicer):
    """Thin adapter: validation and behaviour live in `TrainingJobs`."""

    def __init__(self, jobs: TrainingJobs) -> None:
        super().__init__(jobs, training_job_message)

    async def CreateTrainingJob(self, request: trainer_service_pb2.CreateTrainingJobRequest,
                                context: grpc.aio.ServicerContext) -> training_job_pb2.TrainingJob:
        training_job = validated_request(request.training_job, "training_job")
        job = await self._jobs.create(request.training_job_id, spec_fields(training_job.spec),
                                      current_principal())
        return training_job_message(job)

    async def GetTrainingJob(self, request: trainer_service_pb2.GetTrainingJobRequest,
                             context: grpc.aio.ServicerContext) -> training_job_pb2.TrainingJob:
        return await self.get_job(request.name)

    async def ListTrainingJobs(
            self, request: trainer_service_pb2.ListTrainingJobsRequest, context: grpc.aio.ServicerContext,
    ) -> trainer_service_pb2.ListTrainingJobsResponse:
        training_jobs, next_page_token = await self.list_jobs(request)
        return trainer_service_pb2.ListTrainingJobsResponse(training_jobs=training_jobs,
                                                            next_page_token=next_page_token)

    async def CancelTrainingJob(self, request: trainer_service_pb2.CancelTrainingJobRequest,
                                context: grpc.aio.ServicerContext) -> training_job_pb2.TrainingJob:
        return await self.cancel_job(request.name)

    async def WatchTrainingJob(self, request: trainer_service_pb2.WatchTrainingJobRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[job_pb2.JobEvent]:
        async for event in self.watch_job(request.name, request.after_sequence):
            yield event
