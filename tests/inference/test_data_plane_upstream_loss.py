"""The native data plane when the service behind it dies mid-call: the caller gets UNAVAILABLE
saying so (which clients retry on another replica), never CANCELLED (which they take for their
own doing); a CANCELLED the service ends a call with by itself is passed on as UNAVAILABLE too.

The data plane runs as a child of the test (so killing the service behind it does not take it
down, as its PR_SET_PDEATHSIG would inside a real gateway) in front of a real registry process
killed with SIGKILL: the relay in front of any service is one piece of code.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from maas.inference.v1 import inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import audit_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.dataplane import NativeDataPlane, find_binary, route_table
from maas_runtime.server import ServiceBinding, ServiceServer
from maas_runtime.settings import ServiceSettings

from tests.support.processes import ServiceProcess

UNREACHABLE = "the service behind this gateway is unreachable"


def data_plane() -> NativeDataPlane:
    """A data plane with an empty table: every call is relayed to the service behind it."""
    return NativeDataPlane(
        find_binary(), host="127.0.0.1", port=0, triton_target=lambda: "127.0.0.1:9",
        table=lambda: route_table({}, False, 1), tokens_file=None, max_message_bytes=1 << 20,
        shutdown_grace_seconds=1)


@pytest.fixture
async def registry_behind_data_plane(tmp_path: Path) -> AsyncIterator[tuple[ServiceProcess, int]]:
    registry = ServiceProcess("registry", tmp_path / "registry")
    await registry.start()
    front = data_plane()
    try:
        port = await front.open(registry.target)
        yield registry, port
    finally:
        await front.close()
        if registry.alive():
            registry.kill()


def bearer(registry: ServiceProcess) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {registry.admin_token()}"),)


async def test_a_relayed_stream_whose_service_is_killed_ends_unavailable_not_cancelled(
        registry_behind_data_plane):
    registry, port = registry_behind_data_plane
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="m"), metadata=bearer(registry))
        watch = stub.WatchEvents(rs.WatchEventsRequest(), metadata=bearer(registry), timeout=30)
        first = await watch.read()  # the stream is up, through the data plane
        assert first.resource == "models/m"
        registry.kill()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await watch.read() is not grpc.aio.EOF:
                pass
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
    assert UNREACHABLE in ended.value.details()


async def test_a_forwarded_predict_whose_service_is_killed_before_answering_is_unavailable(
        registry_behind_data_plane):
    registry, port = registry_behind_data_plane
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        registry.process.send_signal(signal.SIGSTOP)  # takes the call, never answers
        call = stub.Predict(inf.PredictRequest(deployment="deployments/d"),
                            metadata=bearer(registry), timeout=30)
        await asyncio.sleep(0.5)  # declined (no route) and forwarded, waiting on the service
        registry.kill()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
    assert UNREACHABLE in ended.value.details()


async def test_a_service_that_is_not_there_is_unavailable_with_the_reason(tmp_path: Path):
    front = data_plane()
    port = await front.open("127.0.0.1:9")  # nothing listens on the discard port
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await registry_service_pb2_grpc.RegistryServiceStub(channel).GetModel(
                    rs.GetModelRequest(name="models/m"), timeout=10)
    finally:
        await front.close()
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
    assert UNREACHABLE in ended.value.details()


class _CancellingRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """Streams one event, then ends the call CANCELLED as a service going away does."""

    async def WatchEvents(self, request, context):  # noqa: N802 - the contract's name
        yield audit_pb2.RegistryEvent(event_id=1, resource="models/m")
        await context.abort(grpc.StatusCode.CANCELLED, "the service is shutting down")


async def test_a_cancelled_the_caller_did_not_ask_for_reaches_it_as_unavailable(tmp_path: Path):
    front = data_plane()
    server = ServiceServer("registry", ServiceSettings(state_dir=tmp_path, auth_enabled=False,
                                                       port=0), [ServiceBinding(
        "maas.registry.v1.RegistryService",
        lambda s: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
            _CancellingRegistry(), s))], front_door=front)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = registry_service_pb2_grpc.RegistryServiceStub(channel).WatchEvents(
                rs.WatchEventsRequest(), timeout=10)
            assert (await watch.read()).event_id == 1
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await watch.read()
            own = registry_service_pb2_grpc.RegistryServiceStub(channel).WatchEvents(
                rs.WatchEventsRequest(), timeout=10)
            await own.read()
            own.cancel()  # the caller's own cancellation stays its own
            assert await own.code() is grpc.StatusCode.CANCELLED
    finally:
        await server.stop(0)
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
    assert "ended the call CANCELLED without the caller asking" in ended.value.details()
    assert "shutting down" in ended.value.details()
