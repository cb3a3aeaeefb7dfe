"""The compressor service on a sentence encoder, over real gRPC: all-MiniLM-L6-v2 imported with
the SDK as an HF_TRANSFORMER version, compressed by a convert + int8 job, measured on the
held-out pydoc sentences and gated on mean cosine to the source; the result is registered
with its report as metrics and lineage, and still an HF_TRANSFORMER zip (tokenizer included)
whose embeddings agree with the source's. With format "torch" the result is the int8 torch
encoder, labelled with its own facts as an import of it would be. Bad encoder requests fail at
Create naming the field.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import json_format
from maas.common.v1 import job_pb2
from maas.compressor.v1 import compression_job_pb2 as cj
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs
from maas_compressor.hf_models import embed, load_hf, mean_cosine, probe_sentences
from maas_text import HfDirectory, minilm_directory, unzip_directory
from maas_text.int8 import SCHEME

from tests.compressor.conftest import Sources, compressor_servers
from tests.compressor.service_helpers import convert, create_job, prune, spec, versions_of, wait_until_final
from tests.registry.helpers import download
from tests.support.grpc_asserts import expect_error

pytestmark = pytest.mark.asyncio(loop_scope="module")
S = "compression_job.spec."


def _quantize_int8(**fields) -> cj.CompressionStep:
    return cj.CompressionStep(quantize=cj.QuantizeStep(dtype=cj.QUANTIZATION_DTYPE_INT8, **fields))


def _import_minilm(registry_target: str, token: str) -> str:
    from maas_sdk.client import Client

    client = Client(targets={"registry": registry_target}, token=token)
    try:
        return client.import_hf(minilm_directory(), model="minilm").name
    finally:
        client.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def encoder_suite(tmp_path_factory):
    """Registry and compressor in this process; MiniLM imported with the SDK as `sources.mlp`."""
    root = tmp_path_factory.mktemp("encoder-suite")

    async def minilm(_registry, target: str) -> Sources:
        token = (root / "registry" / "admin.token").read_text().strip()
        return Sources(mlp=await asyncio.to_thread(_import_minilm, target, token))

    async with compressor_servers(root, minilm) as suite:
        yield suite


async def _registered(suite, name: str) -> model_pb2.ModelVersion:
    return await suite.registry.GetModelVersion(rs.GetModelVersionRequest(name=name))


async def test_convert_and_int8_register_an_encoder_close_to_the_source_with_its_report(
        encoder_suite, tmp_path):
    suite = encoder_suite
    job = await create_job(suite.compressor, spec(
        suite.sources.mlp, convert(), _quantize_int8(), model_id="minilm-int8", dataset="",
        alias="int8"), job_id="minilm-int8")
    assert job.spec.evaluation_dataset == ""
    final = await wait_until_final(suite.compressor, job.name, timeout=240)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.model_version
    report = final.report
    assert report.mean_cosine >= 0.99 and report.similarity_spearman >= 0.97
    assert report.after.runtime == "onnxruntime" and report.before.runtime == "torch"

    version = await _registered(suite, final.model_version)
    assert version.format == model_pb2.MODEL_FORMAT_HF_TRANSFORMER
    metrics = dict(version.metrics)
    assert metrics["mean_cosine"] >= 0.99 and metrics["gate_passed"] == 1.0
    assert metrics["compression_ratio"] >= 2.3, metrics
    assert metrics["latency_ms_b32_before"] > 0 and metrics["latency_ms_b32_after"] > 0
    assert version.labels["compression_job"] == "minilm-int8"
    assert version.labels["text.weights_format"] == "onnx"
    assert version.labels["text.tokenizer_class"]
    assert [tensor.name for tensor in version.signature.inputs] == ["text"]
    assert list(version.lineage.parents) == [suite.sources.mlp]
    assert version.lineage.operation.job == job.name

    # The registered zip carries its tokenizer and embeds as the job measured.
    _, data = await download(suite.registry.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=final.model_version)))
    archive = tmp_path / "int8.zip"
    archive.write_bytes(data)
    result = load_hf(archive, tmp_path / "int8")
    source_sentences = probe_sentences()
    with tempfile.TemporaryDirectory() as temporary:
        source = load_hf(_zip_minilm(Path(temporary)), Path(temporary) / "source")
        cosine = mean_cosine(embed(source.form, source_sentences), embed(result.form, source_sentences))
    assert abs(cosine - report.mean_cosine) < 1e-4

    # The int8 torch encoder is made from safetensors weights; this result holds an ONNX graph.
    await expect_error(create_job(suite.compressor, spec(
        final.model_version, _quantize_int8(format="torch"), dataset="")),
        grpc.StatusCode.FAILED_PRECONDITION, S + "steps[0].quantize.format")


async def test_a_torch_int8_job_registers_an_int8_encoder_labelled_as_its_import_would_be(
        encoder_suite, tmp_path):
    suite = encoder_suite
    job = await create_job(suite.compressor, spec(
        suite.sources.mlp, _quantize_int8(format="torch"), model_id="minilm-torch-int8",
        dataset=""), job_id="minilm-torch-int8")
    assert job.spec.steps[0].quantize.format == "torch"
    final = await wait_until_final(suite.compressor, job.name, timeout=300)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    report = final.report
    details = json_format.MessageToDict(report.steps[0].details)
    assert details["format"] == "torch" and details["gate_met"], details
    assert report.after.runtime == report.before.runtime == "torch"
    assert report.mean_cosine >= 0.99 and report.size_ratio <= 0.3, (report.mean_cosine,
                                                                    report.size_ratio)

    version = await _registered(suite, final.model_version)
    assert version.format == model_pb2.MODEL_FORMAT_HF_TRANSFORMER
    assert list(version.lineage.parents) == [suite.sources.mlp]
    assert version.lineage.operation.job == job.name
    assert dict(version.metrics)["mean_cosine"] >= 0.99
    assert version.labels["quantization"] == "int8"
    # What `HfDirectory.facts` says of the result, as an import of it would label it.
    assert version.labels["text.quantization"] == SCHEME
    assert version.labels["text.weights_format"] == "safetensors"

    _, data = await download(suite.registry.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name=final.model_version)))
    archive = tmp_path / "torch-int8.zip"
    archive.write_bytes(data)
    directory = unzip_directory(archive, tmp_path / "torch-int8")
    assert HfDirectory.open(directory).int8_layers
    assert {key: value for key, value in version.labels.items() if key.startswith("text.")} == {
        f"text.{key}": value for key, value in HfDirectory.open(directory).facts().items()
        if key != "tokenizer_files"}

    # An int8 encoder is a result: no step starts from it.
    await expect_error(create_job(suite.compressor, spec(
        final.model_version, _quantize_int8(format="torch"), dataset="")),
        grpc.StatusCode.FAILED_PRECONDITION, S + "steps[0]")


def _zip_minilm(directory: Path) -> Path:
    from maas_text import zip_directory

    return zip_directory(minilm_directory(), directory / "minilm.zip")


async def test_an_int8_result_under_a_strict_cosine_gate_fails_and_registers_nothing(encoder_suite):
    suite = encoder_suite
    strict = spec(suite.sources.mlp, _quantize_int8(), model_id="minilm-strict",
                  dataset="builtin:pydoc")
    strict.min_mean_cosine = 0.9999
    job = await create_job(suite.compressor, strict, job_id="minilm-strict")
    final = await wait_until_final(suite.compressor, job.name, timeout=240)
    assert not final.model_version
    assert final.error.code == "FAILED_PRECONDITION"
    assert "min_mean_cosine 0.9999" in final.error.message
    assert 0.99 <= final.report.mean_cosine < 0.9999 and not final.report.gate_passed
    assert await versions_of(suite.registry, "minilm-strict") == []


BAD_ENCODER_INPUTS = {
    "prune an encoder": (lambda s: spec(s.mlp, prune(0.5), dataset=""),
                         grpc.StatusCode.FAILED_PRECONDITION, S + "steps[0]"),
    "digits for an encoder": (lambda s: spec(s.mlp, convert()),
                              grpc.StatusCode.INVALID_ARGUMENT, S + "evaluation_dataset"),
    "accuracy gate on an encoder": (lambda s: spec(s.mlp, convert(), dataset="", gate=1.0),
                                    grpc.StatusCode.INVALID_ARGUMENT, S + "max_accuracy_drop"),
    "distill without teacher layers": (
        lambda s: spec(s.mlp, cj.CompressionStep(distill=cj.DistillStep(
            epochs=1, student=_mlp_student())), dataset=""),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].distill.teacher_layers"),
    "static int8 for an encoder": (
        lambda s: spec(s.mlp, _quantize_int8(mode=cj.QUANTIZATION_MODE_STATIC), dataset=""),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].quantize.mode"),
    "per-tensor torch int8 encoder": (
        lambda s: spec(s.mlp, _quantize_int8(format="torch", per_channel=False), dataset=""),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].quantize.per_channel"),
    "torch int8 after a convert": (
        lambda s: spec(s.mlp, convert(), _quantize_int8(format="torch"), dataset=""),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[1].quantize.format"),
    "unknown quantize format": (
        lambda s: spec(s.mlp, _quantize_int8(format="tflite"), dataset=""),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].quantize.format"),
    "teacher layer out of range": (
        lambda s: spec(s.mlp, cj.CompressionStep(distill=cj.DistillStep(
            epochs=1, teacher_layers=[0, 6])), dataset=""),
        grpc.StatusCode.INVALID_ARGUMENT, S + "steps[0].distill.teacher_layers"),
}


def _mlp_student():
    from maas.common.v1 import architecture_pb2

    return architecture_pb2.ArchitectureSpec(kind="mlp")


@pytest.mark.parametrize("case", BAD_ENCODER_INPUTS)
async def test_bad_encoder_requests_are_refused_at_create_naming_the_field(encoder_suite, case):
    build, code, field = BAD_ENCODER_INPUTS[case]
    await expect_error(create_job(encoder_suite.compressor, build(encoder_suite.sources)), code, field)


async def test_gate_fields_are_checked_as_numbers():
    from maas_compressor.spec import parse_compression_spec
    from maas_runtime.errors import InvalidArgument

    fields = {"source_model_version": "models/m/versions/1",
              "steps": [{"kind": "convert", "parameters": {}}], "evaluation_dataset": "",
              "output": {"model_id": "out"}, "min_mean_cosine": 1.5}
    with pytest.raises(InvalidArgument) as raised:
        parse_compression_spec(fields, default_tenant="t")
    assert [v.field for v in raised.value.field_violations] == [S + "min_mean_cosine"]
    assert np.isclose(parse_compression_spec({**fields, "min_mean_cosine": 0.98},
                                             default_tenant="t").min_mean_cosine, 0.98)
