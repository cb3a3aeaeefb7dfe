"""Unmodified standard KServe-v2 clients against the gateway: perf_analyzer and tritonclient.

One registry and one inference service (in process, its native data plane on the public port,
the bundled Triton behind it) serve two deployments of two models, so a token scoped to one
model can be shown to see only its own. Spans go to an in-memory exporter, so the span the
service emits for a request the data plane served can be checked against its caller's.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel
from maas_runtime.telemetry import Telemetry
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import InferenceServerClient as SyncClient, InferInput, service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient as AioClient, InferInput as AioInferInput
from tritonclient.utils import InferenceServerException

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.inference.test_inference_service import batch, predict_request
from tests.registry.helpers import model_upload_requests
from tests.support.grpc_asserts import expect_error
from tests.support.perf_analyzer import run_perf_analyzer

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

HYPER = {"hidden_sizes": [16]}
MODELS = ("digits", "other")


class Gateway:
    """The running suite: the gateway's target, tokens, the app, the span exporter."""

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}"}

    def expected(self, data: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.digits(torch.from_numpy(data)).numpy()

    async def served(self, deployment: str) -> int:
        """Requests for `deployment` the data plane served itself."""
        stats = await self.app.data_plane.stats()
        return stats["deployments"].get(deployment, {}).get("served", 0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("standard-clients")
    g = Gateway()
    registry = build_registry(RegistrySettings(state_dir=root / "registry", port=0))
    registry_port = await registry.start()
    registry_token = (root / "registry" / "admin.token").read_text().strip()
    registry_channel = open_channel(f"127.0.0.1:{registry_port}", token=registry_token)
    registry_stub = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
    for seed, model_id in enumerate(MODELS):
        module = zoo_model("mlp", HYPER, [64], seed=seed)
        package = root / f"{model_id}.safetensors"
        save_zoo_package(package, module, kind="mlp", hyperparameters=HYPER, input_shape=[64])
        await registry_stub.CreateModel(rs.CreateModelRequest(model_id=model_id))
        await registry_stub.UploadModelVersion(
            model_upload_requests(f"models/{model_id}", package.read_bytes()))
        if model_id == "digits":
            g.digits = module
    g.exporter = InMemorySpanExporter()
    telemetry = Telemetry.create("inference",
                                 span_processors=(SimpleSpanProcessor(g.exporter),))
    settings = InferenceSettings(state_dir=root / "inference", port=0,
                                 registry_target=f"127.0.0.1:{registry_port}",
                                 client_token_file=root / "registry" / "admin.token")
    server, g.app = build_inference(settings, telemetry=telemetry)
    g.target = f"127.0.0.1:{await server.start()}"
    g.token = (root / "inference" / "admin.token").read_text().strip()
    g.scoped_token = add_token(settings.resolved_tokens_file, "digits-team", Role.VIEWER,
                               ["digits"])
    g.channel = open_channel(g.target, token=g.token)
    deployments = inference_service_pb2_grpc.InferenceServiceStub(g.channel)
    for model_id in MODELS:
        await deployments.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id=model_id,
            deployment=deployment_pb2.Deployment(model=f"models/{model_id}/versions/1")))
    yield g
    await g.channel.close()
    await server.stop(0)
    await registry_channel.close()
    await registry.stop(0)


def infer_input(data: np.ndarray, client=InferInput) -> InferInput:
    tensor = client("features", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


async def test_perf_analyzer_completes_a_run_through_the_gateway_with_a_token(gateway):
    served_before = await gateway.served("digits")
    # A functional run, not a measurement: perf_analyzer's own stability criterion (latency
    # within ±20% over 3 windows) is out of reach on a loaded CI machine, so it is widened.
    run = await run_perf_analyzer(gateway.target, "digits", concurrency=2, token=gateway.token,
                                  measurement_ms=300, stability_percent=100, max_trials=20)
    assert run.returncode == 0, run.output
    [figures] = run.figures
    assert figures.throughput > 0, run.output
    # Its requests (header value with a leading space, as `-H` sends it) were the data
    # plane's to serve, not declined to the service for a malformed token.
    assert await gateway.served("digits") - served_before >= 20


async def test_header_values_are_trimmed_by_the_service_and_the_data_plane(gateway):
    padded = (("authorization", f"  Bearer {gateway.token} "),)
    channel = grpc.aio.insecure_channel(gateway.target)
    try:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        deployment = await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/digits"),
                                              metadata=padded)  # answered by the service
        assert deployment.name == "deployments/digits"
        served_before = await gateway.served("digits")
        data = batch(2, seed=3)
        reply = await stub.Predict(predict_request("deployments/digits", data), metadata=padded)
        assert await gateway.served("digits") == served_before + 1  # by the data plane
        output = np.frombuffer(reply.outputs[0].raw_data, np.float32).reshape(2, 10)
        np.testing.assert_allclose(output, gateway.expected(data), rtol=1e-4, atol=1e-4)
    finally:
        await channel.close()


