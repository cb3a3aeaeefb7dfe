"""Hugging Face sentence encoders in a compression job: load, embed, write back, measure.

An HF_TRANSFORMER version is a zip of a model directory (config, tokenizer, pooling config,
weights); `load_hf` unzips it into the job's work directory as an `HfForm`, and `hf_artifact`
zips a form back (the tokenizer and configs travel with every result). Embeddings come from
`maas_text.SentenceEncoder`, the same code that serves the model, so what is measured here is
what a client gets: mean-pooled, L2-normalized FP32 vectors from torch (safetensors) or
onnxruntime (model.onnx).

The quality of a compressed encoder is judged against the source's embeddings on a fixed
sentence set: the mean cosine of each sentence's pair of embeddings, and the Spearman rank
correlation of all pairwise similarities (what a retrieval or clustering user sees). The
sentences come from the standard library's documentation text (`pydoc_data.topics`), split
deterministically into a training part (distillation) and a held-out part (measurements);
distillation may add the prose of the standard library's docstrings (never held out).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from maas_formats.manifest import ModelSignature, TensorSignature
from maas_runtime.errors import FailedPrecondition
from maas_text import HfDirectory, unzip_directory, zip_directory
from maas_text.encoder import SentenceEncoder
from maas_text.int8 import QUANTIZATION_FILE

from maas_compressor.steps.base import HfForm, ModelUnderCompression

RUNTIME_TORCH = "torch"
RUNTIME_ONNXRUNTIME = "onnxruntime"
ONNX_WEIGHTS = "model.onnx"
SAFETENSORS_WEIGHTS = "model.safetensors"
# The weights and what describes them: a copy "without weights" never carries an int8
# manifest that no longer matches.
WEIGHT_FILES = frozenset({ONNX_WEIGHTS, SAFETENSORS_WEIGHTS, QUANTIZATION_FILE})
HF_ARCHIVE_NAME = "model.hf.zip"
HELD_OUT_EVERY = 8
"""Every 8th corpus sentence is held out for measurements; the rest may be trained on."""
DEFAULT_PROBE_SENTENCES = 64
DEFAULT_VALIDATION_SENTENCES = 128
DEFAULT_LATENCY_REPEATS = 10
DEFAULT_INTERLEAVED_ROUNDS = 15
_MIN_SENTENCE_CHARACTERS = 20
_MAX_SENTENCE_CHARACTERS = 400
_WARM_UP_RUNS = 2
_SKIPPED_STDLIB_FOLDERS = frozenset({"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3",
                                     "site-packages", "dist-packages", "pydoc_data", "ensurepip"})
_PROSE = re.compile(r"[a-z]{3,} [a-z]{3,} [a-z]{2,}")
"""Three lower-case words in a row: a docstring sentence that is prose, not a signature."""


def _sentences(text: str) -> list[str]:
    """`text`'s sentences of a sensible length, whitespace collapsed."""
    sentences = (s.strip() for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z])", re.sub(r"\s+", " ", text)))
    return [s for s in sentences if _MIN_SENTENCE_CHARACTERS <= len(s) <= _MAX_SENTENCE_CHARACTERS]


def corpus_sentences() -> list[str]:
    """The standard library's documentation topics as sentences, in a fixed order."""
    from pydoc_data.topics import topics

    sentences = [sentence for key in sorted(topics) for sentence in _sentences(topics[key])]
    return list(dict.fromkeys(sentences))  # topics repeat some boilerplate


