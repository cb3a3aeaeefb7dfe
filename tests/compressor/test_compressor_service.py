"""The compressor over real gRPC: a job of each kind end to end against a real registry,
registered with its metrics and lineage; the accuracy gate; bad inputs, each with its code
and field; cancel mid-job."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import onnx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from maas.common.v1 import job_pb2, tensor_pb2
from maas.compressor.v1 import compression_job_pb2 as cj, compressor_service_pb2 as cs
from maas.registry.v1 import dataset_pb2, model_pb2, registry_service_pb2 as rs

from tests.compressor.service_helpers import (
    convert,
    create_job,
    distill,
    fuse,
    prune,
    quantize,
    spec,
    states_of,
    upload,
    versions_of,
    wait_until_final,
    watch_events,
)
from tests.registry.helpers import dataset_upload_requests, download
from tests.support.grpc_asserts import expect_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPORT_METRICS = {
    "parameters", "nonzero_parameters", "artifact_bytes", "size_ratio", "accuracy_before",
    "accuracy_after", "latency_ms_b1_before", "latency_ms_b1_after", "latency_ms_b32_before",
    "latency_ms_b32_after", "gate_passed",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def finished(compressor_suite):
    """One job of each kind, submitted together (two run at a time), waited for."""
    suite = compressor_suite
    sources = suite.sources
    specs = {
        "prune-unstructured": spec("models/digits-mlp@production",
                                   prune(0.5, finetune_epochs=1, scope=cj.PRUNE_SCOPE_PER_LAYER),
                                   model_id="mlp-pruned", alias="candidate", gate=5.0),
        "prune-structured": spec(sources.cnn, prune(0.5, structured=True, finetune_epochs=1),
                                 model_id="cnn-slim"),
        "quantize-int8": spec(sources.cnn, quantize(), model_id="cnn-int8", gate=2.0),
        "distill": spec(sources.mlp, distill(hyperparameters={"hidden_sizes": [16]}, epochs=8),
                        model_id="mlp-student"),
        "fuse-soup": spec("models/digits-mlp@production", fuse(*sources.mlp_siblings),
                          model_id="mlp-soup"),
        "convert": spec(sources.mlp, convert(), model_id="mlp-onnx"),
    }
    created = {job_id: await create_job(suite.compressor, job_spec, job_id)
               for job_id, job_spec in specs.items()}
    assert {job.state for job in created.values()} <= {job_pb2.JOB_STATE_QUEUED,
                                                       job_pb2.JOB_STATE_RUNNING}
    jobs = dict(zip(created, await asyncio.gather(*(
        wait_until_final(suite.compressor, job.name, timeout=240)
        for job in created.values())), strict=True))
    return jobs


async def _registered(suite, job: cj.CompressionJob, source: str) -> model_pb2.ModelVersion:
    """Checks every registered result shares: state, metrics = report, lineage, label."""
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    version = await suite.registry.GetModelVersion(rs.GetModelVersionRequest(
        name=job.model_version))
    report = job.report
    assert REPORT_METRICS <= set(version.metrics)
    assert version.metrics["accuracy_before"] == pytest.approx(report.before.accuracy)
    assert version.metrics["accuracy_after"] == pytest.approx(report.after.accuracy)
    assert version.metrics["artifact_bytes"] == report.after.size_bytes
    assert version.metrics["size_ratio"] == pytest.approx(report.size_ratio)
    assert version.metrics["latency_ms_b32_after"] == pytest.approx(report.after.latency_ms_batch32)
    assert version.metrics["gate_passed"] == 1.0 and report.gate_passed
    assert report.before.latency_ms > 0 and report.after.latency_ms_batch32 > 0
    assert report.size_ratio == pytest.approx(report.after.size_bytes / report.before.size_bytes)
    assert version.artifact.size_bytes == report.after.size_bytes
    assert version.lineage.parents[0] == source
    assert version.lineage.operation.job == job.name
    parameters = json_format.MessageToDict(version.lineage.operation.parameters)
    assert [step["kind"] for step in parameters["steps"]] == [
        step.WhichOneof("step") for step in job.spec.steps]
    assert version.labels["compression_job"] == job.name.split("/")[1]
    assert len(report.steps) == len(job.spec.steps)
    return version


async def test_unstructured_prune_keeps_the_architecture_and_zeroes_half_the_weights(
        compressor_suite, finished):
    job = finished["prune-unstructured"]
    version = await _registered(compressor_suite, job, compressor_suite.sources.mlp)
    assert version.format == model_pb2.MODEL_FORMAT_MAAS_PACKAGE
    report = job.report
    assert report.after.parameters == report.before.parameters
    assert report.after.nonzero_parameters < 0.6 * report.before.nonzero_parameters
    assert report.steps[0].kind == "prune"
    assert report.steps[0].details.fields["sparsity"].number_value > 0.4
    assert report.accuracy_drop <= 5.0
    assert job.spec.source_model_version == "models/digits-mlp@production"
    assert job.spec.steps[0].prune.learning_rate == pytest.approx(1e-3)  # default filled in
    alias = await compressor_suite.registry.GetModelVersion(rs.GetModelVersionRequest(
        name="models/mlp-pruned@candidate"))
    assert alias.name == version.name


async def test_watch_replays_states_step_logs_and_metrics(compressor_suite, finished):
    events = await watch_events(compressor_suite.compressor,
                                finished["prune-unstructured"].name)
    assert states_of(events) == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING,
                                 job_pb2.JOB_STATE_SUCCEEDED]
    logs = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert any(line.startswith("step 1/1 prune started") for line in logs), logs
    phases = {e.metrics.phase for e in events if e.WhichOneof("kind") == "metrics"}
    assert {"measure source", "measure result", "step 1/1 prune"} <= phases
    finetune = [e.metrics for e in events if e.WhichOneof("kind") == "metrics"
                and "finetune_loss" in e.metrics.values]
    assert finetune and finetune[0].epoch == 1


async def test_structured_prune_registers_a_smaller_architecture(compressor_suite, finished):
    job = finished["prune-structured"]
    version = await _registered(compressor_suite, job, compressor_suite.sources.cnn)
    assert version.format == model_pb2.MODEL_FORMAT_MAAS_PACKAGE
    assert job.report.after.parameters < 0.7 * job.report.before.parameters
    assert job.report.after.size_bytes < job.report.before.size_bytes


async def test_int8_static_quantization_registers_a_smaller_onnx_version(compressor_suite, finished):
    job = finished["quantize-int8"]
    version = await _registered(compressor_suite, job, compressor_suite.sources.cnn)
    assert version.format == model_pb2.MODEL_FORMAT_ONNX
    assert version.labels["quantization"] == "int8"
    assert job.report.after.runtime == "onnxruntime" and job.report.before.runtime == "torch"
    assert job.report.size_ratio < 0.5
    _, artifact = await download(compressor_suite.registry.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=version.name)))
    graph = onnx.load_from_string(artifact)
    assert {initializer.data_type for initializer in graph.graph.initializer} >= {
        onnx.TensorProto.INT8}  # the saving is real: int8 weights in the artifact
    source = await compressor_suite.registry.GetModelVersion(rs.GetModelVersionRequest(
        name=compressor_suite.sources.cnn))
    assert version.signature == source.signature  # serves the source's interface


async def test_distillation_registers_a_smaller_student(compressor_suite, finished):
    job = finished["distill"]
    await _registered(compressor_suite, job, compressor_suite.sources.mlp)
    assert job.report.after.parameters < 0.3 * job.report.before.parameters
    assert job.report.after.accuracy > 0.6
    student = job.spec.steps[0].distill
    assert student.student.kind == "mlp" and student.temperature == 4 and student.alpha == 0.7


async def test_greedy_soup_names_every_member_as_a_parent(compressor_suite, finished):
    job = finished["fuse-soup"]
    version = await _registered(compressor_suite, job, compressor_suite.sources.mlp)
    assert list(version.lineage.parents) == [compressor_suite.sources.mlp,
                                             *compressor_suite.sources.mlp_siblings]
    details = json_format.MessageToDict(job.report.steps[0].details)
    assert details["method"] == "greedy_soup"
    # Members go in by validation accuracy; each one only if the soup does not get worse.
    assert details["members_used"] and set(details["members_used"]) <= {
        "source", *compressor_suite.sources.mlp_siblings}
    assert job.report.accuracy_drop < 2.0


async def test_convert_registers_an_onnx_version_verified_against_torch(compressor_suite, finished):
    job = finished["convert"]
    version = await _registered(compressor_suite, job, compressor_suite.sources.mlp)
    assert version.format == model_pb2.MODEL_FORMAT_ONNX
    details = json_format.MessageToDict(job.report.steps[0].details)
    assert details["opset"] == 18 and details["argmax_agreement"] >= 0.99
    assert job.report.after.accuracy == pytest.approx(job.report.before.accuracy, abs=0.01)


async def test_a_result_over_the_gate_fails_with_its_report_and_registers_nothing(compressor_suite):
    suite = compressor_suite
    job = await create_job(suite.compressor, spec(suite.sources.mlp, prune(0.98),
                                                  model_id="gated", gate=0.0))
    job = await wait_until_final(suite.compressor, job.name)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == "FAILED_PRECONDITION"
    assert "max_accuracy_drop" in job.error.message
    assert not job.report.gate_passed
    assert job.report.after.accuracy < job.report.before.accuracy
    assert job.report.accuracy_drop > 0 and job.report.steps[0].kind == "prune"
    assert job.model_version == ""
    assert await versions_of(suite.registry, "gated") == []


async def _twenty_feature_dataset(registry) -> str:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.normal(size=(50, 20)).astype(np.float32),
             y=rng.integers(0, 4, 50).astype(np.int64))
    await registry.CreateDataset(rs.CreateDatasetRequest(dataset_id="twenty"))
    version = await registry.UploadDatasetVersion(dataset_upload_requests(
        "datasets/twenty", buffer.getvalue(), dataset_pb2.DATASET_FORMAT_NPZ, ["x"], "y"))
    return version.name


S = "compression_job.spec."
BAD_INPUTS = {
    "unknown source": (lambda s: spec("models/nope/versions/1", prune(0.5)),
                       grpc.StatusCode.INVALID_ARGUMENT, S + "source_model_version"),
    "unknown alias": (lambda s: spec("models/digits-mlp@nope", prune(0.5)),
                      grpc.StatusCode.INVALID_ARGUMENT, S + "source_model_version"),
    "fusing another architecture": (lambda s: spec(s.mlp, fuse(s.mlp_siblings[0], s.small_mlp)),
                                    grpc.StatusCode.INVALID_ARGUMENT,
                                    S + "steps[0].fuse.model_versions[1]"),
    "amount above 1": (lambda s: spec(s.mlp, prune(1.5)), grpc.StatusCode.INVALID_ARGUMENT,
                       S + "steps[0].prune.amount"),
    "amount 0": (lambda s: spec(s.mlp, prune(0.0)), grpc.StatusCode.INVALID_ARGUMENT,
                 S + "steps[0].prune.amount"),
    "negative gate": (lambda s: spec(s.mlp, prune(0.5), gate=-1.0),
                      grpc.StatusCode.INVALID_ARGUMENT, S + "max_accuracy_drop"),
    "no steps": (lambda s: spec(s.mlp), grpc.StatusCode.INVALID_ARGUMENT, S + "steps"),
    "unknown student kind": (lambda s: spec(s.mlp, distill(kind="resnet", hyperparameters={})),
                             grpc.StatusCode.INVALID_ARGUMENT,
                             S + "steps[0].distill.student.kind"),
    "student hyperparameter unknown": (
        lambda s: spec(s.mlp, distill(hyperparameters={"depth": 3})),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].distill.student.hyperparameters.depth"),
    "prune after convert": (lambda s: spec(s.mlp, convert(), prune(0.5)),
                            grpc.StatusCode.INVALID_ARGUMENT, S + "steps[1]"),
    "opset too old": (lambda s: spec(s.mlp, convert(opset=11)),
                      grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].convert.opset"),
    "unknown dataset kind": (lambda s: spec(s.mlp, prune(0.5), dataset="builtin:mnist"),
                             grpc.StatusCode.INVALID_ARGUMENT, S + "evaluation_dataset"),
    "missing dataset version": (
        lambda s: spec(s.mlp, prune(0.5), dataset="datasets/none/versions/1"),
        grpc.StatusCode.FAILED_PRECONDITION, S + "evaluation_dataset"),
    "no output model": (lambda s: spec(s.mlp, prune(0.5), model_id=""),
                        grpc.StatusCode.INVALID_ARGUMENT, S + "output.model_id"),
    "quantize without dtype": (lambda s: spec(s.mlp, quantize(dtype=0)),
                               grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].quantize.dtype"),
    "accuracy-aware torchao int8": (
        lambda s: spec(s.mlp, cj.CompressionStep(quantize=cj.QuantizeStep(
            dtype=cj.QUANTIZATION_DTYPE_INT8, format="torch", accuracy_aware=True))),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].quantize.accuracy_aware"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
async def test_bad_input_is_refused_at_create_naming_the_field(compressor_suite, case):
    build, code, field = BAD_INPUTS[case]
    await expect_error(create_job(compressor_suite.compressor, build(compressor_suite.sources)),
                       code, field)


async def test_refused_requests_leave_no_job_and_no_files(compressor_suite):
    suite = compressor_suite
    await expect_error(create_job(suite.compressor, spec(
        suite.sources.mlp, fuse(suite.sources.small_mlp)), job_id="refused-fuse"),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].fuse.model_versions[0]")
    await expect_error(suite.compressor.GetCompressionJob(cs.GetCompressionJobRequest(
        name="compressionJobs/refused-fuse")), grpc.StatusCode.NOT_FOUND)
    assert not (suite.compressor_state / "jobs" / "refused-fuse").exists()


async def test_a_dataset_whose_features_do_not_fit_the_model_is_refused(compressor_suite):
    suite = compressor_suite
    dataset = await _twenty_feature_dataset(suite.registry)
    error = await expect_error(create_job(suite.compressor, spec(
        suite.sources.mlp, prune(0.5), dataset=dataset)), grpc.StatusCode.FAILED_PRECONDITION,
        S + "evaluation_dataset")
    assert "[20]" in error.details() and "[64]" in error.details()


async def test_quantizing_an_int8_version_again_is_refused(compressor_suite, finished):
    int8_version = finished["quantize-int8"].model_version
    error = await expect_error(create_job(compressor_suite.compressor, spec(
        int8_version, quantize(mode=cj.QUANTIZATION_MODE_DYNAMIC))),
        grpc.StatusCode.FAILED_PRECONDITION, S + "steps[0].quantize.dtype")
    assert "already quantized" in error.details()


async def test_a_torch_step_on_an_onnx_source_cannot_export_again(compressor_suite, finished):
    onnx_version = finished["convert"].model_version
    for step in (convert(), prune(0.5)):
        await expect_error(create_job(compressor_suite.compressor, spec(onnx_version, step)),
                           grpc.StatusCode.FAILED_PRECONDITION, S + "steps[0]")
    torchao = cj.CompressionStep(quantize=cj.QuantizeStep(dtype=cj.QUANTIZATION_DTYPE_INT8,
                                                          format="torch"))
    await expect_error(create_job(compressor_suite.compressor, spec(onnx_version, torchao)),
                       grpc.StatusCode.FAILED_PRECONDITION, S + "steps[0].quantize.format")


async def test_a_student_whose_outputs_differ_from_the_teachers_is_refused():
    from maas_compressor.inspection import check_student
    from maas_formats.manifest import ModelSignature, TensorSignature
    from maas_runtime.errors import FailedPrecondition

    teacher = ModelSignature((TensorSignature("input", "FP32", (64,)),),
                             (TensorSignature("logits", "FP32", (2, 5)),))
    with pytest.raises(FailedPrecondition) as refused:
        check_student({"kind": "mlp", "hyperparameters": {"hidden_sizes": [8]}}, teacher,
                      S + "steps[0].distill.student")
    assert refused.value.field_violations[0].field == S + "steps[0].distill.student"
    assert "[5]" in refused.value.message and "[2, 5]" in refused.value.message


async def test_cancel_mid_job_stops_its_process_and_registers_nothing(compressor_suite):
    suite = compressor_suite
    job = await create_job(suite.compressor, spec(
        suite.sources.mlp, distill(hyperparameters={"hidden_sizes": [16]}, epochs=500),
        model_id="cancelled"), job_id="cancel-me")
    call = suite.compressor.WatchCompressionJob(cs.WatchCompressionJobRequest(name=job.name),
                                                timeout=120)
    async for event in call:
        if event.WhichOneof("kind") == "metrics" and "distill_loss" in event.metrics.values:
            break  # distillation is under way
    call.cancel()
    cancelled = await suite.compressor.CancelCompressionJob(
        cs.CancelCompressionJobRequest(name=job.name))
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    events = await watch_events(suite.compressor, job.name)
    assert states_of(events)[-1] == job_pb2.JOB_STATE_CANCELLED
    workdir = str(suite.compressor_state / "jobs" / "cancel-me")
    assert not [pid for pid in _pids_mentioning(workdir)]
    assert await versions_of(suite.registry, "cancelled") == []
    await expect_error(suite.compressor.CancelCompressionJob(
        cs.CancelCompressionJobRequest(name=job.name)), grpc.StatusCode.FAILED_PRECONDITION)


def _pids_mentioning(marker: str) -> list[int]:
    from tests.trainer.helpers import job_processes

    return job_processes(marker)


async def test_the_deprecated_student_fields_still_name_the_student(compressor_suite):
    suite = compressor_suite
    step = cj.CompressionStep(distill=cj.DistillStep(
        student_kind="mlp", student_hyperparameters_json='{"hidden_sizes": [8]}', epochs=1))
    job = await create_job(suite.compressor, spec(suite.sources.mlp, step, model_id="legacy"))
    assert job.spec.steps[0].distill.student.kind == "mlp"
    assert json_format.MessageToDict(job.spec.steps[0].distill.student.hyperparameters) == {
        "hidden_sizes": [8.0]}
    await suite.compressor.CancelCompressionJob(cs.CancelCompressionJobRequest(name=job.name))
    broken = cj.CompressionStep(distill=cj.DistillStep(
        student_kind="mlp", student_hyperparameters_json="{hidden", epochs=1))
    await expect_error(create_job(suite.compressor, spec(suite.sources.mlp, broken)),
                       grpc.StatusCode.INVALID_ARGUMENT,
                       S + "steps[0].distill.student_hyperparameters_json")


async def test_a_registry_dataset_version_is_measured_on_and_becomes_a_parent(compressor_suite):
    from sklearn.datasets import load_digits

    suite = compressor_suite
    digits = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, pixels=digits.data.astype(np.float32), digit=digits.target.astype(np.int64))
    await suite.registry.CreateDataset(rs.CreateDatasetRequest(dataset_id="digits-npz"))
    dataset = await suite.registry.UploadDatasetVersion(dataset_upload_requests(
        "datasets/digits-npz", buffer.getvalue(), dataset_pb2.DATASET_FORMAT_NPZ, ["pixels"],
        "digit"))
    job = await create_job(suite.compressor, spec(suite.sources.mlp, prune(0.3),
                                                  dataset=dataset.name, model_id="on-registry"))
    job = await wait_until_final(suite.compressor, job.name)
    version = await _registered(suite, job, suite.sources.mlp)
    assert list(version.lineage.parents) == [suite.sources.mlp, dataset.name]
    assert job.report.before.accuracy > 0.8


async def test_scoped_tokens_reach_only_jobs_whose_every_model_is_in_scope(compressor_suite, finished):
    from maas.compressor.v1 import compressor_service_pb2_grpc
    from maas_runtime.auth import Role, add_token
    from maas_runtime.client import open_channel

    suite = compressor_suite
    token = add_token(suite.tokens_file, "team", Role.EDITOR, ["digits-mlp*", "mlp-*"])
    channel = open_channel(suite.compressor_target, token=token)
    scoped = compressor_service_pb2_grpc.CompressorServiceStub(channel)
    try:
        seen = await scoped.GetCompressionJob(cs.GetCompressionJobRequest(
            name=finished["prune-unstructured"].name))  # digits-mlp → mlp-pruned: in scope
        assert seen.model_version
        await expect_error(scoped.GetCompressionJob(cs.GetCompressionJobRequest(
            name=finished["quantize-int8"].name)), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(scoped.CancelCompressionJob(cs.CancelCompressionJobRequest(
            name=finished["quantize-int8"].name)), grpc.StatusCode.PERMISSION_DENIED)
        listed = await scoped.ListCompressionJobs(cs.ListCompressionJobsRequest(page_size=100))
        names = {job.name for job in listed.compression_jobs}
        assert finished["prune-unstructured"].name in names
        assert finished["quantize-int8"].name not in names
        await expect_error(create_job(scoped, spec(suite.sources.mlp, prune(0.5),
                                                   model_id="elsewhere")),
                           grpc.StatusCode.PERMISSION_DENIED)
    finally:
        await channel.close()


async def test_a_source_the_job_process_cannot_load_fails_the_job_with_the_reason(
        compressor_suite, finished):
    """An ONNX version whose declared signature names other tensors than its graph: Create
    accepts it (the registry vouches for the bytes), the job process refuses it."""
    suite = compressor_suite
    _, graph = await download(suite.registry.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=finished["convert"].model_version)))
    signature = model_pb2.Signature()
    signature.inputs.add(name="pixels", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[64])
    signature.outputs.add(name="scores", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[10])
    mislabelled = await upload(suite.registry, "mislabelled", graph,
                               fmt=model_pb2.MODEL_FORMAT_ONNX, signature=signature)
    job = await create_job(suite.compressor, spec(
        mislabelled.name, quantize(mode=cj.QUANTIZATION_MODE_DYNAMIC), model_id="never"))
    job = await wait_until_final(suite.compressor, job.name)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == "FAILED_PRECONDITION"
    assert "pixels" in job.error.message and "input" in job.error.message
    assert await versions_of(suite.registry, "never") == []
