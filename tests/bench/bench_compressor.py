"""Compressor benchmark: what each compression saves and costs, beside its fp32 source.

Prints one table. Every row compresses a source trained in this run on scikit-learn's digits
and measures source and result with the same `maas_compressor.measure.measure` (accuracy on
the held-out split, parameters, non-zero parameters, artifact bytes, CPU p50 latency on ONE
thread at batch 1 and 32), so the ratios compare like with like on this machine:
- digits CNN, 90% global unstructured pruning + fine-tune: accuracy drop (goal ≤ 1 pt;
  Han et al. 2015: 9-13× fewer weights with no loss);
- digits CNN, structured pruning of 50% of the channels: speed-up at batch 32 (goal ≥ 2×)
  and drop (≤ 2 pt);
- distillation of the CNN into a student with ≤ 25% of its parameters (goal ≥ 97% of the
  teacher's accuracy; DistilBERT: 97%);
- greedy soup of 3 fine-tuned runs (goal ≥ the best single run − 0.2 pt; Wortsman et al. 2022).
The ONNX rows: the CNN quantized to int8 static QDQ (goal: artifact ≤ 0.3×, ≥ 2.5× faster at
batch 32, drop ≤ 0.5 pt); a 1024-wide MLP quantized to int8 dynamic against its torch fp32
source (≥ 3× faster, ≤ 0.3× the bytes); the CNN in accuracy-aware int8 with a 0.5 pt
tolerance (within it, naming the layers kept in float).
Then, served through the gateway: the registry and the inference service (supervising the
bundled tritonserver) start as subprocesses; the fp32 CNN is registered as a maas-package and
the int8 static ONNX graph of the row above (the same run's quantize step) as its child
version; both are deployed and batch-32 predictions go through `maas.Client.predict`, the two
deployments taking turns in SERVED_ROUNDS rounds; a second table prints each p50 and their
ratio. Timings are reported, never gated on. Run: `make bench` (or
`.venv/bin/python -m tests.bench.bench_compressor`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import maas
import numpy as np
import torch
from maas_compressor.measure import Measurement, accuracy, latency_ms, measure, predict
from maas_compressor.steps.base import DataSplits, ModelUnderCompression
from maas_compressor.steps.distill import distill
from maas_compressor.steps.fuse import fuse
from maas_compressor.steps.prune import prune
from maas_compressor.steps.quantize import quantize
from maas_compressor.torch_models import write_package

from tests.compressor.torch_helpers import (
    RecordingContext,
    copy_of,
    digits_splits,
    train_in_place,
    zoo_model,
)
from tests.support.bench import bench_workdir
from tests.support.processes import ServiceProcess

TORCH_THREADS = 1
LATENCY_REPEATS = 300
"""Timed passes per latency; the p50 of this many passes is steady on a shared machine."""
LATENCY_ROUNDS = 6
"""Source and result take turns this often; a latency is the median of its rounds' p50s."""
CNN = {"channels": [64, 128], "kernel_size": 3, "dropout": 0.1}
CNN_EPOCHS = 30
LEARNING_RATE = 2e-3
PRUNE_FINETUNE_EPOCHS = 20
STUDENT_CNN = {"channels": [32, 48], "kernel_size": 3, "dropout": 0.0}
SOUP_RUNS = 3
SOUP_FINETUNE_EPOCHS = 3


@dataclass
class Bench:
    """What the rows share: the data, a work directory, and the sources trained once."""

    data: DataSplits
    workdir: Path

    def context(self, name: str, seed: int = 0) -> RecordingContext:
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        return RecordingContext(data=self.data, workdir=workdir, seed=seed)

    @functools.cached_property
    def digits_cnn(self) -> ModelUnderCompression:
        return train_in_place(zoo_model("cnn", CNN), self.context("source-cnn"),
                              epochs=CNN_EPOCHS, learning_rate=LEARNING_RATE)

    @functools.cached_property
    def digits_cnn_int8_static(self) -> ModelUnderCompression:
        """The CNN's int8 static QDQ graph: measured in its row, then served beside its source."""
        return quantize(self.digits_cnn, {"dtype": "int8", "mode": "static"},
                        self.context("int8-static")).model

    def measured(self, model: ModelUnderCompression, name: str) -> Measurement:
        return measure(model, self.data, self.workdir / f"measure-{name}", repeats=LATENCY_REPEATS)

    def measured_pair(self, source: ModelUnderCompression, result: ModelUnderCompression,
                      name: str) -> tuple[Measurement, Measurement]:
        """Source and result measured alike, their latencies taken in alternating rounds so
        that a neighbour's load on the shared cores weighs on both the same."""
        measured = [self.measured(source, f"{name}-source"), self.measured(result, name)]
        repeats = LATENCY_REPEATS // LATENCY_ROUNDS
        rounds: list[list[tuple[float, float]]] = [[], []]
        for _ in range(LATENCY_ROUNDS):
            for taken, model in zip(rounds, (source, result), strict=True):
                taken.append((latency_ms(model, self.data.eval_x, 1, repeats),
                              latency_ms(model, self.data.eval_x, 32, repeats)))
        before, after = (
            dataclasses.replace(
                measurement,
                latency_ms_batch1=statistics.median(b1 for b1, _ in taken),
                latency_ms_batch32=statistics.median(b32 for _, b32 in taken),
            )
            for measurement, taken in zip(measured, rounds, strict=True)
        )
        return before, after


