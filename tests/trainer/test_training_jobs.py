"""Training jobs end to end: a real trainer over gRPC, real job processes, a real registry."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from maas.common.v1 import job_pb2
from maas.registry.v1 import dataset_pb2, registry_service_pb2 as rs
from maas.trainer.v1 import trainer_service_pb2 as ts, training_job_pb2 as tj
from maas_formats.torch_io import load_torch_package
from maas_zoo import build_model
from sklearn.datasets import load_digits

from tests.registry.helpers import (
    dataset_upload_requests,
    download,
    mlp_package,
    model_upload_requests,
)
from tests.trainer.helpers import (
    create_job,
    digits_spec,
    expect_error,
    get_job,
    job_processes,
    list_jobs,
    process_alive,
    states_of,
    wait_for,
    wait_until_final,
    watch_events,
)

EPOCH_METRICS = {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "samples_per_second"}


def _metric_events(events, phase="train"):
    return [e.metrics for e in events if e.WhichOneof("kind") == "metrics" and e.metrics.phase == phase]


async def test_digits_mlp_is_trained_registered_aliased_with_lineage(trainer, registry, tmp_path):
    created = await create_job(trainer.stub, digits_spec(epochs=8, alias="candidate",
                                                         min_test_accuracy=0.9), job_id="mlp-1")
    assert created.name == "trainingJobs/mlp-1"
    assert created.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)
    assert created.spec.resources.tenant == "admin" and created.spec.resources.workers == 1
    assert created.spec.data.test_fraction == 0.2  # defaults are filled in and shown

    live = await watch_events(trainer.stub, created.name)
    assert states_of(live) == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING,
                               job_pb2.JOB_STATE_SUCCEEDED]
    epochs = _metric_events(live)
    assert [m.epoch for m in epochs] == list(range(1, 9))
    assert all(set(m.values) == EPOCH_METRICS for m in epochs)
    assert [e.sequence for e in live] == list(range(1, len(live) + 1))
    assert any(e.WhichOneof("kind") == "log" for e in live)

    job = await get_job(trainer.stub, created.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.model_version == "models/digits/versions/1"
    assert job.epoch == 8 and job.metrics["test_accuracy"] >= 0.9
    assert job.start_time.seconds and job.end_time.seconds

    version = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=job.model_version))
    assert version.metrics["test_accuracy"] == job.metrics["test_accuracy"]
    assert "candidate" in version.aliases
    assert version.labels["training_job"] == "mlp-1"
    operation = version.lineage.operation
    assert operation.kind == "train" and operation.job == "trainingJobs/mlp-1"
    parameters = json_format.MessageToDict(operation.parameters)
    assert parameters["hyperparameters"]["hidden_sizes"] == [32]
    assert parameters["seed"] == 0 and parameters["optimizer"]["kind"] == "adam"
    assert list(version.lineage.parents) == []  # builtin data has no registry parent
    assert [(i.name, i.shape) for i in version.signature.inputs] == [("input", [64])]
    assert [(o.name, o.shape) for o in version.signature.outputs] == [("logits", [10])]

    # Any service can rebuild the module from manifest + safetensors and get the accuracy back.
    _, package = await download(registry.stub.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=job.model_version)))
    (tmp_path / "model.safetensors").write_bytes(package)
    manifest, weights = load_torch_package(tmp_path / "model.safetensors")
    assert manifest.preprocessing == {"scale": 1 / 16}
    assert manifest.labels == [str(d) for d in range(10)]
    module = build_model(manifest.architecture.kind, manifest.architecture.hyperparameters, [64], 10)
    module.load_state_dict(weights)
    module.eval()
    digits = load_digits()
    with torch.no_grad():
        logits = module(torch.tensor(digits.data, dtype=torch.float32) * manifest.preprocessing["scale"])
    assert float((logits.argmax(1).numpy() == digits.target).mean()) >= 0.9

    # The job's directory keeps its record, not its bulk.
    # The bulk is discarded once the final state is recorded (a restart before that could still
    # need it to publish), so it may take a moment after the last event.
    workdir = trainer.jobs_dir / "mlp-1"
    record = ["job.log", "result.json", "run.json"]
    for _ in range(200):
        if sorted(path.name for path in workdir.iterdir()) == record:
            break
        await asyncio.sleep(0.05)
    assert sorted(path.name for path in workdir.iterdir()) == record

    # A new watcher gets the whole history again, and can skip what it has seen.
    replay = await watch_events(trainer.stub, created.name)
    assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in live]
    tail = await watch_events(trainer.stub, created.name, after_sequence=3)
    assert [e.sequence for e in tail] == [e.sequence for e in live[3:]]


async def test_registry_dataset_version_is_downloaded_and_becomes_lineage(trainer, registry):
    digits = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, pixels=digits.data.astype(np.float32), digit=digits.target.astype(np.int64))
    await registry.stub.CreateDataset(rs.CreateDatasetRequest(dataset_id="digits-npz"))
    dataset_version = await registry.stub.UploadDatasetVersion(dataset_upload_requests(
        "datasets/digits-npz", buffer.getvalue(), dataset_pb2.DATASET_FORMAT_NPZ, ["pixels"],
        "digit"))

    job = await create_job(trainer.stub, digits_spec(dataset=dataset_version.name, epochs=6,
                                                     model_id="digits-from-registry"))
    job = await wait_until_final(trainer.stub, job.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.metrics["test_accuracy"] >= 0.9
    version = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=job.model_version))
    assert list(version.lineage.parents) == [dataset_version.name]
    graph = await registry.stub.GetLineage(rs.GetLineageRequest(name=job.model_version))
    assert (dataset_version.name, job.model_version) in {(e.parent, e.child) for e in graph.edges}


async def test_transformer_with_the_full_recipe_stops_early(trainer, registry):
    spec = digits_spec(kind="transformer", hyperparameters={"d_model": 16, "nhead": 2, "num_layers": 1,
                                        "dim_feedforward": 32},
                       optimizer=tj.OPTIMIZER_KIND_MOMENTUM, learning_rate=0.05, epochs=60,
                       batch_size=64, model_id="transformer")
    spec.optimizer.nesterov = True
    spec.schedule.CopyFrom(tj.ScheduleSpec(kind=tj.SCHEDULE_KIND_COSINE, warmup_epochs=2))
    spec.gradient_clip_norm = 1.0
    spec.early_stopping.CopyFrom(tj.EarlyStopping(metric="val_loss", patience=2, min_delta=0.02))
    job = await create_job(trainer.stub, spec)
    assert job.spec.optimizer.momentum == 0.9  # the momentum default is filled in
    events = await watch_events(trainer.stub, job.name)
    job = await get_job(trainer.stub, job.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    rates = [m.values["lr"] for m in _metric_events(events)]
    assert rates[:3] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05])  # linear warm-up
    assert 3 < len(rates) < 60, "early stopping ended the run"
    assert rates[3:] == sorted(rates[3:], reverse=True) and rates[3] < 0.05  # cosine decay
    assert any("early stopping" in e.log.message for e in events if e.WhichOneof("kind") == "log")
    assert job.metrics["test_accuracy"] > 0.8
    version = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=job.model_version))
    assert version.metrics["epochs"] == len(rates)


async def test_accuracy_gate_fails_the_job_and_registers_nothing(trainer, registry):
    job = await create_job(trainer.stub, digits_spec(
        dataset="builtin:synthetic-classification", epochs=1, optimizer=tj.OPTIMIZER_KIND_SGD,
        learning_rate=1e-4, model_id="gated", min_test_accuracy=0.99))
    job = await wait_until_final(trainer.stub, job.name)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == "FAILED_PRECONDITION"
    assert "min_test_accuracy" in job.error.message and "nothing was registered" in job.error.message
    assert job.model_version == ""
    await expect_error(registry.stub.GetModel(rs.GetModelRequest(name="models/gated")),
                       grpc.StatusCode.NOT_FOUND)


async def test_a_version_someone_else_labelled_with_the_job_is_not_taken_for_its_result(
        trainer, registry):
    """Publishing finds a job's earlier upload by label and bytes: a label alone can be forged."""
    await registry.stub.CreateModel(rs.CreateModelRequest(model_id="labelled"))
    planted = await registry.stub.UploadModelVersion(model_upload_requests(
        "models/labelled", mlp_package(seed=3), labels={"training_job": "honest"}))

    created = await create_job(trainer.stub, digits_spec(epochs=1, model_id="labelled"),
                               job_id="honest")
    job = await wait_until_final(trainer.stub, created.name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.model_version == "models/labelled/versions/2" != planted.name
    trained = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=job.model_version))
    assert trained.artifact.sha256 != planted.artifact.sha256
    assert trained.lineage.operation.job == "trainingJobs/honest"


