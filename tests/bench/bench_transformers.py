"""Encoder compression benchmark: all-MiniLM-L6-v2 int8 and a 3-layer student, beside the anchor.

Prints one table. The source is the bundled MiniLM (torch fp32, safetensors); every row is
measured in this run with `maas_compressor.hf_models` on the fixed held-out sentence set
(64 sentences of `pydoc_data.topics`): weight-file size ratio, CPU p50 latency of embedding a
batch of 32 on ONE thread (tokenizing included) against the torch fp32 source and against the
ONNX fp32 conversion, mean cosine to the source's embeddings and Spearman of pairwise
similarities.
- anchor: PyTorch's BERT dynamic-int8 tutorial, 2.4× smaller and 1.8× faster on one thread;
- int8 MiniLM, the compressor's accuracy-aware search (per-channel, MatMul + embedding Gathers,
  minimum mean cosine 0.99): goals ≥ 2.3× smaller, ≥ 1.8× faster, cosine ≥ 0.99;
- the naive recipe for contrast: per-tensor int8 on every MatMul, embedding table left fp32;
- the 3-layer student (teacher layers 1, 3, 5) distilled with the step's recipe (embedding
  MSE + cosine + in-batch pairwise-similarity loss, sentences and their clauses at ≤ 64
  tokens, warm-up + cosine learning rate) within a time bound that keeps the whole bench
  under 6 minutes: goals ≥ 1.8× faster, Spearman ≥ 0.9.
Timings are reported, never gated on. Run: `make bench` (or
`.venv/bin/python -m tests.bench.bench_transformers`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from maas_compressor.hf_models import (
    embed,
    encoder_latencies,
    load_hf,
    mean_cosine,
    probe_sentences,
    similarity_spearman,
    weights_path,
)
from maas_compressor.steps.base import DataSplits, HfForm
from maas_compressor.steps.convert import convert
from maas_compressor.steps.distill import distill
from maas_compressor.steps.quantize import quantize
from maas_text import minilm_directory, zip_directory

from tests.compressor.torch_helpers import RecordingContext

LATENCY_REPEATS = 5
DISTILL_SECONDS = 180.0
DISTILL_EPOCHS = 30


def _context(workdir: Path) -> RecordingContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return RecordingContext(data=DataSplits(*(np.zeros((0, 1), np.float32) for _ in range(4))),
                            workdir=workdir)


def _b32_ms(form: HfForm, sentences: list[str]) -> float:
    latencies = encoder_latencies(form, sentences, LATENCY_REPEATS, batch_sizes=(32,), thread_counts=(1,))
    return latencies["b32_t1"]


def main() -> None:
    sentences = probe_sentences()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        source = load_hf(zip_directory(minilm_directory(), root / "minilm.zip"), root / "source")
        assert isinstance(source.form, HfForm)
        reference = embed(source.form, sentences)
        torch_ms = _b32_ms(source.form, sentences)
        source_bytes = weights_path(source.form).stat().st_size
        fp32 = convert(source, {}, _context(root / "convert")).model
        assert isinstance(fp32.form, HfForm)
        onnx_ms = _b32_ms(fp32.form, sentences)

        rows: list[tuple[str, str, str, str, str, str, str]] = [
            ("anchor: PyTorch BERT dynamic int8 tutorial", "2.40×", "1.80×", "", "F1 kept", "", "")]

        def row(name: str, form: HfForm, goal: str, extra: str = "") -> None:
            vectors = embed(form, sentences)
            ms = _b32_ms(form, sentences)
            rows.append((name, f"{source_bytes / weights_path(form).stat().st_size:.2f}×",
                         f"{torch_ms / ms:.2f}×", f"{onnx_ms / ms:.2f}×",
                         f"cos {mean_cosine(reference, vectors):.4f}",
                         f"spearman {similarity_spearman(reference, vectors):.4f}", goal + extra))

        row("MiniLM fp32 ONNX (convert)", fp32.form, "")
        searched = quantize(fp32, {"dtype": "int8", "min_mean_cosine": 0.99}, _context(root / "q"))
        assert isinstance(searched.model.form, HfForm)
        kept = searched.details["layers_kept_in_float"]
        row("MiniLM int8 search (per-channel, +Gather)", searched.model.form,
            "≥2.3×, ≥1.8×, cos ≥0.99", f"; float: {', '.join(kept) or 'none'}")
        naive = quantize(fp32, {"dtype": "int8", "per_channel": False, "op_types": ["MatMul"],
                                "accuracy_aware": False, "min_mean_cosine": 0.5},
                         _context(root / "naive"))
        assert isinstance(naive.model.form, HfForm)
        row("MiniLM int8 naive (per-tensor MatMul)", naive.model.form, "contrast")
        torch.set_num_threads(os.cpu_count() or 1)
        student = distill(source, {"layers": [1, 3, 5], "epochs": DISTILL_EPOCHS,
                                   "max_seconds": DISTILL_SECONDS}, _context(root / "distill"))
        assert isinstance(student.model.form, HfForm)
        row("3-layer student (layers 1,3,5), torch fp32", student.model.form, "≥1.8×, spearman ≥0.9",
            f"; {student.details['epochs']} epoch(s), {student.details['steps']} steps in "
            f"{student.details['seconds']:.0f}s, untrained spearman "
            f"{student.details['spearman_untrained']:.4f}")

    header = ("row", "smaller", "faster b32 1t vs torch", "vs ORT fp32", "cosine", "spearman", "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"torch fp32 b32 1 thread p50 {torch_ms:.1f} ms; ORT fp32 {onnx_ms:.1f} ms")
    for line in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
