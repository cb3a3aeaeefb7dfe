"""The inference service end to end: a real registry, a real Triton, real stubs.

One registry (in-process) holds two versions of a digits MLP; one inference service (in
process) supervises the bundled tritonserver. Deployments are created from aliases, served
through Predict and the KServe-v2 endpoint, split, shadowed, rolled out under load, made to
follow alias moves, and survive a kill -9 of Triton.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.registry.helpers import model_upload_requests
from tests.support.grpc_asserts import expect_error

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

HYPER = {"hidden_sizes": [32]}


class Suite:
    """Handles on the running registry and inference service, and the reference modules."""

    def __init__(self):
        self.references: dict[int, torch.nn.Module] = {}

    def predict_stub(self):
        return inference_service_pb2_grpc.InferenceServiceStub(self.inference_channel)

    def kserve_stub(self):
        return service_pb2_grpc.GRPCInferenceServiceStub(self.inference_channel)

    def expected(self, version: int, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.references[version](torch.from_numpy(batch)).numpy()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def suite(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("suite")
    s = Suite()
    registry_settings = RegistrySettings(state_dir=root / "registry", port=0, event_poll_seconds=0.1)
    s.registry = build_registry(registry_settings)
    registry_port = await s.registry.start()
    registry_token = (root / "registry" / "admin.token").read_text().strip()
    s.registry_target, s.registry_token = f"127.0.0.1:{registry_port}", registry_token
    s.registry_channel = open_channel(s.registry_target, token=registry_token)
    registry = registry_service_pb2_grpc.RegistryServiceStub(s.registry_channel)
    s.registry_stub = registry
    await registry.CreateModel(rs.CreateModelRequest(model_id="digits"))
    for version in (1, 2):
        module = zoo_model("mlp", HYPER, [64], seed=version)
        path = root / f"v{version}.safetensors"
        save_zoo_package(path, module, kind="mlp", hyperparameters=HYPER, input_shape=[64])
        s.references[version] = module
        await registry.UploadModelVersion(model_upload_requests("models/digits", path.read_bytes()))
    await registry.SetModelAlias(
        rs.SetModelAliasRequest(name="models/digits/aliases/prod", version="models/digits/versions/1")
    )

    # The registry is found through discovery (round-robin channel), as in production.
    inference_settings = InferenceSettings(state_dir=root / "inference", port=0,
                                           rollout_drain_seconds=10,
                                           client_token_file=root / "registry" / "admin.token")
    s.inference, s.app = build_inference(
        inference_settings,
        discovery=StaticDiscovery({"registry": [f"127.0.0.1:{registry_port}"]}))
    port = await s.inference.start()
    s.target = f"127.0.0.1:{port}"
    s.token = (root / "inference" / "admin.token").read_text().strip()
    s.inference_channel = open_channel(s.target, token=s.token)
    yield s
    await s.inference_channel.close()
    await s.inference.stop(0)
    await s.registry_channel.close()
    await s.registry.stop(0)


def batch(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (rows, 64)).astype(np.float32)


def predict_request(deployment: str, data: np.ndarray, request_id: str = "", **overrides):
    tensor = tensor_pb2.Tensor(
        name="features", datatype=tensor_pb2.DATA_TYPE_FP32, shape=list(data.shape), raw_data=data.tobytes()
    )
    for key, value in overrides.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, key, value)
    return inf.PredictRequest(deployment=deployment, request_id=request_id, inputs=[tensor])


def logits(reply) -> np.ndarray:
    output = reply.outputs[0]
    return np.frombuffer(output.raw_data, np.float32).reshape(tuple(output.shape))


async def create(suite, deployment_id: str, **fields):
    return await suite.predict_stub().CreateDeployment(
        inf.CreateDeploymentRequest(
            deployment_id=deployment_id, deployment=deployment_pb2.Deployment(**fields)
        )
    )




async def test_deploy_alias_and_predict_matches_torch(suite):
    deployment = await create(suite, "digits", model="models/digits@prod")
    assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY
    assert list(deployment.serving_versions) == ["models/digits/versions/1"]
    data = batch(5)
    reply = await suite.predict_stub().Predict(predict_request("deployments/digits", data))
    assert reply.model_version == "models/digits/versions/1"
    np.testing.assert_allclose(logits(reply), suite.expected(1, data), rtol=1e-4, atol=1e-4)
    config = (suite.app.supervisor.server.model_repository / "digits.digits.v1" / "config.pbtxt").read_text()
    assert "dynamic_batching" in config and "max_batch_size: 32" in config


async def test_kserve_v2_endpoint_serves_the_deployment(suite):
    kserve = suite.kserve_stub()
    assert (await kserve.ServerLive(service_pb2.ServerLiveRequest())).live
    assert (await kserve.ServerReady(service_pb2.ServerReadyRequest())).ready
    assert (await kserve.ModelReady(service_pb2.ModelReadyRequest(name="digits"))).ready
    metadata = await kserve.ModelMetadata(service_pb2.ModelMetadataRequest(name="digits"))
    assert metadata.inputs[0].name == "features" and list(metadata.inputs[0].shape) == [-1, 64]
    data = batch(3, seed=4)
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="features", datatype="FP32", shape=[3, 64])
    request.raw_input_contents.append(data.tobytes())
    reply = await kserve.ModelInfer(request)
    assert reply.model_name == "digits" and reply.model_version == "1"
    out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(3, 10)
    np.testing.assert_allclose(out, suite.expected(1, data), rtol=1e-4, atol=1e-4)
    anonymous = service_pb2_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(suite.target))
    await expect_error(anonymous.ModelInfer(request), grpc.StatusCode.UNAUTHENTICATED)


async def test_kserve_bytes_that_are_no_request_are_invalid_argument(suite):
    model_infer = suite.inference_channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    await expect_error(model_infer(b"\xff\xff\xff not protobuf"), grpc.StatusCode.INVALID_ARGUMENT,
                       "request")


async def test_unmodified_tritonclient_works_through_the_gateway(suite):
    from tritonclient.grpc.aio import InferenceServerClient, InferInput

    client = InferenceServerClient(suite.target)
    try:
        headers = {"authorization": f"Bearer {suite.token}"}
        data = batch(2, seed=9)
        tensor = InferInput("features", [2, 64], "FP32")
        tensor.set_data_from_numpy(data)
        result = await client.infer("digits", [tensor], headers=headers)
        np.testing.assert_allclose(result.as_numpy("logits"), suite.expected(1, data), rtol=1e-4, atol=1e-4)
    finally:
        await client.close()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"datatype": tensor_pb2.DATA_TYPE_INT64}, "inputs[0].datatype"),
        ({"shape": [2, 63]}, "inputs[0].shape"),
        ({"raw_data": b"\0" * 10}, "inputs[0].raw_data"),
        ({"name": "pixels"}, "inputs[0].name"),
        ({"shape": [0, 64], "raw_data": b""}, "inputs[0].shape"),
        ({"shape": [33, 64], "raw_data": b"\0" * (33 * 64 * 4)}, "inputs[0].shape"),
    ],
)
async def test_bad_requests_name_the_expected_spec(suite, overrides, field):
    error = await expect_error(
        suite.predict_stub().Predict(predict_request("deployments/digits", batch(2), **overrides)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )
    assert "features" in error.details()


async def test_unknown_deployment_and_deadline(suite):
    await expect_error(
        suite.predict_stub().Predict(predict_request("deployments/nope", batch(1))), grpc.StatusCode.NOT_FOUND
    )
    # A stalled Triton (SIGSTOP) must not hold a caller past its deadline.
    os.kill(suite.app.supervisor.server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        await expect_error(
            suite.predict_stub().Predict(predict_request("deployments/digits", batch(1)), timeout=0.5),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        assert time.monotonic() - started < 2
    finally:
        os.kill(suite.app.supervisor.server.pid, signal.SIGCONT)
    await expect_error(
        create(
            suite,
            "bad",
            model="models/digits@prod",
            traffic=[deployment_pb2.TrafficTarget(model_version="models/digits/versions/1", percent=60)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "deployment.traffic",
    )
    await expect_error(create(suite, "ghost", model="models/ghost@prod"), grpc.StatusCode.NOT_FOUND)
    listed = await suite.predict_stub().ListDeployments(inf.ListDeploymentsRequest())
    assert [d.name for d in listed.deployments] == ["deployments/digits"], "nothing partial"


async def test_stream_predict_answers_in_order(suite):
    requests = [predict_request("deployments/digits", batch(1, seed=i), request_id=f"r{i}") for i in range(5)]

    async def stream():
        for request in requests:
            yield request

    replies = [r async for r in suite.predict_stub().StreamPredict(stream())]
    assert [r.request_id for r in replies] == [f"r{i}" for i in range(5)]


async def test_canary_split_is_weighted_and_sticky_and_shadow_compares(suite):
    await create(
        suite,
        "canary",
        model="models/digits@prod",
        traffic=[
            deployment_pb2.TrafficTarget(model_version="models/digits/versions/1", percent=70),
            deployment_pb2.TrafficTarget(model_version="models/digits/versions/2", percent=30),
        ],
        shadow=deployment_pb2.ShadowConfig(model_version="models/digits/versions/2", percent=100),
    )
    stub = suite.predict_stub()
    served = {}
    for i in range(60):
        reply = await stub.Predict(predict_request("deployments/canary", batch(1, i), f"req-{i}"))
        served[f"req-{i}"] = reply.model_version
        version = int(reply.model_version.rsplit("/", 1)[1])
        np.testing.assert_allclose(logits(reply), suite.expected(version, batch(1, i)), rtol=1e-4, atol=1e-4)
    share_v2 = sum(v.endswith("/2") for v in served.values()) / len(served)
    assert 0.1 < share_v2 < 0.5
    for request_id in list(served)[:10]:  # sticky: the same id, the same version
        reply = await stub.Predict(predict_request("deployments/canary", batch(1), request_id))
        assert reply.model_version == served[request_id]
    await suite.app.predictor.drain_background()
    deployment = await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/canary"))
    assert deployment.shadow_stats.compared >= 60
    assert deployment.shadow_stats.max_abs_diff > 0  # v1 and v2 differ
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/canary"))


async def test_a_deployment_reports_the_signature_and_runtime_of_each_version_it_serves(suite):
    stub = suite.predict_stub()
    created = await create(
        suite, "signatures", model="models/digits@prod",
        traffic=[deployment_pb2.TrafficTarget(model_version="models/digits@prod", percent=80),
                 deployment_pb2.TrafficTarget(model_version="models/digits/versions/2", percent=20)],
        shadow=deployment_pb2.ShadowConfig(model_version="models/digits/versions/2", percent=10))
    read = await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/signatures"))
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/signatures"))

    assert read.served_versions == created.served_versions
    served = [(v.model_version, v.percent, v.shadow) for v in read.served_versions]
    assert served == [("models/digits/versions/1", 80, False),
                      ("models/digits/versions/2", 20, False),
                      ("models/digits/versions/2", 0, True)]
    for version in read.served_versions:
        assert [(t.name, t.datatype, list(t.shape)) for t in version.inputs] == [
            ("features", tensor_pb2.DATA_TYPE_FP32, [64])]
        assert [(t.datatype, list(t.shape)) for t in version.outputs] == [
            (tensor_pb2.DATA_TYPE_FP32, [10])]
        assert version.max_batch_size == 32
        assert "Triton" in version.runtime


async def test_the_data_plane_splits_a_canary_exactly_as_the_service_does(suite):
    """Without a shadow the data plane serves a split itself; each request id must land on the
    version the service's own `Route.pick` names, through Predict and KServe-v2 alike."""
    await create(suite, "split", model="models/digits@prod", traffic=[
        deployment_pb2.TrafficTarget(model_version="models/digits/versions/1", percent=70),
        deployment_pb2.TrafficTarget(model_version="models/digits/versions/2", percent=30)])
    route = suite.app.routes.routes()["split"]
    stub, kserve = suite.predict_stub(), suite.kserve_stub()
    before = (await suite.app.data_plane.stats())["deployments"].get("split", {"served": 0})
    for i in range(50):
        request_id, data = f"canary-{i}", batch(1, i)
        expected = route.pick(request_id).version
        reply = await stub.Predict(predict_request("deployments/split", data, request_id))
        answer = await kserve.ModelInfer(kserve_request("split", data, request_id))
        assert reply.model_version == expected
        assert answer.model_version == expected.rsplit("/", 1)[1]
        version = int(expected.rsplit("/", 1)[1])
        np.testing.assert_allclose(logits(reply), suite.expected(version, data), rtol=1e-4, atol=1e-4)
    after = (await suite.app.data_plane.stats())["deployments"]["split"]
    assert after["served"] - before["served"] == 100, "all served by the data plane"
    assert {route.pick(f"canary-{i}").version for i in range(50)} == {
        "models/digits/versions/1", "models/digits/versions/2"}
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/split"))