def docstring_sentences() -> list[str]:
    """Prose sentences of the docstrings (modules, classes, functions) in the standard
    library's source files, in a fixed order, deduplicated and none a `corpus_sentences`
    sentence (so none is held out): more English text to distill on. The files are parsed
    with `ast`, never imported or run; tests, GUI and vendored packages are skipped, and so
    are doctest lines and fragments without three words in a row."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if not set(path.relative_to(root).parts[:-1]) & _SKIPPED_STDLIB_FOLDERS
                   and not path.name.startswith("test_"))
    corpus = set(corpus_sentences())
    sentences: list[str] = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # lib2to3-style fixtures and non-UTF-8 files hold no prose we need
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                sentences.extend(s for s in _sentences(ast.get_docstring(node) or "")
                                 if ">>>" not in s and _PROSE.search(s) and s not in corpus)
    return list(dict.fromkeys(sentences))


def training_sentences() -> list[str]:
    """The corpus less the held-out sentences."""
    return [s for index, s in enumerate(corpus_sentences()) if index % HELD_OUT_EVERY]


def _held_out_sentences() -> list[str]:
    return [s for index, s in enumerate(corpus_sentences()) if index % HELD_OUT_EVERY == 0]


def probe_sentences(count: int = DEFAULT_PROBE_SENTENCES) -> list[str]:
    """The first `count` held-out sentences: the fixed set every measurement uses."""
    return _held_out_sentences()[:count]


def validation_sentences(count: int = DEFAULT_VALIDATION_SENTENCES) -> list[str]:
    """`count` held-out sentences after the fixed measurement set: what a training step may
    watch and choose by (never trained on) without tuning to the reported measurements."""
    return _held_out_sentences()[DEFAULT_PROBE_SENTENCES:DEFAULT_PROBE_SENTENCES + count]


def text_signature(dimension: int) -> ModelSignature:
    """Text in, one L2-normalized embedding out (what the served encoder promises)."""
    return ModelSignature(
        inputs=(TensorSignature("text", "BYTES", (1,)),),
        outputs=(TensorSignature("embedding", "FP32", (dimension,)),),
    )


def hf_model(directory: Path) -> ModelUnderCompression:
    """An unzipped encoder directory as the model under compression."""
    checked = HfDirectory.open(directory)
    runtime = RUNTIME_TORCH if checked.weights_format == "safetensors" else RUNTIME_ONNXRUNTIME
    return ModelUnderCompression(form=HfForm(directory=checked.path, runtime=runtime),
                                 signature=text_signature(checked.dimension))


def load_hf(archive: Path, workdir: Path) -> ModelUnderCompression:
    """A staged HF_TRANSFORMER zip, unzipped (validated: no pickle, no escaping paths)."""
    return hf_model(unzip_directory(archive, workdir))


def copy_without_weights(source: Path, target: Path) -> None:
    """`source`'s config, tokenizer and pooling files into `target` (created), no weights:
    a step writes its own weights next to them."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and relative.as_posix() not in WEIGHT_FILES:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)


def hf_artifact(form: HfForm, directory: Path) -> Path:
    """The form zipped as an HF_TRANSFORMER artifact under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    return zip_directory(form.directory, directory / HF_ARCHIVE_NAME)


def weights_path(form: HfForm) -> Path:
    return form.directory / (ONNX_WEIGHTS if form.runtime == RUNTIME_ONNXRUNTIME else SAFETENSORS_WEIGHTS)


def load_encoder(form: HfForm, threads: int = 1) -> SentenceEncoder:
    """The serving encoder of the form, on the form's runtime."""
    return SentenceEncoder.load(form.directory, threads=threads,
                                prefer_onnx=form.runtime == RUNTIME_ONNXRUNTIME)


def embed(form: HfForm, sentences: Sequence[str], threads: int = 1, batch_size: int = 32) -> np.ndarray:
    """Embeddings [n, dimension] of `sentences`, in batches (padding stays per batch)."""
    encoder = load_encoder(form, threads)
    parts = [encoder.embed(list(sentences[i:i + batch_size]))
             for i in range(0, len(sentences), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dimension), np.float32)


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over sentences of the cosine between the two embeddings of each."""
    if reference.shape != candidate.shape:
        raise FailedPrecondition(
            f"embeddings of shape {list(candidate.shape)} cannot be compared with {list(reference.shape)}",
            reason="EMBEDDING_SHAPE_MISMATCH")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return float(np.mean(np.sum(reference * candidate, axis=1) / np.clip(norms, 1e-12, None)))


def similarity_spearman(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Spearman correlation of all pairwise cosine similarities (upper triangle) of the two
    embeddings of one sentence set: 1.0 when the candidate ranks every pair as the reference."""
    from scipy.stats import spearmanr

    def pairwise(embeddings: np.ndarray) -> np.ndarray:
        unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
        rows, columns = np.triu_indices(len(unit), k=1)
        return (unit @ unit.T)[rows, columns]

    correlation = spearmanr(pairwise(reference), pairwise(candidate)).statistic
    return float(correlation)