async def test_cancel_queued_then_running(start_trainer):
    trainer = await start_trainer(worker_slots=1)
    stub = trainer.stub
    running = await create_job(stub, digits_spec(epochs=5000, model_id="long"), job_id="long")
    queued = await create_job(stub, digits_spec(epochs=1, model_id="never"), job_id="waiting")

    cancelled = await stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name=queued.name))
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert not cancelled.HasField("start_time")  # it never ran

    await wait_for(stub, running.name, lambda job: job.epoch >= 1, timeout=60)
    workdir = str(trainer.jobs_dir / "long")
    pids = job_processes(workdir)
    assert pids, "the running job has a process"
    cancelled = await stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name=running.name))
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert not any(process_alive(pid) for pid in pids), "the job's processes are gone"
    assert states_of(await watch_events(stub, running.name))[-1] == job_pb2.JOB_STATE_CANCELLED
    await expect_error(stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name=running.name)),
                       grpc.StatusCode.FAILED_PRECONDITION)

    # The slot is free again: the next job starts.
    after = await create_job(stub, digits_spec(epochs=1, model_id="after"))
    await wait_for(stub, after.name, lambda job: job.state != job_pb2.JOB_STATE_QUEUED, timeout=30)


async def test_flooding_tenant_cannot_starve_another(start_trainer):
    trainer = await start_trainer(worker_slots=1)
    stub = trainer.stub
    flood = [await create_job(stub, digits_spec(epochs=1, tenant="flood", model_id="flood"),
                              job_id="flood-0")]
    await wait_for(stub, flood[0].name, lambda job: job.state == job_pb2.JOB_STATE_RUNNING)
    flood += [await create_job(stub, digits_spec(epochs=1, tenant="flood", model_id="flood"),
                               job_id=f"flood-{index}") for index in range(1, 19)]
    # The flooding tenant has 20 jobs in: 19 plain, one urgent.
    urgent = await create_job(stub, digits_spec(epochs=1, tenant="flood", priority=5,
                                                model_id="flood"), job_id="flood-urgent")
    solo = await create_job(stub, digits_spec(epochs=1, tenant="solo", model_id="solo"),
                            job_id="solo")
    solo_done = await wait_until_final(stub, solo.name)
    assert solo_done.state == job_pb2.JOB_STATE_SUCCEEDED, solo_done.error
    next_flood = await wait_for(
        stub, urgent.name, lambda job: job.state != job_pb2.JOB_STATE_QUEUED, timeout=60)

    jobs = {job.name: job for job in await list_jobs(stub)}
    started_before_solo = [name for name, job in jobs.items() if job.HasField("start_time")
                           and job.start_time.ToDatetime() < solo_done.start_time.ToDatetime()]
    # One slot: the flood job that held it when solo arrived, and nothing else, went first.
    assert started_before_solo == [flood[0].name], started_before_solo
    # Within the flooding tenant, priority beats submission order.
    assert next_flood.start_time.ToDatetime() >= solo_done.start_time.ToDatetime()
    assert all(jobs[job.name].state == job_pb2.JOB_STATE_QUEUED for job in flood[1:])
    await asyncio.gather(*(stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name=job.name))
                           for job in flood[1:]))


