"""Tenant limits and the usage ledger in the running inference service (real registry, real
Triton, the native data plane in front): Predict and KServe ModelInfer are counted in requests
and rows whether the data plane or the service served them; a tenant over its requests per
minute gets RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo while another tenant is served;
a limits change applies without a restart; the UsageService shows a tenant only its own usage,
an admin everything, and refuses bad filters, page tokens and time ranges naming the field."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import grpc
import maas
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_cli.main import app as maas_cli
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery
from maas_runtime.grpc_errors import status_details, unpack_detail
from tritonclient.grpc import service_pb2_grpc
from typer.testing import CliRunner

from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.inference.test_inference_service import batch, kserve_request, predict_request
from tests.registry.helpers import model_upload_requests
from tests.support.grpc_asserts import expect_error

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

LIMITS = "tenants:\n  limited: {requests_per_minute: 3}\n"


class Suite:
    """The running services, a channel per principal, and the limits file."""

    channels: dict[str, grpc.aio.Channel]
    tokens: dict[str, str]
    limits_file: Path
    settings: InferenceSettings
    target: str

    def predict(self, principal: str) -> inference_service_pb2_grpc.InferenceServiceStub:
        return inference_service_pb2_grpc.InferenceServiceStub(self.channels[principal])

    def usage(self, principal: str) -> usage_pb2_grpc.UsageServiceStub:
        return usage_pb2_grpc.UsageServiceStub(self.channels[principal])

    async def settle_usage(self) -> None:
        """What the data plane served, polled now, and everything buffered, written."""
        await self.app.data_plane_usage.collect()
        await self.app.ledger.flush()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def suite(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("usage")
    s = Suite()
    s.registry = build_registry(RegistrySettings(state_dir=root / "registry", port=0))
    registry_port = await s.registry.start()
    registry_channel = open_channel(f"127.0.0.1:{registry_port}", token=(
        root / "registry" / "admin.token").read_text().strip())
    registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
    await registry.CreateModel(rs.CreateModelRequest(model_id="digits"))
    module = zoo_model("mlp", {"hidden_sizes": [16]}, [64], seed=1)
    package = root / "digits.safetensors"
    save_zoo_package(package, module, kind="mlp", hyperparameters={"hidden_sizes": [16]},
                     input_shape=[64])
    await registry.UploadModelVersion(model_upload_requests("models/digits", package.read_bytes()))
    await registry_channel.close()

    s.limits_file = root / "limits.yaml"
    s.limits_file.write_text(LIMITS)
    s.settings = settings = InferenceSettings(
        state_dir=root / "inference", port=0, client_token_file=root / "registry" / "admin.token",
        tenancy_file=str(s.limits_file), tenancy_recheck_seconds=0.2, usage_flush_seconds=0.2)
    s.discovery = StaticDiscovery({"registry": [f"127.0.0.1:{registry_port}"]})
    s.inference, s.app = build_inference(settings, discovery=s.discovery)
    port = await s.inference.start()
    s.target = f"127.0.0.1:{port}"
    s.tokens = {"admin": (root / "inference" / "admin.token").read_text().strip()}
    for principal, tenant in (("limited", ""), ("free", ""), ("teammate", "limited"),
                              ("free-teammate", "free")):
        s.tokens[principal] = add_token(settings.resolved_tokens_file, principal, Role.VIEWER,
                                        tenant=tenant)
    s.channels = {name: open_channel(s.target, token=token) for name, token in s.tokens.items()}
    await s.predict("admin").CreateDeployment(inf.CreateDeploymentRequest(
        deployment_id="digits",
        deployment=deployment_pb2.Deployment(model="models/digits/versions/1")))
    await asyncio.sleep(1.2)  # the new tokens reach the data plane (it rereads once a second)
    yield s
    for channel in s.channels.values():
        await channel.close()
    await s.inference.stop(0)
    await s.registry.stop(0)


async def records_of(suite, tenant: str) -> list[usage_pb2.UsageRecord]:
    reply = await suite.usage("admin").ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        filter=f'tenant = "{tenant}"', page_size=1000))
    return list(reply.usage_records)


async def test_what_the_data_plane_serves_is_counted_in_requests_and_rows(suite):
    served_before = (await suite.app.data_plane.stats())["deployments"].get(
        "digits", {"served": 0})["served"]
    stub = suite.predict("free")
    for rows in (1, 2, 3):
        await stub.Predict(predict_request("deployments/digits", batch(rows)))
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(suite.channels["free"])
    await kserve.ModelInfer(kserve_request("digits", batch(4)))
    served = (await suite.app.data_plane.stats())["deployments"]["digits"]["served"]
    assert served == served_before + 4, "the unlimited tenant is served by the data plane"
    await suite.settle_usage()
    records = await records_of(suite, "free")
    assert sum(r.requests for r in records) == 4
    assert sum(r.rows for r in records) == 10
    assert {(r.deployment, r.model_version, r.kind, r.outcome) for r in records} == {
        ("deployments/digits", "models/digits/versions/1", "predict", "OK")}


async def test_a_tokens_tenant_is_whom_its_calls_count_for(suite):
    await suite.predict("free-teammate").Predict(predict_request("deployments/digits", batch(3)))
    await suite.settle_usage()
    [record] = [r for r in await records_of(suite, "free") if r.principal == "free-teammate"]
    assert (record.tenant, record.requests, record.rows) == ("free", 1, 3)


async def test_a_tenant_over_its_limit_is_refused_and_another_is_not(suite):
    stub = suite.predict("limited")
    for _ in range(3):
        await stub.Predict(predict_request("deployments/digits", batch(2)))
    refused = await expect_error(stub.Predict(predict_request("deployments/digits", batch(2))),
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
    status = status_details(refused)
    quota = unpack_detail(status, error_details_pb2.QuotaFailure)
    retry = unpack_detail(status, error_details_pb2.RetryInfo)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("tenant:limited", "requests_per_minute: 3")]
    assert 0 < retry.retry_delay.ToNanoseconds() / 1e9 <= 60
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(suite.channels["limited"])
    await expect_error(kserve.ModelInfer(kserve_request("digits", batch(1))),
                       grpc.StatusCode.RESOURCE_EXHAUSTED)
    # Another principal of the same tenant (its token names the tenant) shares the limit.
    await expect_error(suite.predict("teammate").Predict(
        predict_request("deployments/digits", batch(1))), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # Another tenant is unaffected, right away.
    await suite.predict("free").Predict(predict_request("deployments/digits", batch(1)))
    await suite.settle_usage()
    limited = await records_of(suite, "limited")
    assert (sum(r.requests for r in limited), sum(r.rows for r in limited)) == (3, 6)


async def test_a_limits_change_applies_without_a_restart(suite):
    stub = suite.predict("limited")
    try:
        await stub.Predict(predict_request("deployments/digits", batch(1)))
        pytest.fail("the test before leaves `limited` over its limit")
    except grpc.aio.AioRpcError as refused:
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    rewrite_limits(suite, "tenants:\n  limited: {requests_per_minute: 1000}\n")
    deadline = time.monotonic() + 5
    while True:
        try:
            await stub.Predict(predict_request("deployments/digits", batch(1)))
            break
        except grpc.aio.AioRpcError as refused:
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the new limit never applied"
            await asyncio.sleep(0.2)
    # Without request limits left, the tenant goes back to the data plane: the table says so.
    rewrite_limits(suite, "tenants:\n  limited: {tokens_per_minute: 5}\n")
    await wait_for_relayed(suite, [])
    served = (await suite.app.data_plane.stats())["deployments"]["digits"]["served"]
    await stub.Predict(predict_request("deployments/digits", batch(1)))
    assert (await suite.app.data_plane.stats())["deployments"]["digits"]["served"] == served + 1
    rewrite_limits(suite, LIMITS)
    await wait_for_relayed(suite, ["limited"])


def rewrite_limits(suite, text: str) -> None:
    suite.limits_file.write_text(text)
    stamp = time.time_ns() + 2_000_000_000  # a new mtime even within the clock's resolution
    os.utime(suite.limits_file, ns=(stamp, stamp))


async def wait_for_relayed(suite, tenants: list[str]) -> None:
    deadline = time.monotonic() + 5
    while suite.app._route_table()["relay_tenants"] != tenants:
        assert time.monotonic() < deadline, "the data plane's table never followed the file"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the watcher publishes it to the data plane right after


async def test_a_tenant_sees_only_its_own_usage_and_an_admin_everything(suite):
    await suite.settle_usage()
    mine = await suite.usage("limited").ListUsageRecords(usage_pb2.ListUsageRecordsRequest())
    assert mine.usage_records and {r.tenant for r in mine.usage_records} == {"limited"}
    others = await suite.usage("limited").ListUsageRecords(
        usage_pb2.ListUsageRecordsRequest(filter='tenant = "free"'))
    assert list(others.usage_records) == []
    everyone = await suite.usage("admin").SummarizeUsage(usage_pb2.SummarizeUsageRequest(
        group_by=usage_pb2.USAGE_GROUPING_TENANT))
    assert {t.tenant for t in everyone.totals} >= {"free", "limited"}
    own_totals = await suite.usage("free").SummarizeUsage(usage_pb2.SummarizeUsageRequest(
        group_by=usage_pb2.USAGE_GROUPING_TENANT_AND_DEPLOYMENT))
    assert [(t.tenant, t.deployment) for t in own_totals.totals] == [
        ("free", "deployments/digits")]
    assert own_totals.totals[0].rows == sum(r.rows for r in await records_of(suite, "free"))


async def test_usage_pages_follow_each_other_without_overlap(suite):
    await suite.settle_usage()
    stub, seen, token = suite.usage("admin"), [], ""
    while True:
        page = await stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
            page_size=2, page_token=token))
        seen.extend(r.record_id for r in page.usage_records)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) >= 4


async def test_bad_usage_requests_name_the_field(suite):
    stub = suite.usage("admin")
    await expect_error(stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        filter="tenant = ")), grpc.StatusCode.INVALID_ARGUMENT, "filter")
    await expect_error(stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        filter="rows > 3")), grpc.StatusCode.INVALID_ARGUMENT, "filter")
    await expect_error(stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        page_token="not-a-token")), grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    await expect_error(stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    first = await stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(page_size=1))
    assert first.next_page_token
    await expect_error(stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        page_size=1, page_token=first.next_page_token, filter='kind = "predict"')),
        grpc.StatusCode.INVALID_ARGUMENT, "page_token")  # a token of another query
    later, earlier = timestamp_pb2.Timestamp(seconds=2_000_000_000), timestamp_pb2.Timestamp(
        seconds=1_000_000_000)
    await expect_error(stub.SummarizeUsage(usage_pb2.SummarizeUsageRequest(
        start_time=later, end_time=earlier)), grpc.StatusCode.INVALID_ARGUMENT, "end_time")
    await expect_error(stub.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=10**13))),
        grpc.StatusCode.INVALID_ARGUMENT, "start_time")
    await expect_error(stub.SummarizeUsage(usage_pb2.SummarizeUsageRequest(group_by=99)),
                       grpc.StatusCode.INVALID_ARGUMENT, "group_by")
    unauthenticated = open_channel(f"127.0.0.1:{suite.inference.port}")
    try:
        await expect_error(usage_pb2_grpc.UsageServiceStub(unauthenticated).ListUsageRecords(
            usage_pb2.ListUsageRecordsRequest()), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await unauthenticated.close()


async def test_predicts_relayed_to_the_service_are_counted_with_their_outcome(suite):
    # A request the data plane declines (a bad shape) is answered by the service: refused
    # before admission, so it is not usage; a good one through StreamPredict is.
    stub = suite.predict("free")
    await expect_error(stub.Predict(predict_request("deployments/digits", batch(2),
                                                    shape=[2, 63])),
                       grpc.StatusCode.INVALID_ARGUMENT)
    before = sum(r.requests for r in await records_of(suite, "free"))

    async def requests():
        for rows in (2, 5):
            yield predict_request("deployments/digits", batch(rows))

    replies = [reply async for reply in stub.StreamPredict(requests())]
    assert len(replies) == 2
    await suite.settle_usage()
    records = await records_of(suite, "free")
    assert sum(r.requests for r in records) == before + 2
    assert [r.rows for r in records[:2]] == [5, 2]
    assert all(r.duration_seconds >= 0 for r in records)
    assert np.all([r.outcome == "OK" for r in records])


async def test_each_request_of_a_kserve_stream_is_admitted_and_counted(suite):
    before = await records_of(suite, "free")
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(suite.channels["free"])

    async def requests():
        for rows in (3, 4):
            yield kserve_request("digits", batch(rows))

    answers = [answer async for answer in kserve.ModelStreamInfer(requests())]
    assert [a.error_message for a in answers] == ["", ""]
    await suite.settle_usage()
    new = [r for r in await records_of(suite, "free")
           if r.record_id not in {b.record_id for b in before}]
    assert sorted(r.rows for r in new) == [3, 4] and all(r.requests == 1 for r in new)
    # Over its limit, a stream's request is answered with the refusal and the stream goes on.
    rewrite_limits(suite, "tenants:\n  limited: {requests_per_day: 1}\n")  # long used up
    await asyncio.sleep(0.5)
    limited = service_pb2_grpc.GRPCInferenceServiceStub(suite.channels["teammate"])
    try:
        answers = [answer async for answer in limited.ModelStreamInfer(requests())]
    finally:
        rewrite_limits(suite, LIMITS)
    assert [a.error_message.split(" limit")[0] for a in answers] == [
        "tenant 'limited' is over its requests_per_day"] * 2, answers


async def test_the_sdk_and_the_cli_show_a_tenant_its_usage(suite):
    await suite.settle_usage()
    with maas.Client(targets={"inference": suite.target}, token=suite.tokens["free"]) as client:
        records = await asyncio.to_thread(client.usage, limit=3)
        assert len(records) == 3 and {r.tenant for r in records} == {"free"}
        deployment_only = await asyncio.to_thread(client.usage, deployment="digits",
                                                  since=records[-1].start_time.ToDatetime())
        assert deployment_only and all(r.deployment == "deployments/digits"
                                       for r in deployment_only)
        [total] = await asyncio.to_thread(client.usage_summary, group_by="")
        assert total.requests == sum(r.requests for r in await records_of(suite, "free"))
        with pytest.raises(maas.InvalidArgument) as refused:
            await asyncio.to_thread(client.usage, filter="rows >")
        assert [v.field for v in refused.value.field_violations] == ["filter"]

    def cli(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(maas_cli, ["--target", f"inference={suite.target}",
                                               "--token", suite.tokens["admin"], *args],
                                    prog_name="maas")
        return result.exit_code, result.stdout, result.stderr

    code, out, err = await asyncio.to_thread(cli, "usage", "--tenant", "limited", "--since",
                                             "1h", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert listed and {r["tenant"] for r in listed} == {"limited"}
    code, out, err = await asyncio.to_thread(cli, "usage", "--summary", "--json")
    assert code == 0, err
    assert {t["tenant"] for t in json.loads(out)} >= {"free", "limited"}
    code, out, err = await asyncio.to_thread(cli, "usage", "--since", "yesterday")
    assert code != 0 and "since" in err and "Traceback" not in out + err


async def test_usage_survives_a_restart_of_the_service(suite):
    await suite.settle_usage()
    before = await records_of(suite, "free")
    for channel in suite.channels.values():
        await channel.close()
    await suite.inference.stop(0)
    suite.inference, suite.app = build_inference(suite.settings, discovery=suite.discovery)
    suite.target = f"127.0.0.1:{await suite.inference.start()}"
    suite.channels = {name: open_channel(suite.target, token=token)
                      for name, token in suite.tokens.items()}
    after = await records_of(suite, "free")
    assert [(r.record_id, r.requests, r.rows) for r in after] == [
        (r.record_id, r.requests, r.rows) for r in before]