async def test_tritonclient_reads_config_statistics_and_repository_index(gateway):
    client = AioClient(gateway.target)
    try:
        headers = gateway.headers()
        data = batch(3, seed=1)
        await client.infer("digits", [infer_input(data, AioInferInput)], headers=headers)

        config = (await client.get_model_config("digits", headers=headers)).config
        assert config.name == "digits" and config.max_batch_size == 32
        assert [i.name for i in config.input] == ["features"]

        statistics = await client.get_inference_statistics("digits", headers=headers)
        [digits] = statistics.model_stats
        assert digits.name == "digits" and digits.inference_count >= 3
        assert digits.inference_stats.success.count >= 1
        everything = await client.get_inference_statistics("", headers=headers)
        assert [s.name for s in everything.model_stats] == ["digits", "other"]

        index = await client.get_model_repository_index(headers=headers)
        assert {(m.name, m.state) for m in index.models} == {("digits", "READY"),
                                                              ("other", "READY")}
    finally:
        await client.close()


async def test_a_scoped_token_sees_only_its_deployments(gateway):
    client = AioClient(gateway.target)
    try:
        headers = gateway.headers(gateway.scoped_token)
        index = await client.get_model_repository_index(headers=headers)
        assert [m.name for m in index.models] == ["digits"]
        statistics = await client.get_inference_statistics("", headers=headers)
        assert [s.name for s in statistics.model_stats] == ["digits"]
        assert (await client.get_model_config("digits", headers=headers)).config.name == "digits"
        for call in (client.get_model_config("other", headers=headers),
                     client.get_inference_statistics("other", headers=headers),
                     client.get_model_metadata("other", headers=headers)):
            with pytest.raises(InferenceServerException) as refused:
                await call
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "other" in refused.value.message()
    finally:
        await client.close()


def _stream(target: str, headers: dict, requests: list[tuple[str, np.ndarray, str]]):
    """tritonclient's (threaded) stream: every request sent, then every callback awaited."""
    results: queue.Queue = queue.Queue()
    client = SyncClient(target)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            headers=headers)
        for model, data, request_id in requests:
            client.async_stream_infer(model, [infer_input(data)], request_id=request_id)
        answers = [results.get(timeout=30) for _ in requests]
        client.stop_stream()
    finally:
        client.close()
    return answers


async def test_stream_infer_answers_every_request_in_order_with_errors_in_place(gateway):
    data = [batch(rows, seed=rows) for rows in (1, 2, 3, 4)]
    requests = [("digits", data[0], "a"), ("digits", data[1], "b"), ("missing", data[2], "c"),
                ("other", data[2], "d"), ("digits", data[3], "e")]
    answers = await asyncio.to_thread(_stream, gateway.target,
                                      gateway.headers(gateway.scoped_token), requests)
    ids = []
    for (model, sent, request_id), (result, error) in zip(requests, answers, strict=True):
        if model == "digits":
            assert error is None, error
            response = result.get_response()
            ids.append(response.id)
            assert response.model_name == "digits" and response.model_version == "1"
            np.testing.assert_allclose(result.as_numpy("logits"), gateway.expected(sent),
                                       rtol=1e-4, atol=1e-4)
        else:  # no such deployment; out of the token's scope: that request only
            assert result is None and error is not None
            assert model in error.message()
            ids.append(request_id)
    assert ids == ["a", "b", "c", "d", "e"]


async def test_a_stream_without_a_token_is_unauthenticated(gateway):
    request = service_pb2.ModelInferRequest(model_name="digits")
    channel = grpc.aio.insecure_channel(gateway.target)
    try:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]))

        async def responses():
            return [response async for response in call]

        await expect_error(responses(), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await channel.close()


async def test_methods_refused_by_design_say_so(gateway):
    client = AioClient(gateway.target)
    headers = gateway.headers()
    try:
        for call, code, words in (
            (client.load_model("digits", headers=headers), "PERMISSION_DENIED", "deployments"),
            (client.unload_model("digits", headers=headers), "PERMISSION_DENIED", "deployments"),
            (client.register_system_shared_memory("region", "/key", 64, headers=headers),
             "UNIMPLEMENTED", "shared memory"),
            (client.get_cuda_shared_memory_status(headers=headers), "UNIMPLEMENTED",
             "shared memory"),
            (client.update_trace_settings(settings={"trace_rate": "1"}, headers=headers),
             "UNIMPLEMENTED", "trace and log settings"),
            (client.update_log_settings({"log_verbose_level": 1}, headers=headers),
             "UNIMPLEMENTED", "trace and log settings"),
        ):
            with pytest.raises(InferenceServerException) as refused:
                await call
            assert refused.value.status() == f"StatusCode.{code}", refused.value.message()
            assert words in refused.value.message()
    finally:
        await client.close()


async def test_a_predict_served_by_the_data_plane_gets_a_span_in_its_callers_trace(gateway):
    trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = (("traceparent", f"00-{trace_id}-{caller_span_id}-01"),)
    served_before = await gateway.served("digits")
    stub = inference_service_pb2_grpc.InferenceServiceStub(gateway.channel)
    await stub.Predict(predict_request("deployments/digits", batch(1)), metadata=traceparent)
    assert await gateway.served("digits") == served_before + 1  # the service never saw it

    assert await gateway.app.data_plane_spans.export() >= 1
    [span] = [s for s in gateway.exporter.get_finished_spans()
              if s.context.trace_id == int(trace_id, 16)]
    assert span.parent.span_id == int(caller_span_id, 16)
    assert span.name == "maas.inference.v1.InferenceService/Predict"
    assert span.attributes["maas.served_by"] == "data-plane"
    assert span.attributes["maas.deployment"] == "digits"
    assert 0 < span.end_time - span.start_time < 5e9