async def _load(stub, deployment: str, stop: asyncio.Event, outcomes: list, suite=None):
    """Predict in a loop until `stop`; record the serving version or the error code. With
    `suite`, every reply is also checked against the torch module of the version it names."""
    i = 0
    while not stop.is_set():
        i += 1
        data = batch(2, i)
        try:
            reply = await stub.Predict(predict_request(deployment, data), timeout=10)
        except grpc.aio.AioRpcError as error:
            outcomes.append(error.code())
            continue
        if suite is not None:
            version = int(reply.model_version.rsplit("/", 1)[1])
            np.testing.assert_allclose(logits(reply), suite.expected(version, data),
                                       rtol=1e-4, atol=1e-4)
        outcomes.append(reply.model_version)


async def test_concurrent_requests_share_triton_calls_and_each_gets_its_own_rows(suite):
    """Under load the gateway coalesces alike requests; no caller may ever see another's rows."""
    await create(suite, "crowd", model="models/digits/versions/1")
    predict, kserve = suite.predict_stub(), suite.kserve_stub()

    async def one(index: int):
        data = batch(1 + index % 3, seed=1000 + index)
        if index % 2:
            reply = await predict.Predict(predict_request("deployments/crowd", data,
                                                          request_id=f"crowd-{index}"))
            assert reply.request_id == f"crowd-{index}"
            return data, logits(reply)
        request = service_pb2.ModelInferRequest(model_name="crowd", id=f"crowd-{index}")
        request.inputs.add(name="features", datatype="FP32", shape=list(data.shape))
        request.raw_input_contents.append(data.tobytes())
        reply = await kserve.ModelInfer(request)
        assert (reply.id, reply.model_name, reply.model_version) == (f"crowd-{index}", "crowd", "1")
        return data, np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(data), 10)

    results = []
    for _ in range(3):
        results += await asyncio.gather(*(one(index) for index in range(48)))
    for data, answer in results:
        np.testing.assert_allclose(answer, suite.expected(1, data), rtol=1e-4, atol=1e-4)
    statistics = await suite.app.triton.model_statistics("crowd.digits.v1")
    received = statistics.model_stats[0].inference_stats.success.count
    assert received < len(results), f"Triton received {received} calls for {len(results)} requests"
    assert statistics.model_stats[0].inference_count == sum(len(data) for data, _ in results)
    await suite.predict_stub().DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/crowd"))


