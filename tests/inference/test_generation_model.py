"""The decoupled generation model on a real Triton: the bf16 SmolLM2 CAUSAL_LM zip written by
the model repository, loaded, and streamed through tritonclient's gRPC stream (KServe-v2
ModelStreamInfer) with the exact I/O the gateway uses: `text_input` and `sampling_parameters`
in; `text_output`, `finish_reason` and `usage` out per response, the last one final; bad
parameters answered "INVALID_ARGUMENT: <field>: ...", a full queue "RESOURCE_EXHAUSTED: ...",
and a cancelled stream's slot freed for the next request."""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton_grpc
from maas_inference.triton.model_repository import (
    ArtifactFormat,
    GenerationServing,
    TritonModelSpec,
    build_model_config,
)
from maas_llm.prompts import PromptRenderer

from tests.support.llm import smollm2_causal_lm, smollm2_causal_lm_zip

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODEL = "smollm2-bf16-generation"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Stream:
    """Every response (or error) of the requests sent on one gRPC stream, by request id."""

    responses: queue.Queue = field(default_factory=queue.Queue)

    def callback(self, result, error) -> None:
        self.responses.put((result, error))

    def collect(self, count_final: int, timeout: float = 300.0) -> dict[str, list]:
        """Responses per request id until `count_final` requests have ended (final or error)."""
        by_id: dict[str, list] = {}
        ended = 0
        deadline = time.monotonic() + timeout
        while ended < count_final:
            result, error = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                by_id.setdefault("errors", []).append(str(error))
                ended += 1
                continue
            response = result.get_response()
            by_id.setdefault(response.id, []).append(result)
            if response.parameters["triton_final_response"].bool_param:
                ended += 1
        return by_id


def request_inputs(prompt: str, sampling: dict | None) -> list:
    text = triton_grpc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs = [text]
    if sampling is not None:
        parameters = triton_grpc.InferInput("sampling_parameters", [1], "BYTES")
        parameters.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        inputs.append(parameters)
    return inputs


def output_text(result, name: str) -> str:
    value = result.as_numpy(name)
    return b"".join(value.reshape(-1)).decode() if value is not None else ""


@pytest.fixture(scope="module")
def prompt() -> str:
    return PromptRenderer.from_directory(smollm2_causal_lm()).render(QUESTION)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def generation_model(model_repository, triton_client):
    spec = TritonModelSpec(
        name=MODEL, artifact_format=ArtifactFormat.CAUSAL_LM, inputs=(), outputs=(),
        generation=GenerationServing(max_running_streams=2, max_waiting_streams=1, torch_threads=2),
    )
    model_repository.write_model(spec, smollm2_causal_lm_zip())
    await triton_client.load_model(MODEL)
    await triton_client.wait_model_ready(MODEL, timeout=300)
    yield MODEL
    await triton_client.unload_model(MODEL)


def test_the_config_is_decoupled_with_one_instance_and_the_fixed_generation_io():
    config = build_model_config(TritonModelSpec(
        name="x", artifact_format=ArtifactFormat.GGUF, inputs=(), outputs=()))
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [group.count for group in config.instance_group] == [1]
    assert [(i.name, i.optional) for i in config.input] == [("text_input", False),
                                                           ("sampling_parameters", True)]
    assert [o.name for o in config.output] == ["text_output", "finish_reason", "usage"]
    assert config.parameters["maas.artifact_path"].string_value == "model.gguf"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stream_sends_text_deltas_then_a_final_response_with_reason_and_usage(
        triton, generation_model, prompt):
    stream = Stream()
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=stream.callback)
    try:
        greedy = request_inputs(prompt, {"max_tokens": 30, "temperature": 0})
        client.async_stream_infer(generation_model, greedy, request_id="greedy",
                                  enable_empty_final_response=True)
        client.async_stream_infer(generation_model, request_inputs(prompt, None), request_id="defaults",
                                  enable_empty_final_response=True)
        responses = stream.collect(2)
    finally:
        client.stop_stream()
        client.close()
    greedy = responses["greedy"]
    assert len(greedy) > 2, "one response per token group, not one at the end"
    assert all(output_text(r, "finish_reason") == "" for r in greedy[:-1])
    last = greedy[-1]
    assert last.get_response().parameters["triton_final_response"].bool_param
    assert output_text(last, "finish_reason") == "stop"
    text = "".join(output_text(r, "text_output") for r in greedy)
    assert "Paris" in text
    usage = json.loads(output_text(last, "usage"))
    assert usage["prompt_tokens"] == 37
    assert 0 < usage["completion_tokens"] <= 30
    assert usage["time_to_first_token_s"] > 0
    counts = [json.loads(output_text(r, "usage"))["completion_tokens"] for r in greedy]
    assert counts == sorted(counts), "usage is cumulative"
    assert output_text(responses["defaults"][-1], "finish_reason") in ("stop", "length")


