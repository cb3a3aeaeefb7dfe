"""CreateTrainingJob converts strictly: non-finite numbers and unknown enum numbers are
INVALID_ARGUMENT naming the field, output-only values sent are ignored."""

from __future__ import annotations

import math

import grpc
from maas.common.v1 import job_pb2
from maas.trainer.v1 import trainer_service_pb2 as ts, training_job_pb2 as tj

from tests.trainer.helpers import digits_spec, expect_error, list_jobs

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def create(trainer, spec: tj.TrainingSpec, **job_fields):
    return trainer.stub.CreateTrainingJob(ts.CreateTrainingJobRequest(
        training_job=tj.TrainingJob(spec=spec, **job_fields)))


async def test_a_nan_learning_rate_names_the_field(trainer):
    await expect_error(create(trainer, digits_spec(learning_rate=math.nan)), INVALID,
                       "training_job.spec.optimizer.learning_rate")
    assert await list_jobs(trainer.stub) == []


async def test_an_infinite_hyperparameter_names_its_key(trainer):
    spec = digits_spec(hyperparameters={"hidden_sizes": [32], "dropout": math.inf})
    await expect_error(create(trainer, spec), INVALID,
                       'training_job.spec.architecture.hyperparameters["dropout"]')


async def test_an_unknown_enum_number_names_the_field(trainer):
    await expect_error(create(trainer, digits_spec(optimizer=42)), INVALID,
                       "training_job.spec.optimizer.kind")


async def test_output_only_job_fields_sent_are_ignored(trainer):
    job = tj.TrainingJob(spec=digits_spec(epochs=1), state=99, epoch=-3, creator="mallory",
                         metrics={"test_accuracy": math.nan}, model_version="models/x/versions/1")
    job.create_time.seconds, job.create_time.nanos = 10**12, -1
    created = await trainer.stub.CreateTrainingJob(ts.CreateTrainingJobRequest(
        training_job=job, training_job_id="strict"))
    assert created.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)
    assert created.creator != "mallory" and created.epoch == 0 and not created.model_version
    assert "test_accuracy" not in created.metrics
    assert 0 < created.create_time.seconds < 10**12
    await trainer.stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name=created.name))