@dataclass(frozen=True)
class Row:
    """One compression beside its fp32 source, with its goal and whether this run met it."""

    name: str
    source: Measurement
    result: Measurement
    goal: str
    met: bool

    def cells(self) -> tuple[str, ...]:
        source, result = self.source, self.result
        return (
            self.name,
            f"{source.accuracy:.4f}",
            f"{result.accuracy:.4f}",
            f"{(source.accuracy - result.accuracy) * 100:+.2f}",
            f"{result.parameters / source.parameters:.3f}",
            f"{result.nonzero_parameters / source.nonzero_parameters:.3f}",
            f"{result.artifact_bytes / source.artifact_bytes:.3f}",
            f"{source.latency_ms_batch1 / result.latency_ms_batch1:.2f}",
            f"{source.latency_ms_batch32 / result.latency_ms_batch32:.2f}",
            f"{source.runtime}→{result.runtime}",
            self.goal,
            "yes" if self.met else "NO",
        )


HEADER = ("row", "acc fp32", "acc result", "drop pt", "params ×", "non-zero ×", "bytes ×",
          "speed-up b1", "speed-up b32", "runtime", "goal", "met")

RowFunction = Callable[[Bench], Row]


def drop_points(source: Measurement, result: Measurement) -> float:
    return (source.accuracy - result.accuracy) * 100


def cnn_unstructured_90(bench: Bench) -> Row:
    source = bench.digits_cnn
    pruned = prune(source, {"amount": 0.9, "structured": False, "scope": "global",
                            "finetune_epochs": PRUNE_FINETUNE_EPOCHS, "learning_rate": 1e-3},
                   bench.context("unstructured")).model
    before, after = bench.measured_pair(source, pruned, "unstructured")
    return Row("digits CNN, 90% global unstructured + fine-tune", before, after, "drop ≤ 1 pt",
               drop_points(before, after) <= 1.0)


def cnn_structured_50(bench: Bench) -> Row:
    source = bench.digits_cnn
    pruned = prune(source, {"amount": 0.5, "structured": True, "finetune_epochs": PRUNE_FINETUNE_EPOCHS,
                            "learning_rate": 1e-3}, bench.context("structured")).model
    before, after = bench.measured_pair(source, pruned, "structured")
    speed_up = before.latency_ms_batch32 / after.latency_ms_batch32
    return Row("digits CNN, structured 50% channels + fine-tune", before, after,
               "b32 ≥ 2× faster, drop ≤ 2 pt", speed_up >= 2.0 and drop_points(before, after) <= 2.0)


def cnn_distilled(bench: Bench) -> Row:
    teacher = bench.digits_cnn
    student = distill(teacher, {"student_architecture": {"kind": "cnn", "hyperparameters": STUDENT_CNN},
                                "temperature": 4.0, "alpha": 0.7, "epochs": CNN_EPOCHS,
                                "learning_rate": LEARNING_RATE, "batch_size": 64},
                      bench.context("distill")).model
    before, after = bench.measured_pair(teacher, student, "student")
    small_enough = after.parameters <= 0.25 * before.parameters
    return Row("distill CNN → CNN student ≤ 25% parameters", before, after,
               "≥ 97% of teacher acc", small_enough and after.accuracy >= 0.97 * before.accuracy)


def greedy_soup_of_fine_tuned_runs(bench: Bench) -> Row:
    runs = []
    for seed in range(1, SOUP_RUNS + 1):
        # Each run continues from the shared source with its own example order: the soup's
        # members need a common initialisation to be averaged meaningfully.
        runs.append(train_in_place(copy_of(bench.digits_cnn), bench.context(f"run{seed}", seed),
                                   epochs=SOUP_FINETUNE_EPOCHS, learning_rate=LEARNING_RATE / 2))
    run_accuracy = [accuracy(run, bench.data.eval_x, bench.data.eval_y) for run in runs]
    best_index = max(range(len(runs)), key=lambda i: run_accuracy[i])
    context = bench.context("soup")
    context.versions = {f"run{index}": run for index, run in enumerate(runs) if index != best_index}
    soup = fuse(runs[best_index], {"model_versions": list(context.versions), "method": "greedy_soup"},
                context)
    before, after = bench.measured_pair(runs[best_index], soup.model, "soup")
    used = len(soup.details["members_used"])
    return Row(f"greedy soup of {SOUP_RUNS} fine-tuned runs ({used} used) vs best single", before,
               after, "≥ best single − 0.2 pt", drop_points(before, after) <= 0.2)