@dataclass(frozen=True)
class EncoderMeasurement:
    """One encoder measured on this machine's CPU against a reference's embeddings."""

    runtime: str
    weights_bytes: int
    """The weight file's size (model.safetensors or model.onnx): what the saving is about."""
    artifact_bytes: int
    """The HF_TRANSFORMER zip's size (weights, tokenizer and configs)."""
    latency_ms: dict[str, float]
    """p50 of embedding a batch (tokenizing included), keyed `b1_t1`, `b32_t1`, `b1_tall`,
    `b32_tall` (batch size, one thread or all of this machine's)."""
    mean_cosine: float
    similarity_spearman: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _p50_ms(encoder: SentenceEncoder, batch: list[str], repeats: int) -> float:
    for _ in range(_WARM_UP_RUNS):
        encoder.embed(batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.embed(batch)
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)


def encoder_latencies(form: HfForm, sentences: Sequence[str], repeats: int = DEFAULT_LATENCY_REPEATS,
                      batch_sizes: Sequence[int] = (1, 32),
                      thread_counts: Sequence[int] | None = None) -> dict[str, float]:
    """p50 latency per batch size and thread count (1 and all cores by default)."""
    import torch

    all_threads = os.cpu_count() or 1
    counts = thread_counts if thread_counts is not None else (1, all_threads)
    previous = torch.get_num_threads()
    latencies: dict[str, float] = {}
    try:
        for threads in counts:
            encoder = load_encoder(form, threads)
            for size in batch_sizes:
                batch = [sentences[i % len(sentences)] for i in range(size)]
                torch.set_num_threads(threads)  # process-wide: the last encoder loaded set it
                key = f"b{size}_t{'all' if threads == all_threads and threads != 1 else threads}"
                latencies[key] = _p50_ms(encoder, batch, repeats)
    finally:
        torch.set_num_threads(previous)
    return latencies


def interleaved_latencies(forms: Mapping[str, HfForm], sentences: Sequence[str],
                          rounds: int = DEFAULT_INTERLEAVED_ROUNDS,
                          batch_size: int = 32) -> dict[str, list[float]]:
    """Milliseconds of embedding one batch of `batch_size` (tokenizing included) on ONE thread,
    per form and round. Every encoder is loaded first; each round then times every form once,
    the order rotating by one form per round, so a burst of load from other processes on a
    shared machine falls on all forms alike. Compare forms with `paired_speedup`."""
    import torch

    batch = [sentences[i % len(sentences)] for i in range(batch_size)]
    previous = torch.get_num_threads()
    encoders = {name: load_encoder(form, threads=1) for name, form in forms.items()}
    torch.set_num_threads(1)  # process-wide in torch; onnxruntime sessions have 1 intra-op thread
    names = list(encoders)
    timings: dict[str, list[float]] = {name: [] for name in names}
    try:
        for encoder in encoders.values():
            for _ in range(_WARM_UP_RUNS):
                encoder.embed(batch)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                encoders[name].embed(batch)
                timings[name].append((time.perf_counter() - started) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return timings


def paired_speedup(reference_ms: Sequence[float], candidate_ms: Sequence[float]) -> float:
    """Median over rounds of reference time / candidate time (both timed in the same round by
    `interleaved_latencies`): robust to load that changes between rounds."""
    if len(reference_ms) != len(candidate_ms) or not reference_ms:
        raise FailedPrecondition("speed-ups compare timings of the same rounds",
                                 reason="TIMING_ROUNDS_MISMATCH")
    return statistics.median(r / c for r, c in zip(reference_ms, candidate_ms, strict=True))


def measure_encoder(form: HfForm, reference: np.ndarray, sentences: Sequence[str], workdir: Path,
                    repeats: int = DEFAULT_LATENCY_REPEATS,
                    thread_counts: Sequence[int] | None = None) -> EncoderMeasurement:
    """Size, latencies and agreement with `reference` (embeddings of `sentences`)."""
    embeddings = embed(form, sentences)
    return EncoderMeasurement(
        runtime=form.runtime,
        weights_bytes=weights_path(form).stat().st_size,
        artifact_bytes=hf_artifact(form, workdir).stat().st_size,
        latency_ms=encoder_latencies(form, sentences, repeats, thread_counts=thread_counts),
        mean_cosine=mean_cosine(reference, embeddings),
        similarity_spearman=similarity_spearman(reference, embeddings),
    )
