"""The native data plane's table, its relay of any call over TLS, and the Python-only mode.

The data plane at work (served and relayed requests, revoked tokens, kill -9) is tested with
the rest of the service in `test_inference_service.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.dataplane import NativeDataPlane, find_binary, route_table
from maas_inference.routing import Route, ServedModel
from maas_inference.tensors import ServingSignature
from maas_registry.server import build_registry
from maas_registry.servicer import RegistryServicer
from maas_registry.settings import RegistrySettings
from maas_runtime import errors
from maas_runtime.auth import ANONYMOUS_ADMIN
from maas_runtime.client import open_channel
from maas_runtime.server import ServiceBinding, ServiceServer
from maas_runtime.settings import ServiceSettings
from maas_runtime.tls import channel_credentials
from tritonclient.grpc import service_pb2_grpc

from tests.inference.servers import inference_process, register_digits_mlp
from tests.inference.test_inference_service import batch, kserve_request, logits, predict_request
from tests.support.grpc_asserts import expect_error
from tests.support.processes import ServiceProcess, children_named, process_alive
from tests.support.tls import assert_tls_policy, make_certificates

SIGNATURE = {"inputs": [{"name": "x", "datatype": "DATA_TYPE_FP32", "shape": [4]}],
             "outputs": [{"name": "y", "datatype": "DATA_TYPE_INT64", "shape": [-1]}]}


def served(version: int, signature=SIGNATURE, max_batch_size: int = 8, instances: int = 2):
    return ServedModel(f"models/m/versions/{version}", f"d.m.v{version}",
                       ServingSignature.from_version(signature, max_batch_size), instances)


def test_the_table_holds_plain_routes_with_what_the_data_plane_checks():
    canary = Route(((served(1), 90), (served(2), 10)))
    table = route_table({"d": canary}, triton_ready=True, calls_per_instance=3)
    assert table["triton_ready"] is True
    first, second = table["routes"]["d"]["targets"]
    assert first == {
        "triton_model": "d.m.v1", "version": "models/m/versions/1", "model_id": "m",
        "percent": 90, "max_batch_size": 8, "max_calls_in_flight": 6,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}]}
    assert second["percent"] == 10
    unlimited = route_table({"d": canary}, triton_ready=False, calls_per_instance=0)
    assert unlimited["routes"]["d"]["targets"][0]["max_calls_in_flight"] >= 1 << 30


def test_routes_the_data_plane_cannot_serve_exactly_are_left_to_the_service():
    strings = {**SIGNATURE, "inputs": [{"name": "x", "datatype": "DATA_TYPE_BYTES", "shape": [1]}]}
    routes = {
        "shadowed": Route(((served(1), 100),), shadow=served(2), shadow_percent=50),
        "strings": Route(((served(1, signature=strings), 100),)),
        "unbatched": Route(((served(1, max_batch_size=0), 100),)),
        "plain": Route(((served(1), 100),)),
    }
    assert set(route_table(routes, True, 1)["routes"]) == {"plain"}


def test_a_missing_binary_is_a_clear_failed_precondition(tmp_path):
    with pytest.raises(errors.FailedPrecondition) as caught:
        find_binary(str(tmp_path / "nowhere"))
    assert caught.value.reason == "DATA_PLANE_MISSING" and "make install" in caught.value.message


@pytest.mark.triton
async def test_the_python_data_plane_serves_everything_itself(tmp_path):
    registry = ServiceProcess("registry", tmp_path / "registry")
    await registry.start()
    inference = inference_process(tmp_path, registry, data_plane="python")
    try:
        module = await register_digits_mlp(tmp_path, registry, hidden=16, seed=5)
        await inference.start(timeout=120)
        assert children_named(inference.process.pid, "maas-inference-dataplane") == []
        data = batch(4, seed=8)
        with torch.inference_mode():
            expected = module(torch.from_numpy(data)).numpy()
        async with inference.stub() as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            await stub.CreateDeployment(inf.CreateDeploymentRequest(
                deployment_id="digits",
                deployment=deployment_pb2.Deployment(model="models/digits/versions/1")))
            reply = await stub.Predict(predict_request("deployments/digits", data))
            np.testing.assert_allclose(logits(reply), expected, rtol=1e-4, atol=1e-4)
            kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            answer = await kserve.ModelInfer(kserve_request("digits", data))
            out = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(4, 10)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    finally:
        inference.terminate()
        registry.terminate()


@pytest.mark.parametrize("mutual", [False, True])
async def test_the_data_plane_relays_any_call_over_tls_with_its_error_details(tmp_path, mutual):
    """In front of any service: TLS (and mutual TLS) end at the data plane, calls it does not
    serve reach the service on loopback, and errors come back with their google.rpc details."""
    certs = make_certificates(tmp_path)
    settings = ServiceSettings(
        state_dir=tmp_path / "state", auth_enabled=False, port=0,
        tls_cert_file=certs / "server.pem", tls_key_file=certs / "server.key",
        tls_client_ca_file=(certs / "ca.pem") if mutual else None)
    data_plane = NativeDataPlane(
        find_binary(), host="127.0.0.1", port=0, triton_target=lambda: "127.0.0.1:9",
        table=lambda: route_table({}, False, 1), tokens_file=None, max_message_bytes=1 << 20,
        shutdown_grace_seconds=1, tls_files=(settings.tls_cert_file, settings.tls_key_file,
                                             settings.tls_client_ca_file))
    # The real registry's servicer, on its own state, behind the data plane.
    registry, store, _ = build_registry(RegistrySettings(state_dir=tmp_path / "registry"))
    await registry.create_model("tls", {}, ANONYMOUS_ADMIN)
    servicer = RegistryServicer(registry)
    server = ServiceServer("registry", settings, [ServiceBinding(
        "maas.registry.v1.RegistryService",
        lambda s: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, s))],
        front_door=data_plane)
    server.on_stop.append(store.close)
    port = await server.start()
    assert port == data_plane.port and data_plane.pid is not None

    async def get_model(channel):
        reply = await registry_service_pb2_grpc.RegistryServiceStub(channel).GetModel(
            rs.GetModelRequest(name="models/tls"), timeout=2)
        assert reply.name == "models/tls"

    try:
        await assert_tls_policy(port, certs, mutual, get_model)
        credentials = channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")
        async with open_channel(f"localhost:{port}", credentials=credentials) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await expect_error(stub.GetModel(rs.GetModelRequest(name="not-a-model-name")),
                               grpc.StatusCode.INVALID_ARGUMENT, "name")
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="registry"))
            first = await watch.read()  # a server stream, relayed
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            assert (await data_plane.stats())["open_relays"] == 1
            watch.cancel()  # a caller giving up an endless stream ends the relay behind it
            for _ in range(50):
                if (await data_plane.stats())["open_relays"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await data_plane.stats())["open_relays"] == 0
    finally:
        await server.stop(0)
    assert data_plane.pid is not None and not process_alive(data_plane.pid)


async def test_the_data_plane_counters_are_exported_as_metrics():
    from maas_inference.dataplane import DataPlaneMetrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    class Counting:
        async def stats(self):
            return {"served": 7, "declined": 3, "triton_calls": 2, "deployments": {
                "digits": {"served": 7, "declined": 1}, "": {"served": 0, "declined": 2}}}

    reader = InMemoryMetricReader()
    metrics = DataPlaneMetrics(Counting(), MeterProvider(metric_readers=[reader]).get_meter("t"))
    await metrics.refresh()
    points = {
        metric.name: {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics for metric in scope.metrics}
    assert points["maas.inference.dataplane.requests"] == {
        (("deployment", "digits"), ("outcome", "served")): 7,
        (("deployment", "digits"), ("outcome", "declined")): 1,
        (("deployment", ""), ("outcome", "served")): 0,
        (("deployment", ""), ("outcome", "declined")): 2}
    assert points["maas.inference.dataplane.triton_calls"] == {(): 2}


async def test_metrics_polling_outlives_a_data_plane_not_yet_open_or_gone(tmp_path):
    """The service starts polling before the data plane opens its port, and a data plane can
    die between polls: both are UNAVAILABLE for one poll, never the end of the polling."""
    from maas_inference.dataplane import DataPlaneMetrics
    from opentelemetry.sdk.metrics import MeterProvider

    data_plane = NativeDataPlane(
        find_binary(), host="127.0.0.1", port=0, triton_target=lambda: "127.0.0.1:9",
        table=lambda: route_table({}, False, 1), tokens_file=None, max_message_bytes=1 << 20,
        shutdown_grace_seconds=1)
    with pytest.raises(errors.Unavailable):
        await data_plane.stats()  # not open yet
    metrics = DataPlaneMetrics(data_plane, MeterProvider().get_meter("t"), poll_seconds=0.05)
    polling = asyncio.ensure_future(metrics.run())
    backend = ServiceServer("registry", ServiceSettings(state_dir=tmp_path, auth_enabled=False,
                                                        port=0), [], front_door=data_plane)
    try:
        await asyncio.sleep(0.2)
        assert not polling.done(), "a poll before the port opened ended the polling"
        await backend.start()
        await metrics.refresh()
        os.kill(data_plane.pid, signal.SIGKILL)
        await asyncio.sleep(0.1)  # dead; its restart waits half a second
        with pytest.raises(errors.Unavailable):
            await data_plane.stats()
        await asyncio.sleep(0.2)
        assert not polling.done(), "a poll of a dead data plane ended the polling"
        await asyncio.sleep(0.8)
        assert "served" in await data_plane.stats(), "answering again once restarted"
    finally:
        polling.cancel()
        await backend.stop(0)