async def test_rollout_under_load_has_no_failed_request(suite):
    stub = suite.predict_stub()
    await create(suite, "rolling", model="models/digits/versions/1")
    stop, outcomes = asyncio.Event(), []
    workers = [asyncio.create_task(_load(stub, "deployments/rolling", stop, outcomes, suite))
               for _ in range(4)]
    await asyncio.sleep(0.5)
    updated = await stub.UpdateDeployment(
        inf.UpdateDeploymentRequest(
            deployment=deployment_pb2.Deployment(
                name="deployments/rolling", model="models/digits/versions/2"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["model"]),
        )
    )
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    assert list(updated.serving_versions) == ["models/digits/versions/2"]
    failures = [o for o in outcomes if not isinstance(o, str)]
    assert failures == [] and len(outcomes) > 20
    assert outcomes[0].endswith("/1") and outcomes[-1].endswith("/2")
    assert not (suite.app.supervisor.server.model_repository / "rolling.digits.v1").exists()
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/rolling"))


async def test_track_alias_rolls_out_when_the_registry_moves_it(suite):
    stub = suite.predict_stub()
    await create(suite, "tracking", model="models/digits@prod", track_alias=True)
    await suite.registry_stub.SetModelAlias(
        rs.SetModelAliasRequest(name="models/digits/aliases/prod", version="models/digits/versions/2")
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        deployment = await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/tracking"))
        if (
            list(deployment.serving_versions) == ["models/digits/versions/2"]
            and deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY
        ):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"deployment did not follow the alias: {deployment}")
    reply = await stub.Predict(predict_request("deployments/tracking", batch(1)))
    assert reply.model_version == "models/digits/versions/2"
    await suite.registry_stub.SetModelAlias(
        rs.SetModelAliasRequest(name="models/digits/aliases/prod", version="models/digits/versions/1")
    )
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/tracking"))


