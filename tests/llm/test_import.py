"""Importing generative models into a real registry (in this process) with the SDK and the CLI:
a GGUF version whose header facts the registry recorded, its bf16 CAUSAL_LM version with
lineage to it, a causal-LM directory, and bad uploads refused with their format and field."""

from __future__ import annotations

import asyncio
import json

import grpc
import maas_sdk.llm
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from maas.common.v1 import tensor_pb2
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_cli.main import app as maas_cli
from maas_llm.models import smollm2_gguf_path
from maas_runtime.client import open_channel
from maas_runtime.errors import InvalidArgument
from maas_runtime.grpc_errors import status_details, unpack_detail
from maas_sdk.client import Client
from typer.testing import CliRunner

from tests.registry.helpers import model_upload_requests
from tests.support.grpc_asserts import expect_error
from tests.support.llm import smollm2_causal_lm, smollm2_causal_lm_zip
from tests.support.registry_server import registry_in_process

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(tmp_path_factory):
    async with registry_in_process(tmp_path_factory.mktemp("llm-import")) as served:
        yield served


def reason(error: grpc.aio.AioRpcError) -> str:
    return unpack_detail(status_details(error), error_details_pb2.ErrorInfo).reason


def sdk(registry) -> Client:
    target, token = registry
    return Client(targets={"registry": target}, token=token)


async def test_import_gguf_registers_the_gguf_with_its_header_facts_and_a_bf16_version_with_lineage(
        registry, monkeypatch):
    cached = await asyncio.to_thread(smollm2_causal_lm)
    # The conversion is maas_llm.convert's (tests/llm/test_prompts.py checks its output, and
    # tests/drills/test_llm_import_drill.py runs it inside the import); here it comes from the cache.
    monkeypatch.setattr(maas_sdk.llm, "convert_gguf", lambda path, work_dir: cached)
    with sdk(registry) as client:
        imported = await asyncio.to_thread(client.import_gguf, smollm2_gguf_path(), "smollm",
                                           alias="chat")
    gguf, bf16 = imported.gguf, imported.causal_lm
    assert gguf.format == model_pb2.MODEL_FORMAT_GGUF
    assert gguf.labels["gguf.architecture"] == "llama"
    assert gguf.labels["gguf.context_length"] == "8192"
    assert gguf.labels["gguf.vocabulary_size"] == "49152"
    assert gguf.labels["gguf.quantization"] == "MOSTLY_Q4_1"
    assert gguf.labels["gguf.chat_template"] == "present"
    assert [t.name for t in gguf.signature.inputs] == ["text_input"]
    assert [t.datatype for t in gguf.signature.inputs] == [tensor_pb2.DATA_TYPE_BYTES]
    assert bf16.format == model_pb2.MODEL_FORMAT_CAUSAL_LM
    assert list(bf16.lineage.parents) == [gguf.name]
    assert bf16.lineage.operation.kind == "convert"
    assert bf16.labels["llm.dtype"] == "bfloat16"
    assert bf16.labels["llm.chat_template"] == "present"
    assert list(bf16.aliases) == ["chat"]


async def test_import_causal_lm_and_the_cli_import_gguf_without_bf16(registry, tmp_path):
    directory = (await asyncio.to_thread(smollm2_causal_lm)).path
    with sdk(registry) as client:
        version = await asyncio.to_thread(client.import_causal_lm, directory, "smollm-dir")
    assert version.format == model_pb2.MODEL_FORMAT_CAUSAL_LM
    assert [t.name for t in version.signature.outputs] == ["text_output"]
    target, token = registry
    result = await asyncio.to_thread(
        CliRunner().invoke, maas_cli,
        ["--target", f"registry={target}", "--token", token, "--json", "import", "gguf",
         str(smollm2_gguf_path()), "--model", "smollm-cli", "--no-bf16"], prog_name="maas")
    assert result.exit_code == 0, result.stderr
    versions = json.loads(result.stdout)
    assert [v["format"] for v in versions] == ["MODEL_FORMAT_GGUF"]
    assert versions[0]["labels"]["gguf.quantization"] == "MOSTLY_Q4_1"


async def test_a_damaged_gguf_is_refused_by_the_sdk_before_uploading(registry, tmp_path):
    damaged = tmp_path / "cut.gguf"
    damaged.write_bytes(smollm2_gguf_path().read_bytes()[:4096])
    with sdk(registry) as client, pytest.raises(InvalidArgument) as caught:
        await asyncio.to_thread(client.import_gguf, damaged, "damaged", bf16=False)
    assert caught.value.reason == "GGUF_INVALID"
    assert caught.value.field_violations[0].field == "path"
    assert "truncated" in caught.value.message


async def test_the_registry_refuses_bad_uploads_of_both_formats_naming_the_format_field(registry):
    target, token = registry
    async with open_channel(target, token=token, max_message_bytes=64 << 20) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="refused"))
        refused = await expect_error(stub.UploadModelVersion(model_upload_requests(
            "models/refused", b"GGUF\x03\x00\x00\x00truncated", fmt=model_pb2.MODEL_FORMAT_GGUF)),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert reason(refused) == "GGUF_INVALID" and "GGUF" in refused.details()
        archive = await asyncio.to_thread(smollm2_causal_lm_zip)
        for data, declared in ((archive.read_bytes(), model_pb2.MODEL_FORMAT_HF_TRANSFORMER),
                               (smollm2_gguf_path().read_bytes(), model_pb2.MODEL_FORMAT_CAUSAL_LM)):
            mismatch = await expect_error(stub.UploadModelVersion(model_upload_requests(
                "models/refused", data, chunk=1 << 20, fmt=declared)),
                grpc.StatusCode.INVALID_ARGUMENT, field="header.model_version.format")
            assert reason(mismatch) == "FORMAT_MISMATCH"
        listed = await stub.ListModelVersions(rs.ListModelVersionsRequest(parent="models/refused"))
        assert not listed.model_versions, "a refused upload writes nothing"
