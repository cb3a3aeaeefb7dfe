"""Trainer benchmark: digits accuracy, the trainer's cost over a plain loop, and DDP scaling.

Prints one table. Measures, in one run on this machine, with the registry and the trainer
running as real subprocesses (`python -m maas_registry.server`, `python -m maas_trainer.server`):
- digits test accuracy of a CNN and of an MLP trained through the trainer (goals ≥ 97 % and
  ≥ 95 %);
- the CNN job's wall time through the trainer (CreateTrainingJob until the Watch stream says
  SUCCEEDED: scheduling, data staging, process start, per-epoch validation and checkpoints,
  packaging and registry upload included) against the same training in a plain PyTorch loop
  script started as a process (goal: ratio ≤ 1.10);
- the CNN job on 2 DDP workers against 1 worker: test accuracy (goal: within 2 points) and
  training throughput (samples/s, printed; on CPU with gloo it depends on the machine).

Timings are reported, never gated on. Run: `make bench` (or
`.venv/bin/python -m tests.bench.bench_trainer`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from maas.common.v1 import job_pb2
from maas.trainer.v1 import trainer_service_pb2 as ts, training_job_pb2 as tj

from tests.support.bench import bench_workdir
from tests.support.processes import RegistryProcess
from tests.trainer.helpers import TrainerProcess, digits_spec

TORCH_THREADS = 1
"""Per process, as the trainer's default `torch_threads_per_worker`."""
CNN_JOB = {"kind": "cnn", "hyperparameters": {"channels": [32, 64], "dropout": 0.1},
           "epochs": 100, "batch_size": 32, "learning_rate": 0.002, "seed": 0}
MLP_JOB = {"kind": "mlp", "hyperparameters": {"hidden_sizes": [256, 128], "dropout": 0.1},
           "epochs": 100, "batch_size": 32, "learning_rate": 0.002, "seed": 0}
WIDE_BATCH_CNN_JOB = {**CNN_JOB, "epochs": 30, "batch_size": 256}
"""Throughput only: more computation per gradient exchange than the accuracy job."""
REPEATS = 3
"""Trainer and plain loop alternate this often; medians go in the table (the machine is
shared, single runs wander by ±0.5 s)."""


@dataclass(frozen=True)
class JobRun:
    wall_seconds: float
    test_accuracy: float
    samples_per_second: float
    """Median over the epochs of the training throughput the job reported."""


async def run_through_trainer(stub, job_id: str, job: dict, workers: int = 1) -> JobRun:
    spec = digits_spec(kind=job["kind"], hyperparameters=job["hyperparameters"],
                       epochs=job["epochs"], batch_size=job["batch_size"],
                       learning_rate=job["learning_rate"], seed=job["seed"], workers=workers,
                       model_id=f"bench-{job['kind']}")
    started = time.perf_counter()
    created = await stub.CreateTrainingJob(ts.CreateTrainingJobRequest(
        training_job_id=job_id, training_job=tj.TrainingJob(spec=spec)))
    throughputs = []
    async for event in stub.WatchTrainingJob(ts.WatchTrainingJobRequest(name=created.name)):
        if event.WhichOneof("kind") == "metrics" and event.metrics.phase == "train":
            throughputs.append(event.metrics.values["samples_per_second"])
    wall = time.perf_counter() - started
    final = await stub.GetTrainingJob(ts.GetTrainingJobRequest(name=created.name))
    if final.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise AssertionError(f"{job_id} did not succeed: {final.error}")
    return JobRun(wall, final.metrics["test_accuracy"], statistics.median(throughputs))


def plain_loop(job: dict) -> dict:
    """What a user would write by hand: same data, model, optimizer and epochs; no service."""
    import numpy as np
    import torch
    import torch.nn.functional as functional
    from maas_zoo import build_model
    from sklearn.datasets import load_digits

    torch.set_num_threads(TORCH_THREADS)
    digits = load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    targets = torch.tensor(digits.target, dtype=torch.long)
    # The trainer's split sizes (70 / 10 / 20): the same work per epoch; validation unused.
    order = torch.from_numpy(np.random.default_rng(job["seed"]).permutation(len(targets)))
    test, train = order[:359], order[539:]
    torch.manual_seed(job["seed"])
    model = build_model(job["kind"], job["hyperparameters"], [64], 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=job["learning_rate"])
    for _ in range(job["epochs"]):
        model.train()
        shuffled = train[torch.randperm(len(train))]
        for begin in range(0, len(shuffled), job["batch_size"]):
            batch = shuffled[begin:begin + job["batch_size"]]
            loss = functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(inputs[test]).argmax(1) == targets[test]).float().mean().item()
    return {"test_accuracy": accuracy}


