"""Generation through the gateway: Generate streams vs transformers' generate in-process.

Same model (SmolLM2-135M-Instruct, bf16, the cached conversion), same machine, one run. The
registry and the inference service (with its bundled Triton running the decoupled generation
model) are subprocesses; the reference `model.generate` runs in this process with two torch
threads, taking turns with the gateway runs (never at the same time). Interleaved rounds of:

* one stream: Generate through the gateway (greedy, MAX_TOKENS new tokens at most) vs
  `model.generate` on the same rendered prompt (greedy, exactly MAX_TOKENS tokens);
  tokens/s counted from the request to the last token, time to first token included;
* eight concurrent Generate streams (different questions): aggregate tokens/s as a ratio to
  the one-stream figure, and the p50 time to first token;
* tenant isolation: a second tenant keeps FLOOD_STREAMS streams running (its
  concurrent_streams limit; refused ones retried at once) while the measured tenant runs
  single streams one after another: its p50 time to first token vs the unloaded p50, and
  the same taking turns with streams sent to Triton's own port (the engine without the
  gateway), with the engine's account of those (its time to first token, the wait before the
  prefill, the prefill, the streams prefilled together) to tell where the time goes.

Goals (issue 13): one stream ≥ 0.9× generate; eight streams ≥ 3× one stream; p50 TTFT under
the flood within 1.5× of unloaded. Medians printed; nothing gates on a time.

Run: `.venv/bin/python -m tests.bench.bench_generation` (MAAS_BENCH_ROUNDS, MAAS_BENCH_MAX_TOKENS
and MAAS_BENCH_TTFT_SAMPLES override 3, 48 and 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_inference.generation import (
    SamplingParameters,
    read_model_step,
    triton_generate_request,
)
from maas_inference.triton.client import TritonClient
from maas_llm.prompts import PromptRenderer
from maas_runtime.auth import Role, add_token
from maas_runtime.client import open_channel

from tests.registry.helpers import model_upload_requests
from tests.support.llm import smollm2_causal_lm, smollm2_causal_lm_zip
from tests.support.processes import ServiceProcess, free_port, inference_process

ROUNDS = int(os.environ.get("MAAS_BENCH_ROUNDS", "3"))
MAX_TOKENS = int(os.environ.get("MAAS_BENCH_MAX_TOKENS", "48"))
"""Both overridable: on a machine other work loads, one round of fewer tokens still gives the
ratios (noisier)."""
FLOOD_STREAMS = 4
TTFT_SAMPLES = int(os.environ.get("MAAS_BENCH_TTFT_SAMPLES", "6"))
TTFT_TOKENS = 4
"""The time-to-first-token samples stop early: only their first token is measured."""
QUESTIONS = [
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Name three colors and one fruit.",
    "Explain what a compiler does.",
    "Give me a short tip for sleeping well.",
    "Why is the sky blue?",
    "Describe a cat in a few words.",
    "What is 12 times 12?",
]
LIMITS = f"tenants:\n  flooder: {{concurrent_streams: {FLOOD_STREAMS}}}\n"


def request(question: str, max_tokens: int = MAX_TOKENS) -> inf.GenerateRequest:
    return inf.GenerateRequest(
        deployment="deployments/chat", max_tokens=max_tokens, temperature=0,
        conversation=inf.Conversation(messages=[inf.ChatMessage(role="user", content=question)]))


async def one_stream(stub: inference_service_pb2_grpc.InferenceServiceStub,
                     question: str, max_tokens: int = MAX_TOKENS) -> tuple[int, float, float]:
    """(completion tokens, seconds from the request to the last token, time to first token
    as the caller saw it)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async for response in stub.Generate(request(question, max_tokens)):
        if response.WhichOneof("event") == "delta" and response.delta.token_count:
            first = first or time.perf_counter() - started
            tokens += response.delta.token_count
    return tokens, time.perf_counter() - started, first or 0.0