async def test_list_filters_and_pages_newest_first(start_trainer):
    trainer = await start_trainer(worker_slots=1)
    stub = trainer.stub
    await create_job(stub, digits_spec(epochs=5000, tenant="a", model_id="m"), job_id="a-1")
    for job_id, tenant in (("a-2", "a"), ("b-1", "b"), ("b-2", "b")):
        await create_job(stub, digits_spec(epochs=1, tenant=tenant, model_id="m"), job_id=job_id)
    await stub.CancelTrainingJob(ts.CancelTrainingJobRequest(name="trainingJobs/b-1"))

    assert [j.name for j in await list_jobs(stub)] == [
        "trainingJobs/b-2", "trainingJobs/b-1", "trainingJobs/a-2", "trainingJobs/a-1"]
    assert {j.name for j in await list_jobs(stub, 'tenant = "a"')} == {
        "trainingJobs/a-1", "trainingJobs/a-2"}
    assert [j.name for j in await list_jobs(stub, 'state = "CANCELLED"')] == ["trainingJobs/b-1"]
    assert [j.name for j in await list_jobs(stub, 'tenant = "b" AND state = "QUEUED"')] == [
        "trainingJobs/b-2"]
    assert [j.name for j in await list_jobs(stub, 'creator = "admin" AND NOT tenant = "a"')] == [
        "trainingJobs/b-2", "trainingJobs/b-1"]

    first = await stub.ListTrainingJobs(ts.ListTrainingJobsRequest(page_size=3))
    assert len(first.training_jobs) == 3 and first.next_page_token
    second = await stub.ListTrainingJobs(ts.ListTrainingJobsRequest(
        page_size=3, page_token=first.next_page_token))
    assert [j.name for j in second.training_jobs] == ["trainingJobs/a-1"]
    assert second.next_page_token == ""
    await expect_error(stub.ListTrainingJobs(ts.ListTrainingJobsRequest(
        page_size=3, page_token=first.next_page_token, filter='tenant = "a"')),
        grpc.StatusCode.INVALID_ARGUMENT, "page_token")
