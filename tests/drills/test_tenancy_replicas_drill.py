"""Drill: two real inference services (each with its own Triton and native data plane) on one
PostgreSQL: a tenant with requests_per_minute N gets N Predicts in total through both gateways,
not N through each. The data plane relays the limited tenant's calls to its service, whose
admission counts them in the shared database; an unlimited caller is served by the data plane
alone, untouched."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel

from tests.inference.servers import register_digits_mlp
from tests.inference.test_inference_service import batch, predict_request
from tests.support.postgres import postgres_database_or_skip
from tests.support.processes import RegistryProcess, inference_process

pytestmark = [pytest.mark.triton, pytest.mark.postgres]

REQUESTS_PER_MINUTE = 6


async def _until_served(stub, data, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await stub.Predict(predict_request("deployments/digits", data), timeout=5)
            return
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND) or (
                    time.monotonic() > deadline):
                raise
            await asyncio.sleep(0.1)


def _quota_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = status_pb2.Status()
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status.ParseFromString(value)
    violations = []
    for detail in status.details:
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(quota):
            violations += [v.description for v in quota.violations]
    return violations


async def test_a_tenant_gets_its_requests_per_minute_once_across_two_gateways(tmp_path):
    with postgres_database_or_skip() as database_url:
        limits = tmp_path / "limits.yaml"
        limits.write_text(f"tenants:\n  limited: {{requests_per_minute: {REQUESTS_PER_MINUTE}}}\n")
        registry = RegistryProcess(tmp_path / "registry")
        await registry.start()
        gateways = [inference_process(tmp_path, registry, name=name, database_url=database_url,
                                      tenancy_file=str(limits))
                    for name in ("inference-a", "inference-b")]
        try:
            await register_digits_mlp(tmp_path, registry, hidden=16, seed=5)
            await asyncio.gather(*(gateway.start(timeout=180) for gateway in gateways))
            tokens = [add_token(gateway.state_dir / "tokens.json", "limited", Role.VIEWER)
                      for gateway in gateways]
            data = batch(2, seed=3)
            async with gateways[0].stub() as admin_a, gateways[1].stub() as admin_b:
                await inference_service_pb2_grpc.InferenceServiceStub(admin_a).CreateDeployment(
                    inf.CreateDeploymentRequest(deployment_id="digits", deployment=(
                        deployment_pb2.Deployment(model="models/digits/versions/1"))))
                for channel in (admin_a, admin_b):  # the admin is unlimited: served freely
                    await _until_served(inference_service_pb2_grpc.InferenceServiceStub(channel),
                                        data)
                await asyncio.sleep(1.5)  # the new tokens reach both data planes (1 s reread)
                limited = [open_channel(gateway.target, token=token)
                           for gateway, token in zip(gateways, tokens, strict=True)]
                stubs = [inference_service_pb2_grpc.InferenceServiceStub(c) for c in limited]
                try:
                    # Alternating: N/2 through each gateway, every one served.
                    for number in range(REQUESTS_PER_MINUTE):
                        await stubs[number % 2].Predict(
                            predict_request("deployments/digits", data), timeout=10)
                    # Either gateway alone would still have room; together the tenant has none.
                    results = await asyncio.gather(*(
                        stubs[number % 2].Predict(predict_request("deployments/digits", data),
                                                  timeout=10)
                        for number in range(2 * REQUESTS_PER_MINUTE)), return_exceptions=True)
                    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
                    assert len(refused) == len(results), (
                        f"{len(results) - len(refused)} Predict(s) beyond the tenant's "
                        f"{REQUESTS_PER_MINUTE} a minute were served")
                    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
                    assert _quota_violations(refused[0]) == [
                        f"requests_per_minute: {REQUESTS_PER_MINUTE}"]
                    # An unlimited caller is not held by the tenant's limit.
                    for channel in (admin_a, admin_b):
                        await inference_service_pb2_grpc.InferenceServiceStub(channel).Predict(
                            predict_request("deployments/digits", data), timeout=10)
                finally:
                    for channel in limited:
                        await channel.close()
        finally:
            for gateway in gateways:
                if gateway.process is not None:
                    gateway.terminate()
            registry.terminate()