TORCH_ROWS: list[RowFunction] = [
    cnn_unstructured_90,
    cnn_structured_50,
    cnn_distilled,
    greedy_soup_of_fine_tuned_runs,
]

WIDE_MLP = {"hidden_sizes": [1024, 1024], "dropout": 0.0}
WIDE_MLP_EPOCHS = 8


def cnn_int8_static_onnx(bench: Bench) -> Row:
    source, quantized = bench.digits_cnn, bench.digits_cnn_int8_static
    before, after = bench.measured_pair(source, quantized, "int8-static")
    speed_up = before.latency_ms_batch32 / after.latency_ms_batch32
    return Row("digits CNN, int8 static QDQ (ONNX)", before, after,
               "bytes ≤ 0.3×, b32 ≥ 2.5× faster, drop ≤ 0.5 pt",
               after.artifact_bytes <= 0.3 * before.artifact_bytes and speed_up >= 2.5
               and drop_points(before, after) <= 0.5)


def wide_mlp_int8_dynamic_onnx(bench: Bench) -> Row:
    source = train_in_place(zoo_model("mlp", WIDE_MLP), bench.context("source-mlp"),
                            epochs=WIDE_MLP_EPOCHS, learning_rate=LEARNING_RATE / 2)
    quantized = quantize(source, {"dtype": "int8", "mode": "dynamic"}, bench.context("int8-dynamic")).model
    before, after = bench.measured_pair(source, quantized, "int8-dynamic")
    speed_up = before.latency_ms_batch32 / after.latency_ms_batch32
    return Row("1024-wide MLP, int8 dynamic (ONNX) vs torch fp32", before, after,
               "b32 ≥ 3× faster, bytes ≤ 0.3×",
               speed_up >= 3.0 and after.artifact_bytes <= 0.3 * before.artifact_bytes)


def cnn_accuracy_aware_int8_onnx(bench: Bench) -> Row:
    source = bench.digits_cnn
    result = quantize(source, {"dtype": "int8", "mode": "static", "accuracy_aware": True,
                               "tolerance": 0.005}, bench.context("accuracy-aware"))
    before, after = bench.measured_pair(source, result.model, "accuracy-aware")
    kept = result.details["layers_kept_in_float"]
    # "Fewest": every layer left in float was needed, in sensitivity order, to fit.
    return Row(f"accuracy-aware int8 (ONNX), 0.5 pt tolerance: {len(kept)} layer(s) in float "
               f"({', '.join(kept) or 'none needed'})", before, after,
               "drop ≤ 0.5 pt, fewest float layers", drop_points(before, after) <= 0.5)


ONNX_ROWS: list[RowFunction] = [
    cnn_int8_static_onnx,
    wide_mlp_int8_dynamic_onnx,
    cnn_accuracy_aware_int8_onnx,
]


def print_table(rows: list[Row]) -> None:
    print_lines([HEADER, *(row.cells() for row in rows)])
    print("\n× = result / source (speed-up: source / result latency), CPU p50 over "
          f"{LATENCY_REPEATS} passes in {LATENCY_ROUNDS} alternating rounds, {TORCH_THREADS} "
          "thread; drop pt = source − result accuracy")
    sys.stdout.flush()


SERVED_BATCH = 32
SERVED_ROUNDS = 7
SERVED_CALLS = 60
"""Predictions per deployment per round; a round's p50 is taken over these."""


@dataclass(frozen=True)
class ServedVersion:
    """One deployment as the gateway serves it: what runs it, its accuracy and latency."""

    version: str
    runtime: str
    accuracy: float
    argmax_agreement: float
    """Share of the evaluation split where the served argmax equals the in-process one."""
    p50_ms: float


@dataclass(frozen=True)
class ServedRow:
    """The int8 ONNX version beside its fp32 source, both served through the gateway."""

    name: str
    fp32: ServedVersion
    int8: ServedVersion

    def cells(self) -> tuple[str, ...]:
        return (self.name, f"{self.fp32.p50_ms:.3f}", f"{self.int8.p50_ms:.3f}",
                f"{self.fp32.p50_ms / self.int8.p50_ms:.2f}",
                f"{self.fp32.accuracy:.4f}", f"{self.int8.accuracy:.4f}",
                f"{self.fp32.argmax_agreement:.4f}/{self.int8.argmax_agreement:.4f}",
                f"{self.fp32.runtime} → {self.int8.runtime}", "p50 ratio printed")


