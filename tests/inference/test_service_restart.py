"""Kill -9 of the inference service itself: its Triton and data plane go with it, and a restart on the same
state directory brings every deployment back, serving the same answers.

Both services run as real subprocesses; the restarted instance reuses the Triton port, so a
tritonserver orphaned by the first instance would make the restart fail.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc

from tests.inference.servers import inference_process, register_digits_mlp
from tests.inference.test_inference_service import batch, logits, predict_request
from tests.support.processes import ServiceProcess, children_named, process_alive

pytestmark = pytest.mark.triton

HYPER = {"hidden_sizes": [16]}


async def test_kill_9_of_the_service_then_restart_reloads_every_deployment(tmp_path):
    registry = ServiceProcess("registry", tmp_path / "registry")
    await registry.start()
    inference = inference_process(tmp_path, registry)
    try:
        await register_digits_mlp(tmp_path, registry, hidden=16, seed=21, alias="prod")

        await inference.start(timeout=120)
        data = batch(6, seed=3)
        async with inference.stub() as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            for deployment_id in ("first", "second"):
                await stub.CreateDeployment(inf.CreateDeploymentRequest(
                    deployment_id=deployment_id,
                    deployment=deployment_pb2.Deployment(model="models/digits@prod")))
            before = logits(await stub.Predict(predict_request("deployments/first", data)))

        tritons = children_named(inference.process.pid, "tritonserver")
        data_planes = children_named(inference.process.pid, "maas-inference-dataplane")
        assert len(tritons) == 1 and len(data_planes) == 1, (tritons, data_planes)
        inference.kill()
        deadline = time.monotonic() + 15
        while (process_alive(tritons[0]) or process_alive(data_planes[0])) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not process_alive(tritons[0]), "Triton outlived the service that started it"
        assert not process_alive(data_planes[0]), "the data plane outlived its service"

        restarted_at = time.monotonic()
        await inference.start(timeout=120)
        async with inference.stub() as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            for deployment_id in ("first", "second"):
                for _ in range(300):
                    deployment = await stub.GetDeployment(
                        inf.GetDeploymentRequest(name=f"deployments/{deployment_id}"))
                    if deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY:
                        break
                    await asyncio.sleep(0.1)
                assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY, deployment
                assert list(deployment.serving_versions) == ["models/digits/versions/1"]
            print(f"deployments READY {time.monotonic() - restarted_at:.1f} s after the restart")
            for deployment_id in ("first", "second"):
                reply = await stub.Predict(predict_request(f"deployments/{deployment_id}", data))
                np.testing.assert_array_equal(logits(reply), before)
    finally:
        inference.terminate()
        registry.terminate()
