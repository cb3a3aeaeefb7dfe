"""Who may see and touch which training jobs: model scopes and tenants."""

from __future__ import annotations

import grpc
from maas.trainer.v1 import trainer_service_pb2 as ts, trainer_service_pb2_grpc
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel

from tests.support.grpc_asserts import expect_error
from tests.trainer.helpers import create_job, digits_spec


async def test_scoped_tokens_see_and_cancel_only_jobs_of_their_models(start_trainer):
    trainer = await start_trainer(worker_slots=1)
    other = await create_job(trainer.stub, digits_spec(model_id="fraud", epochs=50), "fraud-job")
    token = add_token(trainer.settings.resolved_tokens_file, "team", Role.EDITOR, ["digits*"])
    channel = open_channel(trainer.server.settings.host + f":{trainer.server.port}", token=token)
    scoped = trainer_service_pb2_grpc.TrainerServiceStub(channel)
    try:
        await expect_error(scoped.GetTrainingJob(ts.GetTrainingJobRequest(name=other.name)),
                           grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(scoped.CancelTrainingJob(ts.CancelTrainingJobRequest(
            name=other.name)), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(scoped.WatchTrainingJob(ts.WatchTrainingJobRequest(
            name=other.name)).read(), grpc.StatusCode.PERMISSION_DENIED)
        listed = await scoped.ListTrainingJobs(ts.ListTrainingJobsRequest())
        assert list(listed.training_jobs) == []
        spec = digits_spec(model_id="digits")
        spec.resources.tenant = "someone-else"
        await expect_error(scoped.CreateTrainingJob(ts.CreateTrainingJobRequest(
            training_job_id="spoof", training_job={"spec": spec})),
            grpc.StatusCode.PERMISSION_DENIED)
    finally:
        await channel.close()
        await trainer.stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name=other.name))


async def test_a_model_too_large_to_build_is_refused_without_building_it(trainer):
    spec = digits_spec(hyperparameters={"hidden_sizes": [65536] * 32})
    await expect_error(create_job(trainer.stub, spec), grpc.StatusCode.INVALID_ARGUMENT,
                       "training_job.spec.architecture.hyperparameters")
    assert list((await trainer.stub.ListTrainingJobs(ts.ListTrainingJobsRequest()))
                .training_jobs) == []