SERVED_HEADER = ("row", "fp32 p50 ms b32", "int8 p50 ms b32", "speed-up b32", "acc fp32 served",
                 "acc int8 served", "argmax = in-process", "runtime (served)", "goal")


def served_predictions(client: maas.Client, deployment: str, x: np.ndarray) -> np.ndarray:
    """The deployment's logits for `x`, sent in batches of SERVED_BATCH."""
    return np.concatenate([client.predict(deployment, x[begin:begin + SERVED_BATCH])["logits"]
                           for begin in range(0, len(x), SERVED_BATCH)])


def served_p50_ms(client: maas.Client, deployment: str, batch: np.ndarray) -> float:
    """p50 wall time of SERVED_CALLS sequential predictions of `batch`, client included."""
    taken = []
    for _ in range(SERVED_CALLS):
        started = time.perf_counter()
        client.predict(deployment, batch)
        taken.append((time.perf_counter() - started) * 1000)
    return statistics.median(taken)


def served_int8_vs_fp32(bench: Bench) -> ServedRow:
    """Start the registry and the inference service (real Triton), serve both, measure."""
    root = bench.workdir / "served"
    registry = ServiceProcess("registry", root / "registry")
    inference = ServiceProcess("inference", root / "inference", registry_target=registry.target,
                               client_token_file=str(root / "registry" / "admin.token"))
    asyncio.run(registry.start())
    try:
        asyncio.run(inference.start(timeout=180))
        return serve_and_measure(bench, registry, inference)
    finally:
        inference.terminate()
        registry.terminate()


def serve_and_measure(bench: Bench, registry: ServiceProcess,
                      inference: ServiceProcess) -> ServedRow:
    source, quantized = bench.digits_cnn, bench.digits_cnn_int8_static
    package = write_package(source, bench.workdir / "served-cnn-fp32.safetensors")
    with maas.Client(targets={"registry": registry.target}, token=registry.admin_token()) as admin:
        versions = {"fp32": admin.upload_model("digits-cnn", package).name}
        versions["int8"] = admin.upload_model(
            "digits-cnn-int8", quantized.form.path, format="onnx",  # type: ignore[union-attr]
            parents=[versions["fp32"]]).name
    in_process = {"fp32": predict(source, bench.data.eval_x),
                  "int8": predict(quantized, bench.data.eval_x)}
    batch = bench.data.eval_x[:SERVED_BATCH]
    with maas.Client(targets={"inference": inference.target},
                     token=inference.admin_token()) as client:
        runtimes, accuracies, agreements = {}, {}, {}
        for kind, version in versions.items():
            deployment = client.deploy(f"cnn-{kind}", version, max_batch_size=SERVED_BATCH)
            runtimes[kind] = deployment.served_versions[0].runtime
            served = served_predictions(client, f"cnn-{kind}", bench.data.eval_x)
            accuracies[kind] = float((served.argmax(axis=1) == bench.data.eval_y).mean())
            agreements[kind] = float(
                (served.argmax(axis=1) == in_process[kind].argmax(axis=1)).mean())
            served_p50_ms(client, f"cnn-{kind}", batch)  # warm-up: Triton's first batches
        rounds: dict[str, list[float]] = {kind: [] for kind in versions}
        for _ in range(SERVED_ROUNDS):
            for kind in versions:
                rounds[kind].append(served_p50_ms(client, f"cnn-{kind}", batch))
    served_versions = {
        kind: ServedVersion(versions[kind], runtimes[kind], accuracies[kind], agreements[kind],
                            statistics.median(rounds[kind]))
        for kind in versions
    }
    return ServedRow("served through the gateway: int8 static ONNX vs fp32 maas-package",
                     served_versions["fp32"], served_versions["int8"])


def print_lines(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    print()
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def print_served_table(row: ServedRow) -> None:
    print("\nServed through the gateway (registry + inference service + bundled Triton, "
          "maas.Client.predict):", end="")
    print_lines([SERVED_HEADER, row.cells()])
    print(f"\np50 of {SERVED_CALLS} sequential batch-{SERVED_BATCH} predictions per round, median "
          f"of {SERVED_ROUNDS} rounds taking turns, client round trip included; speed-up = fp32 / "
          "int8 p50; accuracies over the held-out split as served")
    sys.stdout.flush()


def main() -> None:
    torch.set_num_threads(TORCH_THREADS)
    with bench_workdir() as workdir:
        bench = Bench(data=digits_splits(), workdir=workdir)
        rows = [row(bench) for row in (*TORCH_ROWS, *ONNX_ROWS)]
        served = served_int8_vs_fp32(bench)
    print_table(rows)
    print_served_table(served)


if __name__ == "__main__":
    main()
