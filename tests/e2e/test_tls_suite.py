"""The whole suite with TLS on every port, then with mTLS: train, register, deploy, predict.

One suite per mode, as `maas up --tls-cert … [--mtls]` runs it: registry, trainer and
inference (with its real Triton) as processes whose ports speak TLS only and whose calls to
each other (trainer → registry, inference → registry) go over TLS with the same CA (and
client certificates under mTLS). In the TLS suite, a trainer configured for plaintext
against the TLS registry is refused with an UNAVAILABLE that names TLS.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas_cli.local_suite import LocalSuite, SuiteTls
from maas_runtime.client import open_channel

from tests.support.processes import ServiceProcess
from tests.support.suite_flow import (
    SuiteStubs,
    deploy,
    predict,
    registered_version,
    train_and_register,
)
from tests.support.tls import assert_tls_policy, make_certificates
from tests.trainer.helpers import create_job, digits_spec

pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def suite_tls(certs: Path, mutual: bool) -> SuiteTls:
    return SuiteTls(certs / "server.pem", certs / "server.key", certs / "ca.pem", mutual=mutual,
                    client_cert_file=certs / "client.pem", client_key_file=certs / "client.key")


def health_check(service: str):
    async def call(channel: grpc.aio.Channel) -> None:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return call


async def plaintext_trainer_is_refused_naming_tls(suite: LocalSuite, state_dir: Path) -> None:
    """A trainer whose peer settings say nothing about TLS, against the TLS registry."""
    trainer = ServiceProcess("trainer", state_dir, registry_target=suite.services["registry"].target,
                             tokens_file=str(suite.tokens_file),
                             admin_token_file=str(suite.admin_token_file),
                             registry_timeout_seconds="10")
    await trainer.start()
    try:
        async with open_channel(trainer.target, token=suite.token()) as channel:
            stubs = SuiteStubs(channel, channel, channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create_job(stubs.trainer, digits_spec(
                    epochs=1, dataset="datasets/digits/versions/1", model_id="refused"))
    finally:
        trainer.terminate()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    message = caught.value.details()
    assert "over plaintext" in message and "TLS" in message, message
    assert "MAAS_TRAINER_PEER_TLS_CA_FILE" in message, message


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_the_suite_trains_registers_deploys_and_predicts_over_tls(
        tmp_path, certificates, mutual):
    suite = LocalSuite(tmp_path / "suite", fixed_ports=False,
                       tls=suite_tls(certificates, mutual),
                       settings={name: {"log_level": "WARNING"}
                                 for name in ("registry", "trainer", "inference")})
    await suite.start()
    try:
        for name, service in suite.services.items():
            await assert_tls_policy(service.port, certificates, mutual, health_check(name))
        channels = [suite.open_channel(name) for name in ("registry", "trainer", "inference")]
        try:
            stubs = SuiteStubs(*channels)
            await train_and_register(stubs, "tiny")  # trainer → registry over (m)TLS
            version = await registered_version(stubs, "tiny")
            deployment = await deploy(stubs, "tiny")  # inference → registry over (m)TLS
            reply = await predict(stubs, deployment.name)
        finally:
            for channel in channels:
                await channel.close()
        if not mutual:
            await plaintext_trainer_is_refused_naming_tls(suite, tmp_path / "plaintext-trainer")
    finally:
        await suite.stop()
    assert version.name == "models/tiny/versions/1"
    assert reply.model_version == version.name
    assert list(reply.outputs[0].shape) == [1, 10]
