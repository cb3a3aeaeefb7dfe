"""Helpers for compressor service tests: specs, real stubs, waiting, source models, a
compressor subprocess for kill -9 tests."""

from __future__ import annotations

from pathlib import Path

import grpc
from maas.common.v1 import architecture_pb2, job_pb2
from maas.compressor.v1 import (
    compression_job_pb2 as cj,
    compressor_service_pb2 as cs,
    compressor_service_pb2_grpc,
)
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs
from maas_runtime.client import open_channel

from tests.registry.helpers import model_upload_requests
from tests.support.jobs import is_final, states_of, wait_for_job  # noqa: F401 - states_of re-exported
from tests.support.processes import ServiceProcess


def spec(source: str, *steps: cj.CompressionStep, model_id: str = "compressed",
         dataset: str = "builtin:digits", gate: float | None = None, alias: str = "",
         seed: int = 0) -> cj.CompressionSpec:
    message = cj.CompressionSpec(
        source_model_version=source, steps=list(steps), evaluation_dataset=dataset,
        output=cj.CompressionOutput(model_id=model_id, alias=alias), seed=seed)
    if gate is not None:
        message.max_accuracy_drop = gate
    return message


def prune(amount: float, *, structured: bool = False, finetune_epochs: int = 0,
          scope=cj.PRUNE_SCOPE_UNSPECIFIED) -> cj.CompressionStep:
    return cj.CompressionStep(prune=cj.PruneStep(amount=amount, structured=structured,
                                                 finetune_epochs=finetune_epochs, scope=scope))


def quantize(dtype=cj.QUANTIZATION_DTYPE_INT8, mode=cj.QUANTIZATION_MODE_STATIC,
             calibration_samples: int = 64) -> cj.CompressionStep:
    return cj.CompressionStep(quantize=cj.QuantizeStep(
        dtype=dtype, mode=mode, calibration_samples=calibration_samples))


def distill(kind: str = "mlp", hyperparameters=None, epochs: int = 3) -> cj.CompressionStep:
    student = architecture_pb2.ArchitectureSpec(kind=kind)
    student.hyperparameters.update(hyperparameters if hyperparameters is not None
                                   else {"hidden_sizes": [16]})
    return cj.CompressionStep(distill=cj.DistillStep(student=student, epochs=epochs,
                                                     learning_rate=3e-3))


def fuse(*versions: str, method=cj.FUSION_METHOD_GREEDY_SOUP) -> cj.CompressionStep:
    return cj.CompressionStep(fuse=cj.FuseStep(model_versions=list(versions), method=method))


def convert(opset: int = 0) -> cj.CompressionStep:
    return cj.CompressionStep(convert=cj.ConvertStep(opset=opset))


async def create_job(stub, compression_spec: cj.CompressionSpec, job_id: str = "") -> cj.CompressionJob:
    return await stub.CreateCompressionJob(cs.CreateCompressionJobRequest(
        compression_job_id=job_id, compression_job=cj.CompressionJob(spec=compression_spec)),
        timeout=120)


async def get_job(stub, name: str) -> cj.CompressionJob:
    return await stub.GetCompressionJob(cs.GetCompressionJobRequest(name=name))


async def wait_for(stub, name: str, predicate, timeout: float = 180.0) -> cj.CompressionJob:
    """Poll Get until `predicate(job)` holds; fail with the job's last state otherwise."""
    return await wait_for_job(lambda job_name: get_job(stub, job_name), name, predicate, timeout)


async def wait_until_final(stub, name: str, timeout: float = 180.0) -> cj.CompressionJob:
    return await wait_for(stub, name, is_final, timeout)


async def watch_events(stub, name: str, timeout: float = 180.0) -> list[job_pb2.JobEvent]:
    """Every event of a Watch until the server ends the stream (the job is final)."""
    call = stub.WatchCompressionJob(cs.WatchCompressionJobRequest(name=name), timeout=timeout)
    return [event async for event in call]


async def upload(registry_stub, model_id: str, data: bytes, *,
                 fmt=model_pb2.MODEL_FORMAT_MAAS_PACKAGE, signature=None,
                 labels=None) -> model_pb2.ModelVersion:
    return await registry_stub.UploadModelVersion(model_upload_requests(
        f"models/{model_id}", data, fmt=fmt, signature=signature, labels=labels))


async def versions_of(registry_stub, model_id: str) -> list[model_pb2.ModelVersion]:
    try:
        listing = await registry_stub.ListModelVersions(rs.ListModelVersionsRequest(
            parent=f"models/{model_id}", page_size=100))
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise
    return list(listing.model_versions)


class CompressorProcess(ServiceProcess):
    """The compressor as a real subprocess (`python -m maas_compressor.server`)."""

    def __init__(self, state_dir: Path, registry_target: str, registry_token_file: Path):
        super().__init__("compressor", state_dir, registry_target=registry_target,
                         client_token_file=str(registry_token_file), worker_slots="1",
                         schedule_interval_seconds="0.2", watch_poll_seconds="0.2",
                         job_stop_grace_seconds="5")

    def channel(self) -> grpc.aio.Channel:
        return open_channel(self.target, token=self.admin_token())

    def stub(self, channel: grpc.aio.Channel) -> compressor_service_pb2_grpc.CompressorServiceStub:
        return compressor_service_pb2_grpc.CompressorServiceStub(channel)
