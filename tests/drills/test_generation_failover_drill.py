"""Drill: the SDK's Generate over two inference gateways (each with its own Triton serving the
real SmolLM2 bf16) when a gateway is killed -9. A generation whose gateway dies before any text
reached the caller is started again on the other gateway, and the caller sees one whole
generation (greedy: the same text as a generation that never failed); a gateway lost after text
was handed over ends the generation with UNAVAILABLE saying the text cannot be replayed.

Which gateway a call takes is held still with SIGSTOP: the gateway's processes take the call
and answer nothing until killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import maas
import pytest
from maas.common.v1 import tensor_pb2
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_runtime.auth import ensure_admin_token

from tests.registry.helpers import model_upload_requests
from tests.support.llm import smollm2_causal_lm_zip
from tests.support.processes import RegistryProcess, ServiceProcess, children_named

pytestmark = pytest.mark.triton

RETRIES = maas.RetryPolicy(max_attempts=4, initial_backoff_seconds=0.1, max_backoff_seconds=0.5)
MESSAGES = [{"role": "user", "content": "Count from one to ten."}]
GENERATION_STARTED_SECONDS = 30.0
"""Long enough for the first text of a generation on a loaded machine."""


async def upload_smollm(registry: ServiceProcess) -> None:
    archive = await asyncio.to_thread(smollm2_causal_lm_zip)
    async with registry.stub() as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="smollm"))
        signature = model_pb2.Signature()
        signature.inputs.add(name="text_input", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
        signature.outputs.add(name="text_output", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
        await stub.UploadModelVersion(model_upload_requests(
            "models/smollm", archive.read_bytes(), chunk=1 << 20,
            fmt=model_pb2.MODEL_FORMAT_CAUSAL_LM, signature=signature))


@pytest.fixture
async def gateways(tmp_path: Path) -> AsyncIterator[tuple[list[ServiceProcess], str]]:
    """Two inference gateways, each with its own Triton and a `chat` deployment of SmolLM2,
    and the admin token both accept."""
    ensure_admin_token(tmp_path / "admin.token", tmp_path / "tokens.json")
    token = (tmp_path / "admin.token").read_text().strip()
    registry = RegistryProcess(tmp_path / "registry")
    await registry.start()
    replicas = [ServiceProcess("inference", tmp_path / f"inference-{index}",
                               registry_target=registry.target,
                               client_token_file=str(registry.state_dir / "admin.token"),
                               admin_token_file=str(tmp_path / "admin.token"),
                               tokens_file=str(tmp_path / "tokens.json"))
                for index in range(2)]
    tritons: list[int] = []
    try:
        await upload_smollm(registry)
        await asyncio.gather(*(replica.start(timeout=240) for replica in replicas))
        for replica in replicas:
            tritons += children_named(replica.process.pid, "tritonserver")
            with one_gateway(replica, token) as client:
                await asyncio.to_thread(client.deploy, "chat", "smollm/1")
        yield replicas, token
    finally:
        await asyncio.gather(*(asyncio.to_thread(process.terminate)
                               for process in [*replicas, registry] if process.alive()))
        for pid in tritons:  # a killed gateway's Triton
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def one_gateway(replica: ServiceProcess, token: str) -> maas.Client:
    return maas.Client(targets={"inference": replica.target}, token=token, retry=RETRIES,
                       timeout=120)


def hold(replica: ServiceProcess, sending: signal.Signals = signal.SIGSTOP) -> None:
    """Stop the gateway's service and its data plane: calls are taken, nothing is answered
    (SIGCONT: answered again)."""
    for pid in [replica.process.pid,
                *children_named(replica.process.pid, "maas-inference-dataplane")]:
        os.kill(pid, sending)


class Reader:
    """Reads a generation on a thread: its chunks, and whether the first came."""

    def __init__(self, generation: maas.Generation) -> None:
        self.chunks: list[str] = []
        self.first_chunk = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(generation,))
        self.thread.start()

    def _read(self, generation: maas.Generation) -> None:
        for chunk in generation:
            self.chunks.append(chunk)
            self.first_chunk.set()

    def text(self) -> str:
        self.thread.join(timeout=300)
        return "".join(self.chunks)


def generate(client: maas.Client, max_tokens: int) -> maas.Generation:
    return client.generate("chat", messages=MESSAGES, max_tokens=max_tokens, temperature=0,
                           timeout=300)


def test_a_generation_is_started_again_elsewhere_only_while_no_text_reached_the_caller(
        gateways: tuple[list[ServiceProcess], str], caplog: pytest.LogCaptureFixture):
    (first, second), token = gateways
    with one_gateway(second, token) as client:
        expected = generate(client, 24).text()
    assert expected

    caplog.set_level(logging.WARNING, logger="maas_sdk.generation")
    with maas.Client(targets={"inference": f"{first.target},{second.target}"},
                     token=token, retry=RETRIES, timeout=120) as client:
        # Calls take the gateways in turn: a generation that starts on the held one gets
        # no text; one that got text started on the other (finish it, and go again).
        for _ in range(4):  # both channels connected before a gateway is held
            client.get_deployment("chat")
        for _ in range(4):
            caplog.clear()
            hold(first)
            reader = Reader(generate(client, 24))
            if not reader.first_chunk.wait(GENERATION_STARTED_SECONDS):
                break
            assert reader.text() == expected
            hold(first, signal.SIGCONT)
        else:
            raise AssertionError("no generation started on the held gateway")
        first.kill()  # its data plane dies with it
        assert reader.text() == expected
        retried = [r.getMessage() for r in caplog.records if "starting it again" in r.getMessage()]
        assert len(retried) == 1, retried

        # The first gateway is gone: this one goes to the second, and loses it mid-stream.
        generation = generate(client, 400)
        chunks = iter(generation)
        assert next(chunks)
        second.kill()
        with pytest.raises(maas.Unavailable) as cut_short:
            for _ in chunks:
                pass
    assert cut_short.value.reason == "GENERATION_INTERRUPTED"
    assert "cannot be replayed" in cut_short.value.message
