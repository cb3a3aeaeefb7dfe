"""The SmolLM2 test model as the suite's tests use it: its bf16 causal-LM directory and zip, and
its registration on a running registry.

Converting the GGUF (`maas_llm.convert`) takes 15–50 s, so the result is cached under
`build/llm-cache/<sha256 of the GGUF>/` and every later test run, in any process, reuses it.
A file lock keeps two processes (parallel test runs, other engineers) from converting at
once, and the conversion itself renames its directory into place, so a reader never sees a
half-written model.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
from pathlib import Path

from maas.common.v1 import tensor_pb2
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_llm.directory import CausalLmDirectory, zip_causal_lm
from maas_llm.models import smollm2_gguf_path
from maas_runtime.client import open_channel

from tests.registry.helpers import model_upload_requests

REPO = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO / "build" / "llm-cache"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_dir() -> Path:
    directory = CACHE_ROOT / file_sha256(smollm2_gguf_path())[:16]
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def smollm2_causal_lm() -> CausalLmDirectory:
    """SmolLM2-135M-Instruct as a bf16 safetensors directory (converted once, then cached)."""
    from maas_llm.convert import convert_gguf_to_causal_lm

    cache = _cache_dir()
    target = cache / "bf16"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "config.json").is_file():
                return convert_gguf_to_causal_lm(smollm2_gguf_path(), target)
            return CausalLmDirectory.open(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def smollm2_causal_lm_zip() -> Path:
    """The cached directory zipped as a MODEL_FORMAT_CAUSAL_LM artifact (zipped once)."""
    directory = smollm2_causal_lm()
    archive = directory.path.parent / "bf16.zip"
    with open(directory.path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not archive.is_file():
                staging = archive.with_suffix(".zip.partial")
                zip_causal_lm(directory.path, staging)
                staging.replace(archive)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return archive


async def upload_smollm2(registry_target: str, token: str, model_id: str = "smollm") -> str:
    """Register the cached bf16 zip as `models/<model_id>/versions/1` (MODEL_FORMAT_CAUSAL_LM
    with the generation contract's signature) on a running registry; its version name."""
    archive = await asyncio.to_thread(smollm2_causal_lm_zip)
    signature = model_pb2.Signature()
    signature.inputs.add(name="text_input", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
    signature.outputs.add(name="text_output", datatype=tensor_pb2.DATA_TYPE_BYTES, shape=[1])
    async with open_channel(registry_target, token=token,
                            max_message_bytes=64 << 20) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.CreateModel(rs.CreateModelRequest(model_id=model_id))
        version = await registry.UploadModelVersion(model_upload_requests(
            f"models/{model_id}", archive.read_bytes(), chunk=1 << 20,
            fmt=model_pb2.MODEL_FORMAT_CAUSAL_LM, signature=signature))
    return version.name
