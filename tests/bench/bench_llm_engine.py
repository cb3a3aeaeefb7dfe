"""Generation engine benchmark: maas_llm's continuous batching vs transformers' generate.

Same model (SmolLM2-135M-Instruct, bf16, from the cached conversion), same machine, one
process, two torch threads. Interleaved rounds of:

* one stream: the engine (`GenerationEngine.submit`, greedy, MAX_TOKENS new tokens) vs
  `model.generate` in-process on the same prompt (greedy, `min_new_tokens` = max so both
  produce exactly MAX_TOKENS tokens);
* eight concurrent streams through the engine (different prompts, all submitted at once):
  aggregate tokens/s, as a ratio to the one-stream figure, and the p50 time to first token.

Goals (issue 13): one stream ≥ 0.9× generate; eight streams ≥ 3× one stream. Medians printed;
nothing gates on a time.

Run: `.venv/bin/python -m tests.bench.bench_llm_engine`.
"""

from __future__ import annotations

import statistics
import time

import torch
from maas_llm.engine import EngineSettings, GenerationEngine
from maas_llm.sampling import SamplingParams

from tests.support.llm import smollm2_causal_lm

ROUNDS = 5
MAX_TOKENS = 48
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


def main() -> None:
    torch.set_num_threads(2)
    engine = GenerationEngine.from_directory(
        smollm2_causal_lm(), EngineSettings(max_running=8, torch_threads=2)
    ).start()
    # The stop strings can never occur: every stream generates exactly MAX_TOKENS tokens.
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    prompts = [engine.renderer.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    eos = list(engine.eos_token_ids)

    def engine_one() -> float:
        started = time.perf_counter()
        stream = engine.submit(engine.renderer.encode(prompts[0]), params)
        _, final = stream.text()
        return final.usage.completion_tokens / (time.perf_counter() - started)

    def generate_one() -> float:
        ids = torch.tensor([engine.renderer.encode(prompts[0])])
        started = time.perf_counter()
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                        eos_token_id=eos, pad_token_id=eos[0])
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)

    def engine_eight() -> tuple[float, float]:
        started = time.perf_counter()
        streams = [engine.submit(prompt, params) for prompt in prompts]
        finals = [stream.text()[1] for stream in streams]
        elapsed = time.perf_counter() - started
        tokens = sum(final.usage.completion_tokens for final in finals)
        ttft = statistics.median(final.usage.time_to_first_token_s or 0.0 for final in finals)
        return tokens / elapsed, ttft

    engine_one(), generate_one()  # warm-up
    rows: dict[str, list[float]] = {"generate": [], "engine 1": [], "engine 8": [], "ttft8": [],
                                    "ttft1": []}
    for _ in range(ROUNDS):
        rows["generate"].append(generate_one())
        started = time.perf_counter()
        stream = engine.submit(prompts[0], params)
        _, final = stream.text()
        rows["engine 1"].append(final.usage.completion_tokens / (time.perf_counter() - started))
        rows["ttft1"].append(final.usage.time_to_first_token_s or 0.0)
        aggregate, ttft = engine_eight()
        rows["engine 8"].append(aggregate)
        rows["ttft8"].append(ttft)
    engine.stop()
    median = {key: statistics.median(values) for key, values in rows.items()}
    print(f"SmolLM2-135M bf16, {MAX_TOKENS} new tokens per stream, median of {ROUNDS} rounds")
    print(f"{'side':<34}{'tokens/s':>10}{'ratio':>9}{'p50 TTFT s':>12}")
    print(f"{'transformers generate, 1 stream':<34}{median['generate']:>10.1f}{1.0:>9.2f}{'':>12}")
    print(f"{'engine, 1 stream':<34}{median['engine 1']:>10.1f}"
          f"{median['engine 1'] / median['generate']:>9.2f}{median['ttft1']:>12.3f}")
    print(f"{'engine, 8 concurrent (aggregate)':<34}{median['engine 8']:>10.1f}"
          f"{median['engine 8'] / median['engine 1']:>9.2f}{median['ttft8']:>12.3f}")
    print("ratios: engine 1 vs generate (goal >= 0.9); engine 8 vs engine 1 (goal >= 3)")


if __name__ == "__main__":
    main()
