"""The whole GGUF import, conversion included (15–60 s), through the CLI: `maas import gguf`
registers the GGUF and its bf16 CAUSAL_LM conversion with lineage, and the converted version
unzips to a model whose greedy answer is the cached conversion's (tests/support/llm.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from maas.registry.v1 import model_pb2
from maas_cli.main import app as maas_cli
from maas_llm.directory import unzip_causal_lm
from maas_llm.engine import EngineSettings, GenerationEngine
from maas_llm.models import smollm2_gguf_path
from maas_llm.sampling import SamplingParams
from maas_sdk.client import Client
from typer.testing import CliRunner

from tests.support.llm import smollm2_causal_lm
from tests.support.registry_server import registry_in_process

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(tmp_path_factory):
    async with registry_in_process(tmp_path_factory.mktemp("llm-import-drill")) as served:
        yield served


def greedy_answer(directory) -> str:
    engine = GenerationEngine.from_directory(directory, EngineSettings(torch_threads=2)).start()
    try:
        prompt = engine.renderer.render([{"role": "user", "content": "What is the capital of France?"}])
        return engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0)).text()[0]
    finally:
        engine.stop()


async def test_maas_import_gguf_converts_to_bf16_and_registers_both_with_lineage(registry, tmp_path):
    target, token = registry
    result = await asyncio.to_thread(
        CliRunner().invoke, maas_cli,
        ["--target", f"registry={target}", "--token", token, "--json", "import", "gguf",
         str(smollm2_gguf_path()), "--model", "smollm", "--alias", "chat"], prog_name="maas")
    assert result.exit_code == 0, result.stderr
    gguf, bf16 = json.loads(result.stdout)
    assert gguf["format"] == "MODEL_FORMAT_GGUF" and bf16["format"] == "MODEL_FORMAT_CAUSAL_LM"
    assert bf16["lineage"]["parents"] == [gguf["name"]]
    assert bf16["aliases"] == ["chat"]
    with Client(targets={"registry": target}, token=token) as client:
        archive = tmp_path / "bf16.zip"
        await asyncio.to_thread(client.download, bf16["name"], archive)
        version = await asyncio.to_thread(client.get_version, bf16["name"])
    assert version.format == model_pb2.MODEL_FORMAT_CAUSAL_LM
    assert version.labels["llm.dtype"] == "bfloat16"
    directory = unzip_causal_lm(archive, tmp_path / "bf16")
    answer = await asyncio.to_thread(greedy_answer, directory)
    assert "Paris" in answer
    assert answer == await asyncio.to_thread(greedy_answer, smollm2_causal_lm())