RECOVERY_PATIENCE_SECONDS = 120
"""How long the kill test waits for the restarted Triton: a bound on patience, not a timing
goal (Triton's restart takes about 5 s on a quiet machine and several times that under load)."""


async def test_kill_9_of_triton_under_load(suite):
    stub = suite.predict_stub()
    await create(suite, "survivor", model="models/digits/versions/1")
    health = health_pb2_grpc.HealthStub(suite.inference_channel)
    stop, outcomes = asyncio.Event(), []
    workers = [asyncio.create_task(_load(stub, "deployments/survivor", stop, outcomes, suite))
               for _ in range(4)]
    await asyncio.sleep(0.5)
    served_before = len(outcomes)
    killed_at = time.monotonic()
    os.kill(suite.app.supervisor.server.pid, signal.SIGKILL)
    saw_not_serving = False
    recovered_after = None
    while time.monotonic() - killed_at < RECOVERY_PATIENCE_SECONDS:
        status = (await health.Check(health_pb2.HealthCheckRequest(service="inference"))).status
        saw_not_serving |= status == health_pb2.HealthCheckResponse.NOT_SERVING
        alive = (await health.Check(health_pb2.HealthCheckRequest(service="liveness"))).status
        assert alive == health_pb2.HealthCheckResponse.SERVING, "a Triton restart is no reason to restart us"
        deployment = await stub.GetDeployment(inf.GetDeploymentRequest(name="deployments/survivor"))
        if (
            saw_not_serving
            and status == health_pb2.HealthCheckResponse.SERVING
            and deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY
        ):
            recovered_after = time.monotonic() - killed_at
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    assert saw_not_serving, "health reported NOT_SERVING while Triton was down"
    assert recovered_after is not None, f"not serving again {RECOVERY_PATIENCE_SECONDS} s after the kill"
    failures = {o for o in outcomes[served_before:] if not isinstance(o, str)}
    assert failures <= {grpc.StatusCode.UNAVAILABLE}, failures
    assert outcomes[-1] == "models/digits/versions/1", "serving again after the restart"
    data = batch(4, seed=77)
    reply = await stub.Predict(predict_request("deployments/survivor", data))
    np.testing.assert_allclose(logits(reply), suite.expected(1, data), rtol=1e-4, atol=1e-4)


