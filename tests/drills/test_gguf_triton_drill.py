"""A GGUF deployed as it is: the decoupled generation model converts the file to bf16
safetensors in its `initialize` (15–60 s, which is why imports register the bf16 version too)
and then streams the same greedy answer as the cached conversion, on a real Triton."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from maas_inference.triton import ModelRepository, TritonClient, TritonServerProcess
from maas_inference.triton.model_repository import ArtifactFormat, GenerationServing, TritonModelSpec
from maas_llm.models import smollm2_gguf_path
from maas_llm.prompts import PromptRenderer

from tests.inference.servers import triton_process_config
from tests.support.llm import smollm2_causal_lm

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="function")]


async def test_a_gguf_model_converts_at_load_and_streams_a_greedy_answer(tmp_path):
    process = TritonServerProcess(triton_process_config(tmp_path / "triton"))
    await process.start()
    try:
        async with TritonClient(process.grpc_url, control_key=process.control_key) as control:
            ModelRepository(process.model_repository).write_model(
                TritonModelSpec(name="smollm2-gguf", artifact_format=ArtifactFormat.GGUF,
                                inputs=(), outputs=(),
                                generation=GenerationServing(torch_threads=2)),
                smollm2_gguf_path())
            await control.load_model("smollm2-gguf", timeout=600)
            await control.wait_model_ready("smollm2-gguf", timeout=600)
        prompt = PromptRenderer.from_directory(smollm2_causal_lm()).render(
            [{"role": "user", "content": "What is the capital of France?"}])
        text_input = triton_grpc.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        sampling = triton_grpc.InferInput("sampling_parameters", [1], "BYTES")
        sampling.set_data_from_numpy(np.array([json.dumps({"max_tokens": 16, "temperature": 0}).encode()],
                                              dtype=np.object_))
        responses: queue.Queue = queue.Queue()
        client = triton_grpc.InferenceServerClient(process.grpc_url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer("smollm2-gguf", [text_input, sampling],
                                      enable_empty_final_response=True)
            pieces, reason = [], ""
            while not reason:
                result, error = responses.get(timeout=300)
                assert error is None, error
                pieces.append(b"".join(result.as_numpy("text_output").reshape(-1)).decode())
                reason = b"".join(result.as_numpy("finish_reason").reshape(-1)).decode()
        finally:
            client.stop_stream()
            client.close()
        assert "Paris" in "".join(pieces)
        assert reason in ("stop", "length")
    finally:
        await process.stop()
