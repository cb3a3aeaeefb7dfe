"""Text serving benchmark: MiniLM embeddings through the gateway vs the same model in-process.

`maas up` serves all-MiniLM-L6-v2 (imported with `client.import_hf`, one Triton instance, one
torch thread, fp32); the in-process side is `maas_text.SentenceEncoder` with one thread on
the same texts. Both embed the same batch of BATCH sentences (cut from Python's own
documentation, `pydoc_data.topics`), sequentially, in ROUNDS interleaved rounds of
WINDOW_SECONDS; the medians are printed side by side as sentences per second.

Goal: served throughput ≥ 0.9× in-process.

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_text_serving`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROUNDS = 3
WINDOW_SECONDS = 3.0
BATCH = 32
DEPLOYMENT = "bench-text"


def sentences(count: int, words: int = 16) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics.values()).split())
    tokens = text.split(" ")
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(count)]


def throughput(call: Callable[[], object], window: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < window:
        call()
        done += BATCH
    return done / (time.perf_counter() - start)


def main() -> None:
    import maas
    from maas_text import SentenceEncoder, minilm_directory

    from tests.support.cli_suite import RunningSuite

    texts = sentences(BATCH)
    local = SentenceEncoder.load(minilm_directory(), threads=1)
    with tempfile.TemporaryDirectory(prefix="bench-text-") as work:
        suite = RunningSuite(Path(work) / "suite").start()
        try:
            with maas.Client(state_dir=suite.state_dir) as client:
                version = client.import_hf(minilm_directory(), model="bench-minilm")
                client.deploy(DEPLOYMENT, version.name, max_batch_size=BATCH, instance_count=1)
                served = client.embed(DEPLOYMENT, texts)
                cosine = float(np.sum(served * local.embed(texts), axis=1).min())
                rates: dict[str, list[float]] = {"in-process": [], "gateway": []}
                for _ in range(ROUNDS):
                    rates["in-process"].append(throughput(lambda: local.embed(texts), WINDOW_SECONDS))
                    rates["gateway"].append(
                        throughput(lambda: client.embed(DEPLOYMENT, texts), WINDOW_SECONDS))
        finally:
            suite.stop()
    in_process = statistics.median(rates["in-process"])
    gateway = statistics.median(rates["gateway"])
    print(f"MiniLM-L6 fp32, batch {BATCH}, 1 thread, sequential calls "
          f"(min cosine served vs in-process {cosine:.6f})")
    print(f"{'path':<14}{'sentences/s':>14}{'ratio':>9}")
    print(f"{'in-process':<14}{in_process:>14.1f}{1.0:>9.2f}")
    print(f"{'gateway':<14}{gateway:>14.1f}{gateway / in_process:>9.2f}   (goal >= 0.90)")


if __name__ == "__main__":
    main()