async def test_scoped_tokens_serve_only_their_models(suite):
    from maas_runtime.auth import Role, add_token

    token = add_token(suite.app.settings.resolved_tokens_file, "team", Role.EDITOR, ["other*"])
    channel = open_channel(suite.target, token=token)
    scoped = inference_service_pb2_grpc.InferenceServiceStub(channel)
    try:
        await expect_error(scoped.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id="sneaky", deployment=deployment_pb2.Deployment(
                model="models/digits@prod"))), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(scoped.Predict(predict_request("deployments/digits", batch(1))),
                           grpc.StatusCode.PERMISSION_DENIED)
        refused = await expect_error(scoped.GetDeployment(inf.GetDeploymentRequest(
            name="deployments/digits")), grpc.StatusCode.PERMISSION_DENIED)
        assert "not scoped to model 'digits'" in refused.details()
        listed = await scoped.ListDeployments(inf.ListDeploymentsRequest())
        assert list(listed.deployments) == [] and listed.next_page_token == ""
        everything = await suite.predict_stub().ListDeployments(inf.ListDeploymentsRequest())
        assert "deployments/digits" in [d.name for d in everything.deployments]
    finally:
        await channel.close()


async def test_a_token_scoped_to_the_model_sees_its_deployments(suite):
    from maas_runtime.auth import Role, add_token

    token = add_token(suite.app.settings.resolved_tokens_file, "digits-team", Role.VIEWER,
                      ["digits"])
    channel = open_channel(suite.target, token=token)
    scoped = inference_service_pb2_grpc.InferenceServiceStub(channel)
    try:
        got = await scoped.GetDeployment(inf.GetDeploymentRequest(name="deployments/digits"))
        assert got.name == "deployments/digits"
        listed = await scoped.ListDeployments(inf.ListDeploymentsRequest())
        assert "deployments/digits" in [d.name for d in listed.deployments]
    finally:
        await channel.close()