async def flood(stub: inference_service_pb2_grpc.InferenceServiceStub,
                stop: asyncio.Event) -> int:
    """Keep one of the flooder's streams running until `stop`; the streams it completed."""
    done = 0
    while not stop.is_set():
        try:
            await one_stream(stub, QUESTIONS[done % len(QUESTIONS)])
            done += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.05)
    return done


async def main() -> None:
    torch.set_num_threads(2)
    directory = smollm2_causal_lm()
    archive = smollm2_causal_lm_zip()
    renderer = PromptRenderer.from_directory(directory)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory.path, dtype=torch.bfloat16).eval()
    prompt_ids = torch.tensor([renderer.encode(renderer.render(
        [{"role": "user", "content": QUESTIONS[0]}]))])

    def generate_one() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 do_sample=False, max_new_tokens=MAX_TOKENS,
                                 min_new_tokens=MAX_TOKENS)
        return (out.shape[1] - prompt_ids.shape[1]) / (time.perf_counter() - started)

    bench_dir = Path(os.environ.get("MAAS_BENCH_DIR", ".maas/bench"))
    bench_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bench_dir) as tmp:
        root = Path(tmp)
        (root / "limits.yaml").write_text(LIMITS)
        registry = ServiceProcess("registry", root / "registry")
        await registry.start()
        triton_port = free_port()
        inference = inference_process(
            root, registry, tenancy_file=str(root / "limits.yaml"),
            triton_grpc_port=str(triton_port),
            generation_max_running_streams="8", generation_max_waiting_streams="32",
            generation_torch_threads="2")
        try:
            await inference.start(timeout=120)
            async with registry.stub() as channel:
                stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
                await stub.CreateModel(rs.CreateModelRequest(model_id="smollm"))
                signature = model_pb2.Signature()
                signature.inputs.add(name="text_input", datatype=tensor_pb2.DATA_TYPE_BYTES,
                                     shape=[1])
                signature.outputs.add(name="text_output", datatype=tensor_pb2.DATA_TYPE_BYTES,
                                      shape=[1])
                await stub.UploadModelVersion(model_upload_requests(
                    "models/smollm", archive.read_bytes(), chunk=1 << 20,
                    fmt=model_pb2.MODEL_FORMAT_CAUSAL_LM, signature=signature))
            tokens_file = root / "inference" / "tokens.json"
            measured_token = add_token(tokens_file, "measured", Role.VIEWER)
            flooder_token = add_token(tokens_file, "flooder", Role.VIEWER)
            async with inference.stub() as admin:
                await inference_service_pb2_grpc.InferenceServiceStub(admin).CreateDeployment(
                    inf.CreateDeploymentRequest(deployment_id="chat", deployment=(
                        deployment_pb2.Deployment(model="models/smollm/versions/1"))),
                    timeout=600)
            await asyncio.sleep(1.2)  # the new tokens reach the data plane
            figures = await measure(inference.target, measured_token, flooder_token,
                                    generate_one, f"127.0.0.1:{triton_port}")
        finally:
            inference.terminate()
            registry.terminate()
    print_table(figures)


async def direct_stream(triton: TritonClient, prompt: str, max_tokens: int = MAX_TOKENS
                        ) -> tuple[int, float, float, dict]:
    """(completion tokens, seconds, time to first token, the engine's final usage) of one
    generation sent to Triton's own port: the same model without the gateway, to tell the
    gateway's cost from the engine's."""
    started = time.perf_counter()
    first = None
    stream = triton.open_stream()
    try:
        await stream.send(triton_generate_request(
            "chat.smollm.v1", prompt, SamplingParameters(max_tokens=max_tokens, temperature=0),
            "direct"))
        while True:
            step = read_model_step(await stream.receive(), "chat")
            if step.text:
                first = first or time.perf_counter() - started
            if step.final:
                return (int(step.usage.get("completion_tokens", 0)),
                        time.perf_counter() - started, first or 0.0, step.usage)
    finally:
        await stream.close()


