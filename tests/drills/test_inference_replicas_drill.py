"""Drill: two inference services on one PostgreSQL deployment table, each with its own
bundled Triton. A deployment created through one is served by the other (heard through
LISTEN/NOTIFY, loaded on its own Triton) with the same answers; a rollout through the second
is followed by the first; a delete through the first leaves neither serving it. A gateway
killed (SIGKILL) in the middle of a create leaves the deployment CREATING under a lease nobody
renews: the other takes the create over once it lapsed and serves it, and the killed one,
restarted, serves it too. Killed again in the middle of a rollout (an update to version 2),
it leaves the deployment ROLLING_OUT under a lease nobody renews: the other serves version 1
meanwhile, then takes the rollout over, serves version 2 and records it READY."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import field_mask_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2_grpc
from maas_inference.store import SqlDeploymentStore

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.inference.servers import register_digits_mlp
from tests.inference.test_inference_service import batch, logits, predict_request
from tests.registry.helpers import model_upload_requests
from tests.support.postgres import postgres_database_or_skip
from tests.support.processes import RegistryProcess, inference_process

pytestmark = pytest.mark.triton


async def _first_prediction(stub, deployment: str, data: np.ndarray, timeout: float):
    """(seconds until the deployment answered, its logits); retries while it is not loaded."""
    started = time.monotonic()
    while True:
        try:
            reply = await stub.Predict(predict_request(deployment, data), timeout=5)
            return time.monotonic() - started, logits(reply)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise
            if time.monotonic() - started > timeout:
                raise
            await asyncio.sleep(0.05)


async def test_a_deployment_made_through_one_gateway_is_served_by_the_other(tmp_path):
    with postgres_database_or_skip() as database_url:
        registry = RegistryProcess(tmp_path / "registry")
        await registry.start()
        gateways = [inference_process(tmp_path, registry, name=name, database_url=database_url,
                                      deployment_resync_seconds="5")
                    for name in ("inference-a", "inference-b")]
        try:
            first = await register_digits_mlp(tmp_path, registry, hidden=16, seed=5)
            second = await _upload_digits_version(tmp_path, registry, seed=6)
            await asyncio.gather(*(gateway.start(timeout=180) for gateway in gateways))
            data = batch(4, seed=8)
            with torch.inference_mode():
                expected_1 = first(torch.from_numpy(data)).numpy()
                expected_2 = second(torch.from_numpy(data)).numpy()
            async with gateways[0].stub() as channel_a, gateways[1].stub() as channel_b:
                a = inference_service_pb2_grpc.InferenceServiceStub(channel_a)
                b = inference_service_pb2_grpc.InferenceServiceStub(channel_b)
                await a.CreateDeployment(inf.CreateDeploymentRequest(
                    deployment_id="digits",
                    deployment=deployment_pb2.Deployment(model="models/digits/versions/1")))
                seconds, answer = await _first_prediction(b, "deployments/digits", data, 30)
                np.testing.assert_allclose(answer, expected_1, rtol=1e-4, atol=1e-4)
                print(f"\nthe other gateway served the new deployment after {seconds:.2f} s")

                await b.UpdateDeployment(inf.UpdateDeploymentRequest(
                    deployment=deployment_pb2.Deployment(name="deployments/digits",
                                                         model="models/digits/versions/2"),
                    update_mask=field_mask_pb2.FieldMask(paths=["model"])))
                followed = await _until_serving(a, data, expected_2, expected_1, 30,
                                                "the first gateway never followed")
                print(f"the first gateway followed the rollout after {followed:.2f} s")

                await a.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/digits"))
                with pytest.raises(grpc.aio.AioRpcError) as gone:  # a deleted it: at once
                    await a.Predict(predict_request("deployments/digits", data))
                assert gone.value.code() == grpc.StatusCode.NOT_FOUND
                # b hears of it (NOTIFY) and drops its route; the delete's answer on a may
                # come first (a loaded machine), so b is given a few seconds.
                deadline = time.monotonic() + 5
                while True:
                    try:
                        await b.Predict(predict_request("deployments/digits", data))
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.NOT_FOUND
                        break
                    assert time.monotonic() < deadline, "the second gateway still serves it"
                    await asyncio.sleep(0.05)
                print(f"the second gateway dropped it {5 - (deadline - time.monotonic()):.2f} s "
                      "after the delete answered")
        finally:
            for gateway in gateways:
                if gateway.process is not None:
                    gateway.terminate()
            registry.terminate()


async def _upload_digits_version(tmp_path, registry, seed: int):
    """Uploads a new version of models/digits (an MLP with 16 hidden units from `seed`);
    returns its torch module."""
    module = zoo_model("mlp", {"hidden_sizes": [16]}, [64], seed=seed)
    package = tmp_path / f"digits-{seed}.safetensors"
    save_zoo_package(package, module, kind="mlp", hyperparameters={"hidden_sizes": [16]},
                     input_shape=[64])
    async with registry.stub() as channel:
        await registry_service_pb2_grpc.RegistryServiceStub(channel).UploadModelVersion(
            model_upload_requests("models/digits", package.read_bytes()))
    return module


async def _until_serving(stub, data: np.ndarray, new: np.ndarray, old: np.ndarray,
                         timeout: float, never: str) -> float:
    """Predicts on deployments/digits until it answers `new`, asserting every answer before
    is `old` (served throughout the rollout); returns the seconds it took."""
    started = time.monotonic()
    while True:
        answer = logits(await stub.Predict(predict_request("deployments/digits", data)))
        if np.allclose(answer, new, rtol=1e-4, atol=1e-4):
            return time.monotonic() - started
        np.testing.assert_allclose(answer, old, rtol=1e-4, atol=1e-4)
        assert time.monotonic() < started + timeout, never
        await asyncio.sleep(0.05)


async def _until_state(table: SqlDeploymentStore, deployment_id: str, state: str,
                       timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dict(await asyncio.to_thread(table.list, "", 10)).get(
            deployment_id, {}).get("state") != state:
        assert time.monotonic() < deadline, f"{deployment_id} never became {state}"
        await asyncio.sleep(0.005)


async def _killed_mid(gateway, registry, table: SqlDeploymentStore, state: str, call) -> tuple[float, dict]:
    """Runs `call` (the gateway's create or update of `digits`) with the registry paused and
    kills the gateway once the table records `state`, deterministically mid-operation; the
    call ends UNAVAILABLE. Returns when the kill happened and the record the gateway left."""
    registry.process.send_signal(signal.SIGSTOP)
    try:
        pending = asyncio.ensure_future(call)
        await _until_state(table, "digits", state, 30)
        gateway.kill()
        killed_at = time.monotonic()
    finally:
        registry.process.send_signal(signal.SIGCONT)
    with pytest.raises(grpc.aio.AioRpcError) as interrupted:
        await pending
    assert interrupted.value.code() == grpc.StatusCode.UNAVAILABLE
    left = table.get("digits")
    assert left["state"] == state  # what the killed gateway left behind
    return killed_at, left


async def test_a_create_or_rollout_whose_gateway_is_killed_midway_is_finished_by_the_other(
        tmp_path):
    with postgres_database_or_skip() as database_url:
        registry = RegistryProcess(tmp_path / "registry")
        await registry.start()
        gateways = [inference_process(tmp_path, registry, name=name, database_url=database_url,
                                      deployment_resync_seconds="5",
                                      deployment_create_lease_seconds="2")
                    for name in ("inference-a", "inference-b")]
        table = SqlDeploymentStore.open(database_url)
        try:
            module = await register_digits_mlp(tmp_path, registry, hidden=16, seed=7)
            await asyncio.gather(*(gateway.start(timeout=180) for gateway in gateways))
            data = batch(4, seed=9)
            with torch.inference_mode():
                expected = module(torch.from_numpy(data)).numpy()
            async with gateways[0].stub() as channel_a, gateways[1].stub() as channel_b:
                a = inference_service_pb2_grpc.InferenceServiceStub(channel_a)
                b = inference_service_pb2_grpc.InferenceServiceStub(channel_b)
                # The registry paused: a's create has written CREATING and waits to resolve
                # the version when a is killed (deterministically mid-create).
                killed_at, left = await _killed_mid(
                    gateways[0], registry, table, "DEPLOYMENT_STATE_CREATING",
                    a.CreateDeployment(inf.CreateDeploymentRequest(deployment_id="digits", deployment=(
                        deployment_pb2.Deployment(model="models/digits/versions/1"))), timeout=60))

                seconds, answer = await _first_prediction(b, "deployments/digits", data, 90)
                np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-4)
                record = table.get("digits")
                assert record["state"] == "DEPLOYMENT_STATE_READY"
                assert record["serving_versions"] == ["models/digits/versions/1"]
                assert record["create_time"] == left["create_time"]
                print(f"\nthe surviving gateway finished the killed one's create and served it "
                      f"{time.monotonic() - killed_at:.2f} s after the kill (create lease 2 s)")
                on_b = await b.GetDeployment(inf.GetDeploymentRequest(name="deployments/digits"))
                assert on_b.state == deployment_pb2.DEPLOYMENT_STATE_READY
                with pytest.raises(grpc.aio.AioRpcError) as retried:  # the user's retry
                    await b.CreateDeployment(inf.CreateDeploymentRequest(
                        deployment_id="digits",
                        deployment=deployment_pb2.Deployment(model="models/digits/versions/1")))
                assert retried.value.code() == grpc.StatusCode.ALREADY_EXISTS

            await gateways[0].start(timeout=180)  # the killed gateway rejoins and serves it
            async with gateways[0].stub() as channel_a:
                a = inference_service_pb2_grpc.InferenceServiceStub(channel_a)
                _, answer = await _first_prediction(a, "deployments/digits", data, 60)
                np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-4)

            # Killed mid-rollout: version 2 uploaded, a's update paused on the registry
            # after it recorded ROLLING_OUT (deterministically mid-rollout).
            second = await _upload_digits_version(tmp_path, registry, seed=11)
            with torch.inference_mode():
                expected_2 = second(torch.from_numpy(data)).numpy()
            before = table.get("digits")
            async with gateways[0].stub() as channel_a, gateways[1].stub() as channel_b:
                a = inference_service_pb2_grpc.InferenceServiceStub(channel_a)
                b = inference_service_pb2_grpc.InferenceServiceStub(channel_b)
                killed_at, left = await _killed_mid(
                    gateways[0], registry, table, "DEPLOYMENT_STATE_ROLLING_OUT",
                    a.UpdateDeployment(inf.UpdateDeploymentRequest(
                        deployment=deployment_pb2.Deployment(
                            name="deployments/digits", model="models/digits/versions/2"),
                        update_mask=field_mask_pb2.FieldMask(paths=["model"])), timeout=60))
                on_b = await b.GetDeployment(inf.GetDeploymentRequest(name="deployments/digits"))
                assert on_b.state == deployment_pb2.DEPLOYMENT_STATE_ROLLING_OUT
                # b serves version 1 until the rollout is taken over and recorded.
                await _until_serving(b, data, expected_2, expected, 90,
                                     "the rollout was never taken over")
                serving_after = time.monotonic() - killed_at
                await _until_state(table, "digits", "DEPLOYMENT_STATE_READY", 30)
                record = table.get("digits")
                assert record["serving_versions"] == ["models/digits/versions/2"]
                assert record["etag"] not in (before["etag"], left["etag"])
                assert record["create_time"] == before["create_time"]
                print(f"the surviving gateway finished the killed one's rollout and served "
                      f"version 2 {serving_after:.2f} s after the kill (lease 2 s)")
                on_b = await b.GetDeployment(inf.GetDeploymentRequest(name="deployments/digits"))
                assert on_b.state == deployment_pb2.DEPLOYMENT_STATE_READY
                assert list(on_b.serving_versions) == ["models/digits/versions/2"]
        finally:
            table.close()
            for gateway in gateways:
                if gateway.process is not None and gateway.process.returncode is None:
                    gateway.terminate()
            registry.terminate()