async def test_deployment_ids_with_dots_are_refused(suite):
    await expect_error(create(suite, "a.b", model="models/digits@prod"),
                       grpc.StatusCode.INVALID_ARGUMENT, "deployment_id")


async def test_list_deployments_pages_with_tamper_proof_tokens(suite):
    stub = suite.predict_stub()
    await create(suite, "second", model="models/digits/versions/2")
    first = await stub.ListDeployments(inf.ListDeploymentsRequest(page_size=1))
    assert len(first.deployments) == 1 and first.next_page_token
    rest = await stub.ListDeployments(inf.ListDeploymentsRequest(
        page_size=1000, page_token=first.next_page_token))
    names = [d.name for d in [*first.deployments, *rest.deployments]]
    assert names == sorted(names) and "deployments/second" in names and not rest.next_page_token
    await expect_error(stub.ListDeployments(inf.ListDeploymentsRequest(
        page_size=1, page_token=first.next_page_token[:-2] + "xx")),
        grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/second"))


# -- the native data plane ---------------------------------------------------------------------


def kserve_request(model_name: str, data: np.ndarray, request_id: str = ""):
    request = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(data.shape))
    request.raw_input_contents.append(data.tobytes())
    return request


async def test_the_data_plane_serves_valid_requests_and_the_service_answers_the_rest(suite):
    """Valid requests are served by the native data plane (its counters say so) with the same
    answers; every bad one is relayed and gets the service's own code and details."""
    plane = suite.app.data_plane
    assert plane is not None, "the native data plane is the default"
    stub, kserve = suite.predict_stub(), suite.kserve_stub()
    await create(suite, "native", model="models/digits/versions/2")
    data = batch(3, seed=31)
    before = await plane.stats()

    reply = await stub.Predict(predict_request("deployments/native", data, request_id="r-1"))
    assert reply.request_id == "r-1" and reply.model_version == "models/digits/versions/2"
    np.testing.assert_allclose(logits(reply), suite.expected(2, data), rtol=1e-4, atol=1e-4)
    assert len((await stub.Predict(predict_request("deployments/native", data))).request_id) == 32
    answer = await kserve.ModelInfer(kserve_request("native", data, request_id="k-1"))
    assert (answer.model_name, answer.model_version, answer.id) == ("native", "2", "k-1")
    out = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 10)
    np.testing.assert_allclose(out, suite.expected(2, data), rtol=1e-4, atol=1e-4)
    served = await plane.stats()
    assert served["served"] - before["served"] == 3, served
    assert served["declined"] == before["declined"], served

    await expect_error(stub.Predict(predict_request(
        "deployments/native", data, datatype=tensor_pb2.DATA_TYPE_FP64)),
        grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype")
    short = kserve_request("native", data)
    short.raw_input_contents[0] = data.tobytes()[:-4]
    await expect_error(kserve.ModelInfer(short), grpc.StatusCode.INVALID_ARGUMENT,
                       "inputs[0].raw_data")
    await expect_error(kserve.ModelInfer(kserve_request("ghost", data)), grpc.StatusCode.NOT_FOUND)
    anonymous = inference_service_pb2_grpc.InferenceServiceStub(
        grpc.aio.insecure_channel(suite.target))
    await expect_error(anonymous.Predict(predict_request("deployments/native", data)),
                       grpc.StatusCode.UNAUTHENTICATED)
    declined = await plane.stats()
    assert declined["declined"] - served["declined"] == 4, declined
    assert declined["served"] == served["served"], declined
    native = declined["deployments"]["native"]
    assert (native["served"], native["declined"]) == (3, 3), declined
    assert sum(native["latency_buckets"]) == native["served"], "every served request timed"
    # The unknown name counts under "" (callers cannot mint metric labels).
    assert "ghost" not in declined["deployments"], declined
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/native"))
    await expect_error(stub.Predict(predict_request("deployments/native", data)),
                       grpc.StatusCode.NOT_FOUND)


async def test_a_request_abandoned_while_it_waits_for_a_shared_call_is_never_sent(suite):
    """Its caller's deadline passes while the model's one call is stuck (Triton SIGSTOPped):
    the caller hears DEADLINE_EXCEEDED then, and Triton never sees the request."""
    plane, stub = suite.app.data_plane, suite.predict_stub()
    await create(suite, "patient", model="models/digits/versions/1")
    before = await plane.stats()
    triton = suite.app.supervisor.server.pid
    first_data = batch(1, seed=51)
    os.kill(triton, signal.SIGSTOP)
    try:
        first = asyncio.ensure_future(
            stub.Predict(predict_request("deployments/patient", first_data), timeout=10))
        await asyncio.sleep(0.3)  # it holds the model's only call, at a stopped Triton
        await expect_error(
            stub.Predict(predict_request("deployments/patient", batch(1, seed=52)), timeout=0.3),
            grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        os.kill(triton, signal.SIGCONT)
    reply = await first
    np.testing.assert_allclose(logits(reply), suite.expected(1, first_data), rtol=1e-4, atol=1e-4)
    after = await plane.stats()
    assert after["abandoned"] - before["abandoned"] == 1, after
    assert after["triton_calls"] - before["triton_calls"] == 1, "only the first was sent"
    await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/patient"))


async def test_a_revoked_token_stops_working_on_the_data_plane_too(suite):
    import json

    from maas_runtime.auth import Role, add_token, hash_token

    tokens_file = suite.app.settings.resolved_tokens_file
    token = add_token(tokens_file, "temp", Role.VIEWER)
    channel = open_channel(suite.target, token=token)
    try:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        await stub.Predict(predict_request("deployments/digits", batch(1)))  # works at once
        document = json.loads(tokens_file.read_text())
        document["tokens"] = [t for t in document["tokens"] if t["sha256"] != hash_token(token)]
        tokens_file.write_text(json.dumps(document))
        await asyncio.sleep(1.5)  # both token tables look at the file once a second
        for _ in range(20):  # every path (data plane or service) refuses it now
            await expect_error(stub.Predict(predict_request("deployments/digits", batch(1))),
                               grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await channel.close()


async def test_kill_9_of_the_data_plane_restarts_it_on_the_same_port(suite):
    plane = suite.app.data_plane
    stub = suite.predict_stub()
    data = batch(2, seed=41)
    old_pid = plane.pid
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    reply = None
    while time.monotonic() - killed_at < RECOVERY_PATIENCE_SECONDS:
        try:
            reply = await stub.Predict(predict_request("deployments/digits", data), timeout=1)
            if plane.pid != old_pid:
                break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        await asyncio.sleep(0.1)
    assert plane.pid != old_pid and reply is not None, "serving again on the same port"
    np.testing.assert_allclose(logits(reply), suite.expected(1, data), rtol=1e-4, atol=1e-4)
    before = (await plane.stats())["served"]
    await stub.Predict(predict_request("deployments/digits", data))
    assert (await plane.stats())["served"] == before + 1, "the restarted one got the table"
