"""The shared server runtime, exercised through a real aio server on port 0 and real stubs.

A small RegistryService servicer defined here stands in for business logic, so these tests
pin down the runtime alone: auth, error mapping, size limits, health, reflection, shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import stat

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from maas.registry.v1 import model_pb2, registry_service_pb2, registry_service_pb2_grpc
from maas_runtime import errors
from maas_runtime.auth import Role, add_token, current_principal
from maas_runtime.client import open_channel
from maas_runtime.grpc_errors import status_details, unpack_detail
from maas_runtime.names import validate_id
from maas_runtime.server import ServiceBinding, ServiceServer
from maas_runtime.settings import ServiceSettings

REGISTRY = "maas.registry.v1.RegistryService"


class ProbeRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """Just enough of the registry contract to drive the runtime."""

    async def CreateModel(self, request, context):
        validate_id(request.model_id, "model_id")
        return model_pb2.Model(name=f"models/{request.model_id}",
                               display_name=current_principal().name)

    async def GetModel(self, request, context):
        if request.name == "models/boom":
            raise RuntimeError("a bug, not the caller's mistake")
        if request.name != "models/known":
            raise errors.NotFound("model", request.name)
        return model_pb2.Model(name=request.name, display_name=current_principal().name)

    async def ListModelVersions(self, request, context):
        raise errors.FailedPrecondition("stream refused", reason="TEST_REFUSAL")

    async def WatchEvents(self, request, context):
        yield registry_service_pb2.WatchEventsRequest  # never reached: fails before
        raise AssertionError("unreachable")


class StreamingProbe(ProbeRegistry):
    async def WatchEvents(self, request, context):
        from maas.registry.v1 import audit_pb2

        yield audit_pb2.RegistryEvent(event_id=1)
        raise errors.OutOfRange("no more events", reason="TEST_END")


def registry_binding(servicer) -> ServiceBinding:
    return ServiceBinding(
        REGISTRY, lambda server: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
            servicer, server)
    )


@pytest.fixture
async def runtime(tmp_path):
    settings = ServiceSettings(state_dir=tmp_path / "state", max_message_bytes=64 * 1024,
                               shutdown_grace_seconds=0.5)
    server = ServiceServer("registry", settings, [registry_binding(StreamingProbe())])
    port = await server.start()
    yield server, f"127.0.0.1:{port}", settings
    await server.stop(0)


def admin_token(settings) -> str:
    return (settings.state_dir / "admin.token").read_text().strip()


_open_channels: list[grpc.aio.Channel] = []


def stub(target, token=None):
    """A registry stub; its channel is kept open until the test ends (see close_channels)."""
    channel = open_channel(target, token=token)
    _open_channels.append(channel)
    return registry_service_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture(autouse=True)
async def close_channels():
    yield
    while _open_channels:
        await _open_channels.pop().close()


def error_info(rpc_error) -> error_details_pb2.ErrorInfo:
    info = unpack_detail(status_details(rpc_error), error_details_pb2.ErrorInfo)
    assert info is not None, "every error carries an ErrorInfo detail"
    return info


async def test_first_start_writes_private_admin_token(runtime):
    _, target, settings = runtime
    token_path = settings.state_dir / "admin.token"
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    tokens = json.loads(settings.resolved_tokens_file.read_text())["tokens"]
    assert [t["role"] for t in tokens] == ["admin"]
    assert admin_token(settings) not in settings.resolved_tokens_file.read_text()  # hash only
    reply = await stub(target, admin_token(settings)).GetModel(
        registry_service_pb2.GetModelRequest(name="models/known"))
    assert reply.display_name == "admin"


@pytest.mark.parametrize("token, reason", [(None, "MISSING_TOKEN"), ("wrong", "INVALID_TOKEN")])
async def test_missing_or_wrong_token_is_unauthenticated(runtime, token, reason):
    _, target, _ = runtime
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(target, token).GetModel(registry_service_pb2.GetModelRequest(name="models/known"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == reason


async def test_streaming_rpc_needs_token_too(runtime):
    _, target, _ = runtime
    call = stub(target).WatchEvents(registry_service_pb2.WatchEventsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_viewer_may_read_but_not_mutate(runtime):
    _, target, settings = runtime
    viewer = add_token(settings.resolved_tokens_file, "val", Role.VIEWER)
    client = stub(target, viewer)
    reply = await client.GetModel(registry_service_pb2.GetModelRequest(name="models/known"))
    assert reply.display_name == "val"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.CreateModel(registry_service_pb2.CreateModelRequest(model_id="m"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).metadata["required_role"] == "editor"
    editor = add_token(settings.resolved_tokens_file, "ed", Role.EDITOR)
    created = await stub(target, editor).CreateModel(
        registry_service_pb2.CreateModelRequest(model_id="m"))
    assert created.name == "models/m" and created.display_name == "ed"


@pytest.mark.parametrize("model_id", ["", "../etc", "a/b", "UPPER", "x" * 64])
async def test_malformed_request_names_the_field(runtime, model_id):
    _, target, settings = runtime
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(target, admin_token(settings)).CreateModel(
            registry_service_pb2.CreateModelRequest(model_id=model_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = unpack_detail(status_details(caught.value), error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["model_id"]
    assert error_info(caught.value).domain == "maas.dev"


async def test_not_found_carries_resource_info(runtime):
    _, target, settings = runtime
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(target, admin_token(settings)).GetModel(
            registry_service_pb2.GetModelRequest(name="models/nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = unpack_detail(status_details(caught.value), error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("model", "models/nope")


async def test_server_bug_is_internal_and_logged(runtime, caplog):
    _, target, settings = runtime
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(target, admin_token(settings)).GetModel(
            registry_service_pb2.GetModelRequest(name="models/boom"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in caught.value.details()  # no internals leak to callers
    assert any("a bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_error_after_streamed_items_keeps_its_code(runtime):
    _, target, settings = runtime
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stub(target, admin_token(settings)).WatchEvents(
            registry_service_pb2.WatchEventsRequest()
        ):
            received.append(event.event_id)
    assert received == [1]
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(caught.value).reason == "TEST_END"


async def test_oversized_message_is_resource_exhausted(runtime):
    _, target, settings = runtime
    huge = model_pb2.Model(description="x" * (128 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(target, admin_token(settings)).CreateModel(
            registry_service_pb2.CreateModelRequest(model_id="big", model=huge))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_and_reflection_are_open(runtime):
    _, target, _ = runtime
    channel = open_channel(target)
    _open_channels.append(channel)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "registry", REGISTRY):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="unknown"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    names = []
    async for reply in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names = [s.name for s in reply.list_services_response.service]
    assert REGISTRY in names and "grpc.health.v1.Health" in names


async def test_health_watch_follows_serving_state_and_shutdown(runtime):
    server, target, _ = runtime
    channel = open_channel(target)
    _open_channels.append(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="registry"))
    statuses = [(await watch.read()).status]
    await server.set_serving(False)
    statuses.append((await watch.read()).status)
    liveness = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="liveness"))
    assert liveness.status == health_pb2.HealthCheckResponse.SERVING, "not ready, still alive"
    await server.set_serving(True)
    statuses.append((await watch.read()).status)
    await server.health.enter_graceful_shutdown()
    statuses.append((await watch.read()).status)
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    assert statuses == [serving, not_serving, serving, not_serving]
    watch.cancel()


async def test_graceful_stop_lets_inflight_rpc_finish(tmp_path):
    import asyncio

    finished = asyncio.Event()

    class SlowRegistry(ProbeRegistry):
        async def GetModel(self, request, context):
            await asyncio.sleep(0.3)
            finished.set()
            return model_pb2.Model(name=request.name)

    settings = ServiceSettings(state_dir=tmp_path, auth_enabled=False)
    server = ServiceServer("registry", settings, [registry_binding(SlowRegistry())])
    port = await server.start()
    call = stub(f"127.0.0.1:{port}").GetModel(registry_service_pb2.GetModelRequest(name="models/a"))
    await asyncio.sleep(0.05)
    await server.stop(grace=2)
    assert (await call).name == "models/a" and finished.is_set()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(f"127.0.0.1:{port}").GetModel(
            registry_service_pb2.GetModelRequest(name="models/a"), timeout=1)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_auth_can_be_switched_off(tmp_path):
    settings = ServiceSettings(state_dir=tmp_path, auth_enabled=False)
    server = ServiceServer("registry", settings, [registry_binding(ProbeRegistry())])
    port = await server.start()
    try:
        reply = await stub(f"127.0.0.1:{port}").CreateModel(
            registry_service_pb2.CreateModelRequest(model_id="m"))
        assert reply.display_name == "anonymous"
        assert not (tmp_path / "admin.token").exists()
    finally:
        await server.stop(0)