def run_plain_loop_process(job: dict) -> JobRun:
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_trainer", "--plain-loop", json.dumps(job)],
        env={**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS)}, capture_output=True,
        text=True, check=True)
    wall = time.perf_counter() - started
    return JobRun(wall, json.loads(completed.stdout.strip().splitlines()[-1])["test_accuracy"], 0.0)


def _verdict(met: bool) -> str:
    return "yes" if met else "NO"


async def main() -> None:
    with bench_workdir() as work:
        registry = RegistryProcess(work / "registry")
        await registry.start()
        trainer = TrainerProcess(work / "trainer", registry.target,
                                 registry.state_dir / "admin.token", worker_slots=2)
        await trainer.start()
        try:
            async with trainer.channel() as channel:
                stub = trainer.stub(channel)
                # One job at a time: each measurement has the machine to itself.
                cnn_runs, plain_runs = [], []
                for repeat in range(REPEATS):
                    cnn_runs.append(await run_through_trainer(stub, f"bench-cnn-{repeat}",
                                                              CNN_JOB))
                    plain_runs.append(run_plain_loop_process(CNN_JOB))
                mlp = await run_through_trainer(stub, "bench-mlp", MLP_JOB)
                ddp = await run_through_trainer(stub, "bench-cnn-ddp", CNN_JOB, workers=2)
                wide_one = await run_through_trainer(stub, "bench-wide-1", WIDE_BATCH_CNN_JOB)
                wide_two = await run_through_trainer(stub, "bench-wide-2", WIDE_BATCH_CNN_JOB,
                                                     workers=2)
        finally:
            trainer.terminate()
            registry.terminate()
            shutil.rmtree(work, ignore_errors=True)

    cnn, plain = cnn_runs[0], plain_runs[0]  # accuracy: every repeat trains the same model
    trainer_wall = statistics.median(run.wall_seconds for run in cnn_runs)
    plain_wall = statistics.median(run.wall_seconds for run in plain_runs)
    ratio = trainer_wall / plain_wall
    accuracy_gap = abs(ddp.test_accuracy - cnn.test_accuracy) * 100
    rows = [
        ("digits CNN test accuracy (trainer)", f"{cnn.test_accuracy:.4f}", "-", "-", "≥ 0.97",
         _verdict(cnn.test_accuracy >= 0.97)),
        ("digits MLP test accuracy (trainer)", f"{mlp.test_accuracy:.4f}", "-", "-", "≥ 0.95",
         _verdict(mlp.test_accuracy >= 0.95)),
        (f"CNN job wall s incl. start, {CNN_JOB['epochs']} epochs, median of {REPEATS}: "
         "trainer vs plain loop", f"{trainer_wall:.2f}", f"{plain_wall:.2f}", f"{ratio:.3f}",
         "≤ 1.10", _verdict(ratio <= 1.10)),
        ("CNN test accuracy: trainer vs plain loop", f"{cnn.test_accuracy:.4f}",
         f"{plain.test_accuracy:.4f}", "-", "-", "-"),
        ("CNN test accuracy: 2 DDP workers vs 1", f"{ddp.test_accuracy:.4f}",
         f"{cnn.test_accuracy:.4f}", f"Δ {accuracy_gap:.2f} pt", "≤ 2 pt",
         _verdict(accuracy_gap <= 2)),
        ("CNN training samples/s (median epoch): 2 DDP workers vs 1",
         f"{ddp.samples_per_second:.0f}", f"{cnn.samples_per_second:.0f}",
         f"{ddp.samples_per_second / cnn.samples_per_second:.2f}", "printed", "-"),
        ("CNN job wall s: 2 DDP workers vs 1", f"{ddp.wall_seconds:.2f}",
         f"{trainer_wall:.2f}", f"{ddp.wall_seconds / trainer_wall:.2f}", "printed", "-"),
        ("CNN batch 256 samples/s (median epoch): 2 DDP workers vs 1",
         f"{wide_two.samples_per_second:.0f}", f"{wide_one.samples_per_second:.0f}",
         f"{wide_two.samples_per_second / wide_one.samples_per_second:.2f}", "printed", "-"),
    ]
    header = ("measure", "trainer", "reference", "ratio", "goal", "met")
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plain-loop", metavar="JOB_JSON",
                        help="run the plain PyTorch loop for one job and print its result")
    arguments = parser.parse_args()
    if arguments.plain_loop:
        print(json.dumps(plain_loop(json.loads(arguments.plain_loop))))
    else:
        asyncio.run(main())