async def measure(target: str, measured_token: str, flooder_token: str,
                  generate_one, triton_target: str) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    async with open_channel(target, token=measured_token) as measured_channel, \
            open_channel(target, token=flooder_token) as flooder_channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(measured_channel)
        flooder = inference_service_pb2_grpc.InferenceServiceStub(flooder_channel)
        await one_stream(stub, QUESTIONS[0])  # warm-up: the engine's first forward passes
        generate_one()
        triton = TritonClient(triton_target)
        renderer = PromptRenderer.from_directory(smollm2_causal_lm())
        prompts = [renderer.render([{"role": "user", "content": q}]) for q in QUESTIONS]

        async def ttft_samples(phase: str) -> None:
            """TTFT through the gateway and straight to Triton, taking turns; the engine's own
            account of the direct ones (its TTFT, the wait for a prefill, the prefill)."""
            gateway, direct = [], []
            for index in range(TTFT_SAMPLES):
                gateway.append((await one_stream(stub, QUESTIONS[index], TTFT_TOKENS))[2])
                _, _, first, usage = await direct_stream(triton, prompts[index], TTFT_TOKENS)
                direct.append(first)
                for key in ("time_to_first_token_s", "queue_time_s", "prefill_time_s",
                            "prefill_streams"):
                    add(f"{phase} engine {key}", float(usage.get(key) or 0.0))
            add(f"{phase} p50 TTFT s", statistics.median(gateway))
            add(f"{phase} Triton direct p50 TTFT s", statistics.median(direct))
        for round_number in range(ROUNDS):
            print(f"round {round_number + 1}/{ROUNDS}", flush=True)
            tokens, seconds, ttft = await one_stream(stub, QUESTIONS[0])
            add("gateway one stream tokens/s", tokens / seconds)
            add("gateway one stream TTFT s", ttft)
            add("generate one stream tokens/s", await asyncio.to_thread(generate_one))
            tokens, seconds, _, _ = await direct_stream(triton, prompts[0])
            add("Triton direct one stream tokens/s", tokens / seconds)

            started = time.perf_counter()
            results = await asyncio.gather(*(one_stream(stub, q) for q in QUESTIONS))
            add("gateway 8 streams tokens/s", sum(r[0] for r in results) /
                (time.perf_counter() - started))
            add("gateway 8 streams p50 TTFT s", statistics.median(r[2] for r in results))

            await ttft_samples("unloaded")
            stop = asyncio.Event()
            flooders = [asyncio.create_task(flood(flooder, stop))
                        for _ in range(FLOOD_STREAMS + 2)]  # two more than its limit
            await asyncio.sleep(1.0)
            await ttft_samples("flooded")
            stop.set()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.gather(*flooders)
        await triton.close()
    return figures


def print_table(figures: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in figures.items()}
    print(f"\nGeneration through the gateway, SmolLM2-135M bf16, {MAX_TOKENS} tokens, greedy "
          f"(medians of {ROUNDS} rounds)")
    for name, value in median.items():
        print(f"  {name:32s} {value:9.3f}   {' '.join(f'{v:.3f}' for v in figures[name])}")
    one = median["gateway one stream tokens/s"]
    print("\nRatios (goal)")
    print(f"  one stream, gateway / generate       {one / median['generate one stream tokens/s']:.2f}x"
          "   (>= 0.9x)")
    print(f"  one stream, Triton direct / generate "
          f"{median['Triton direct one stream tokens/s'] / median['generate one stream tokens/s']:.2f}x"
          "   (the engine in Triton without the gateway)")
    print(f"  8 streams aggregate / one stream     {median['gateway 8 streams tokens/s'] / one:.2f}x"
          "   (>= 3x)")
    print(f"  flooded p50 TTFT / unloaded          "
          f"{median['flooded p50 TTFT s'] / median['unloaded p50 TTFT s']:.2f}x   (<= 1.5x)")
    print(f"  same, Triton direct                  "
          f"{median['flooded Triton direct p50 TTFT s'] / median['unloaded Triton direct p50 TTFT s']:.2f}x"
          "   (the engine in Triton without the gateway)")


if __name__ == "__main__":
    asyncio.run(main())
