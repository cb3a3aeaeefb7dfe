"""Test certificates made with the openssl CLI, and the TLS policy every TLS test asserts."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from maas_runtime.client import open_channel
from maas_runtime.tls import channel_credentials


def make_certificates(directory: Path) -> Path:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, in `directory`."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=maas-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem")
    return directory


async def assert_tls_policy(port: int, certs: Path, mutual: bool,
                            call: Callable[[grpc.aio.Channel], Awaitable]) -> None:
    """`call` succeeds over TLS with a client certificate; plaintext is refused; without a
    client certificate it succeeds only when TLS is not mutual."""
    with_cert = channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    async with open_channel(f"localhost:{port}", credentials=with_cert) as channel:
        await call(channel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    async with open_channel(f"localhost:{port}",
                            credentials=channel_credentials(certs / "ca.pem")) as no_cert:
        if mutual:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(no_cert)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            await call(no_cert)