@pytest.mark.asyncio(loop_scope="session")
async def test_bad_input_is_an_error_naming_the_code_and_the_field(triton, generation_model, prompt):
    stream = Stream()
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=stream.callback)
    try:
        client.async_stream_infer(generation_model, request_inputs(prompt, {"max_tokens": 0}))
        client.async_stream_infer(generation_model, request_inputs(prompt, {"temperature": -1}))
        client.async_stream_infer(generation_model, request_inputs("", {"max_tokens": 4}))
        client.async_stream_infer(generation_model, request_inputs(prompt, {"max_tokens": 9000}))
        not_utf8 = triton_grpc.InferInput("text_input", [1], "BYTES")
        not_utf8.set_data_from_numpy(np.array([b"\xff\xfe caf\xe9"], dtype=np.object_))
        client.async_stream_infer(generation_model, [not_utf8])
        errors = sorted(stream.collect(5)["errors"])
    finally:
        client.stop_stream()
        client.close()
    assert any("INVALID_ARGUMENT: max_tokens: must be between 1" in e for e in errors), errors
    assert any("INVALID_ARGUMENT: temperature: " in e for e in errors), errors
    assert any("INVALID_ARGUMENT: text_input: the prompt is empty" in e for e in errors), errors
    assert any("INVALID_ARGUMENT: max_tokens: 9000 new tokens" in e for e in errors), errors
    assert any("INVALID_ARGUMENT: text_input: is not valid UTF-8" in e for e in errors), errors


@pytest.mark.asyncio(loop_scope="session")
async def test_past_the_queue_bound_requests_are_refused_and_cancelled_streams_free_their_slots(
        triton, generation_model, prompt):
    # Counting to 1000 runs to max_tokens: only a cancellation frees these slots early.
    counting = PromptRenderer.from_directory(smollm2_causal_lm()).render(
        [{"role": "user", "content": "Count from 1 to 1000, one number after another, separated by commas."}])
    long = {"max_tokens": 4000, "temperature": 0}
    stream = Stream()
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=stream.callback)
    try:
        for index in range(4):  # 2 running + 1 waiting, the fourth refused
            client.async_stream_infer(generation_model, request_inputs(counting, long),
                                      request_id=f"long-{index}", enable_empty_final_response=True)
        result, error = stream.responses.get(timeout=120)
        while error is None:
            result, error = stream.responses.get(timeout=120)
        assert str(error).startswith("[StatusCode.UNAVAILABLE] RESOURCE_EXHAUSTED:") or \
            "RESOURCE_EXHAUSTED:" in str(error), str(error)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    # The cancelled streams leave the engine within a step or two: two short requests are then
    # admitted and answered, long before three 4000-token streams could have finished (4000
    # decoding steps: minutes even on an idle machine).
    started = time.monotonic()
    while True:
        stream = Stream()
        client = triton_grpc.InferenceServerClient(triton.grpc_url)
        client.start_stream(callback=stream.callback)
        try:
            for index in range(2):
                client.async_stream_infer(generation_model, request_inputs(prompt, {"max_tokens": 5}),
                                          request_id=f"after-{index}", enable_empty_final_response=True)
            responses = stream.collect(2, timeout=60)
        finally:
            client.stop_stream()
            client.close()
        if "errors" not in responses or time.monotonic() - started > 120:
            break
        time.sleep(0.5)
    assert "errors" not in responses, responses.get("errors")
    assert time.monotonic() - started < 120
    for index in range(2):
        assert output_text(responses[f"after-{index}"][-1], "finish_reason") in ("stop", "length")
