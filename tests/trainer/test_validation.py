"""CreateTrainingJob rejects bad requests with the right code and field, and queues nothing."""

from __future__ import annotations

import grpc
import pytest
from maas.trainer.v1 import trainer_service_pb2 as ts, training_job_pb2 as tj

from tests.trainer.helpers import create_job, digits_spec, expect_error, list_jobs

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _with(**changes):
    """A digits spec with a change applied by a function of the message."""

    def build():
        spec = digits_spec(**{k: v for k, v in changes.items() if k != "edit"})
        if "edit" in changes:
            changes["edit"](spec)
        return spec

    return build


def _clear_architecture(spec):
    spec.ClearField("architecture")


def _unknown_hyperparameter(spec):
    spec.architecture.hyperparameters.update({"depth": 3})


def _nesterov_on_adam(spec):
    spec.optimizer.nesterov = True


def _step_without_size(spec):
    spec.schedule.kind = tj.SCHEDULE_KIND_STEP


def _bad_early_stopping(spec):
    spec.early_stopping.metric = "train_loss"
    spec.early_stopping.patience = 2


def _fractions_leave_nothing(spec):
    spec.data.validation_fraction = 0.6
    spec.data.test_fraction = 0.5


BAD_REQUESTS = {
    "unknown architecture": (_with(kind="resnet"), INVALID, "training_job.spec.architecture.kind"),
    "missing architecture": (_with(edit=_clear_architecture), INVALID,
                             "training_job.spec.architecture.kind"),
    "unknown hyperparameter": (_with(edit=_unknown_hyperparameter), INVALID,
                               "training_job.spec.architecture.hyperparameters.depth"),
    "unknown dataset": (_with(dataset="builtin:imagenet"), INVALID, "training_job.spec.data.dataset"),
    "malformed dataset version": (_with(dataset="datasets/digits/versions/latest"), INVALID,
                                  "training_job.spec.data.dataset"),
    "unset optimizer": (_with(optimizer=tj.OPTIMIZER_KIND_UNSPECIFIED), INVALID,
                        "training_job.spec.optimizer.kind"),
    "unknown optimizer": (_with(optimizer=42), INVALID, "training_job.spec.optimizer.kind"),
    "zero learning rate": (_with(learning_rate=0.0), INVALID,
                           "training_job.spec.optimizer.learning_rate"),
    "negative learning rate": (_with(learning_rate=-0.1), INVALID,
                               "training_job.spec.optimizer.learning_rate"),
    "zero epochs": (_with(epochs=0), INVALID, "training_job.spec.epochs"),
    "zero batch size": (_with(batch_size=0), INVALID, "training_job.spec.batch_size"),
    "nesterov without momentum": (_with(edit=_nesterov_on_adam), INVALID,
                                  "training_job.spec.optimizer.nesterov"),
    "step schedule without step size": (_with(edit=_step_without_size), INVALID,
                                        "training_job.spec.schedule.step_size"),
    "unknown early stopping metric": (_with(edit=_bad_early_stopping), INVALID,
                                      "training_job.spec.early_stopping.metric"),
    "splits leave no training data": (_with(edit=_fractions_leave_nothing), INVALID,
                                      "training_job.spec.data.test_fraction"),
    "invalid model id": (_with(model_id="Bad/Model"), INVALID, "training_job.spec.output.model_id"),
    "invalid tenant": (_with(tenant="Team A"), INVALID, "training_job.spec.resources.tenant"),
    # Checks against the dataset and the pool:
    "batch larger than the training split": (_with(batch_size=1300), INVALID,
                                             "training_job.spec.batch_size"),
    "workers beyond the pool": (_with(workers=3), PRECONDITION,
                                "training_job.spec.resources.workers"),
    "cnn over flat non-square features": (
        _with(kind="cnn", dataset="builtin:synthetic-classification"), PRECONDITION,
        "training_job.spec.architecture"),
    "registry dataset version that does not exist": (
        _with(dataset="datasets/nope/versions/1"), PRECONDITION, "training_job.spec.data.dataset"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_request_is_rejected_and_nothing_is_queued(trainer, case):
    build, code, field = BAD_REQUESTS[case]
    await expect_error(create_job(trainer.stub, build()), code, field)
    assert await list_jobs(trainer.stub) == []
    assert not trainer.jobs_dir.exists() or not any(trainer.jobs_dir.iterdir())


async def test_every_violation_is_reported_at_once(trainer):
    error = await expect_error(create_job(trainer.stub, digits_spec(learning_rate=0, epochs=0)),
                               INVALID, "training_job.spec.optimizer.learning_rate")
    assert "training_job.spec.epochs" in error.details()


async def test_bad_job_id_is_rejected(trainer):
    await expect_error(create_job(trainer.stub, digits_spec(), job_id="Not An Id"), INVALID,
                       "training_job_id")


async def test_duplicate_job_id_already_exists(trainer):
    await create_job(trainer.stub, digits_spec(epochs=1), job_id="only-once")
    await expect_error(create_job(trainer.stub, digits_spec(epochs=1), job_id="only-once"),
                       grpc.StatusCode.ALREADY_EXISTS)


async def test_names_and_filters_are_checked(trainer):
    stub = trainer.stub
    await expect_error(stub.GetTrainingJob(ts.GetTrainingJobRequest(name="trainingJobs/absent")),
                       grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.GetTrainingJob(ts.GetTrainingJobRequest(name="jobs/x")), INVALID, "name")
    await expect_error(stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name="trainingJobs/absent")),
                       grpc.StatusCode.NOT_FOUND)
    events = stub.WatchTrainingJob(ts.WatchTrainingJobRequest(name="trainingJobs/absent"))
    await expect_error(events.read(), grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.ListTrainingJobs(ts.ListTrainingJobsRequest(filter='colour = "red"')),
                       INVALID, "filter")
    await expect_error(stub.ListTrainingJobs(ts.ListTrainingJobsRequest(filter='state = "DONE"')),
                       INVALID, "filter")
