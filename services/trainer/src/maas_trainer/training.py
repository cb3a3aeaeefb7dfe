"""The training loop a job process runs: data, model, optimizer, schedule, epochs, package.

Reproducible by construction, so a run resumed from a checkpoint ends where an uninterrupted
run with the same seed ends: one fixed thread count per process, deterministic algorithms,
the split and the initial weights drawn from the seed, each epoch's example order drawn from
(seed, epoch) by `DistributedSampler`, and the random generator state of every rank saved in
each checkpoint (dropout draws continue where they stopped).

With several workers (launched by torchrun) every rank trains on its shard of each epoch
under `DistributedDataParallel` (gloo on CPU, NCCL when GPUs are present) with a per-rank
batch of batch_size / workers, so the optimisation matches a single worker's global batch.
Rank 0 evaluates, reports, checkpoints and writes the package.

Text datasets train the same way on token ids (`maas_trainer.text_training`); the
pretrained `minilm_classifier` takes its own, head-only path there.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as functional
from maas_formats import TEXT_CSV, load_dataset, validate_dataset
from maas_formats.manifest import (
    ArchitectureSpec as ManifestArchitecture,
    FrameworkInfo,
    ModelManifest,
    SignatureSpec,
    TensorSignatureSpec,
)
from maas_formats.preprocessing import apply_preprocessing
from maas_formats.torch_io import save_torch_package
from maas_jobs.progress import ProgressReporter
from maas_jobs.records import LogLevel
from maas_runtime.errors import FailedPrecondition
from maas_zoo import build_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from maas_trainer.checkpoints import TrainingCheckpoint, load_checkpoint, save_checkpoint
from maas_trainer.datasets import (
    DatasetFacts,
    fit_preprocessing,
    split_indices,
    split_sizes,
)
from maas_trainer.plan import CHECKPOINT_FILENAME, PACKAGE_FILENAME, RunConfig, RunResult
from maas_trainer.pretrained import PRETRAINED_ARCHITECTURES
from maas_trainer.spec import EarlyStoppingSpec, OptimizerSpec, ScheduleSpec
from maas_trainer.text_training import (
    run_minilm_head_training,
    text_signature,
    tokenize_text_dataset,
)

INPUT_TENSOR = "input"
OUTPUT_TENSOR = "logits"
_EVALUATION_BATCH = 1024


@dataclass(frozen=True)
class World:
    """This process's place in a (possibly one-process) distributed run."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"
    """Where tensors live: "cpu", or "cuda:<local rank>" when the job runs on GPUs (NCCL)."""
    cpu_group: Any = None
    """A gloo process group for the small CPU-side collectives (RNG states, stop decisions)
    when the main group is NCCL, which only moves CUDA tensors; None means the default group."""

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


# -- optimisation -------------------------------------------------------------------------------


def build_optimizer(spec: OptimizerSpec, parameters) -> torch.optim.Optimizer:
    if spec.kind == "sgd":
        return torch.optim.SGD(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    if spec.kind == "momentum":
        return torch.optim.SGD(parameters, lr=spec.learning_rate, momentum=spec.momentum,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay)
    if spec.kind == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=spec.learning_rate, momentum=spec.momentum,
                                   weight_decay=spec.weight_decay)
    if spec.kind == "adam":
        return torch.optim.Adam(parameters, lr=spec.learning_rate, betas=(spec.beta1, spec.beta2),
                                weight_decay=spec.weight_decay)
    if spec.kind == "adamw":
        return torch.optim.AdamW(parameters, lr=spec.learning_rate,
                                 betas=(spec.beta1, spec.beta2), weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.kind!r}")


class LearningRateSchedule:
    """Learning rate per epoch (counted from 1): linear warm-up, then constant, step or cosine.

    A pure function of the epoch, so resuming needs no scheduler state.
    """

    def __init__(self, spec: ScheduleSpec, base_rate: float, epochs: int) -> None:
        self._spec = spec
        self._base = base_rate
        self._epochs = epochs

    def at(self, epoch: int) -> float:
        warmup = self._spec.warmup_epochs
        if epoch <= warmup:
            return self._base * epoch / (warmup + 1)
        since_warmup = epoch - warmup - 1  # 0 at the first epoch after warm-up
        if self._spec.kind == "step":
            return self._base * self._spec.gamma ** (since_warmup // self._spec.step_size)
        if self._spec.kind == "cosine":
            span = max(self._epochs - warmup, 1)
            return self._base * 0.5 * (1 + math.cos(math.pi * since_warmup / span))
        return self._base


class EarlyStopper:
    """Tracks the watched validation metric, the best weights, and when to stop."""

    def __init__(self, spec: EarlyStoppingSpec | None) -> None:
        self._spec = spec
        self.best_value: float | None = None
        self.best_epoch = 0
        self.epochs_without_improvement = 0
        self.best_model_state: dict[str, torch.Tensor] | None = None

    def observe(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch's metrics; True when training should stop."""
        if self._spec is None:
            return False
        value = metrics[self._spec.metric]
        if self.best_value is None or self._improves(self._spec, self.best_value, value):
            self.best_value, self.best_epoch = value, epoch
            self.epochs_without_improvement = 0
            self.best_model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self._spec.patience

    @staticmethod
    def _improves(spec: EarlyStoppingSpec, best_value: float, value: float) -> bool:
        if spec.lower_is_better:
            return value < best_value - spec.min_delta
        return value > best_value + spec.min_delta

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.epochs_without_improvement}

    def restore(self, state: dict[str, Any], best_model_state) -> None:
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.best_model_state = best_model_state


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    validation_x: torch.Tensor
    validation_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    preprocessing: dict[str, Any]
    class_names: list[str]


def prepare_data(config: RunConfig, workdir: Path) -> PreparedData:
    spec, facts = config.plan.spec, config.plan.dataset
    path = workdir / facts.staged_filename
    if facts.format == TEXT_CSV:
        # Token ids, not features: nothing to normalise; the tokenizer is the preprocessing.
        text = tokenize_text_dataset(path, facts, spec.architecture.hyperparameters["max_length"])
        return _split(config, torch.from_numpy(text.input_ids), text.labels, text.preprocessing,
                      list(text.class_names))
    features, labels = load_dataset(path, facts.format, facts.feature_columns, facts.label_column)
    if tuple(features.shape[1:]) != tuple(facts.feature_shape):
        raise FailedPrecondition(
            f"{facts.source} holds features of shape {list(features.shape[1:])}, but the job "
            f"was validated for {list(facts.feature_shape)}", reason="DATASET_CHANGED")
    split = _split_of(config, len(labels))
    preprocessing = fit_preprocessing(facts, features[split.train])
    inputs = torch.from_numpy(np.ascontiguousarray(apply_preprocessing(preprocessing, features)))
    return _split(config, inputs, labels, preprocessing, list(_class_names(
        facts, path, max(facts.num_classes, int(labels.max()) + 1))))


def _split_of(config: RunConfig, rows: int):
    spec = config.plan.spec
    sizes = split_sizes(rows, spec.data.validation_fraction, spec.data.test_fraction)
    return split_indices(rows, sizes, spec.seed)


def _split(config: RunConfig, inputs: torch.Tensor, labels: np.ndarray,
           preprocessing: dict[str, Any], class_names: list[str]) -> PreparedData:
    facts = config.plan.dataset
    # Class indices need not be contiguous in an npz ({0, 3, 7}): the head covers them all.
    num_classes = max(facts.num_classes, int(labels.max()) + 1)
    split = _split_of(config, len(labels))
    targets = torch.from_numpy(labels.astype(np.int64))
    if len(class_names) != num_classes:
        class_names = [str(index) for index in range(num_classes)]

    def part(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(indices)
        return inputs[index].contiguous(), targets[index].contiguous()

    train_x, train_y = part(split.train)
    validation_x, validation_y = part(split.validation)
    test_x, test_y = part(split.test)
    return PreparedData(train_x, train_y, validation_x, validation_y, test_x, test_y, num_classes,
                        preprocessing, class_names)


def _class_names(facts: DatasetFacts, path: Path, num_classes: int) -> list[str]:
    names = list(facts.class_names)
    if not names and facts.format == "csv":
        names = list(validate_dataset(path, "csv", facts.feature_columns,
                                      facts.label_column).class_names)
    return names if len(names) == num_classes else [str(index) for index in range(num_classes)]


# -- epochs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float


def train_one_epoch(module: nn.Module, parameters: list[nn.Parameter],
                    optimizer: torch.optim.Optimizer, data: PreparedData,
                    sampler: DistributedSampler, rank_batch_size: int, clip_norm: float,
                    world: World) -> EpochStats:
    module.train()
    order = torch.tensor(list(sampler), dtype=torch.long)
    # loss sum, correct, examples; on the training device, where NCCL can all-reduce them
    totals = torch.zeros(3, dtype=torch.float64, device=world.device)
    started = time.perf_counter()
    for begin in range(0, len(order), rank_batch_size):
        batch = order[begin:begin + rank_batch_size]
        inputs, targets = data.train_x[batch], data.train_y[batch]
        logits = module(inputs)
        loss = functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
        optimizer.step()
        with torch.no_grad():
            totals[0] += loss.detach().double() * len(batch)
            totals[1] += (logits.argmax(dim=1) == targets).sum().double()
            totals[2] += len(batch)
    if world.distributed:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - started
    return EpochStats(float(totals[0] / totals[2]), float(totals[1] / totals[2]),
                      int(totals[2]), seconds)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a whole split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for begin in range(0, len(targets), _EVALUATION_BATCH):
        logits = model(inputs[begin:begin + _EVALUATION_BATCH])
        batch_targets = targets[begin:begin + _EVALUATION_BATCH]
        loss_sum += float(functional.cross_entropy(logits, batch_targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == batch_targets).sum())
    return loss_sum / len(targets), correct / len(targets)


def _rng_states_of_all_ranks(world: World) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if not world.distributed:
        return [state]
    states = [torch.empty_like(state) for _ in range(world.size)]
    dist.all_gather(states, state, group=world.cpu_group)
    return states


def _leader_decides(flag: bool, world: World) -> bool:
    """Rank 0's decision, on every rank (so all ranks leave the loop together)."""
    if not world.distributed:
        return flag
    decision = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(decision, src=0, group=world.cpu_group)
    return bool(decision.item())


def _on_device(data: PreparedData, device: str) -> PreparedData:
    """The splits moved once to the training device (a no-op on the CPU)."""
    if device == "cpu":
        return data
    moved = {name: getattr(data, name).to(device) for name in (
        "train_x", "train_y", "validation_x", "validation_y", "test_x", "test_y")}
    return dataclasses.replace(data, **moved)


def _dropout_seed(seed: int, rank: int) -> int:
    # Initial weights come from `seed` on every rank; dropout draws must differ per rank.
    return (seed * 1_000_003 + rank + 1) % 2**63


# -- the run ------------------------------------------------------------------------------------


def run_training(config: RunConfig, workdir: Path, reporter: ProgressReporter,
                 world: World) -> None:
    """Train (or resume), then evaluate on the test split and write package and result."""
    spec, facts = config.plan.spec, config.plan.dataset
    if spec.architecture.kind in PRETRAINED_ARCHITECTURES:
        run_minilm_head_training(config, workdir, reporter)
        return
    torch.set_num_threads(config.torch_threads)
    torch.use_deterministic_algorithms(True)
    data = _on_device(prepare_data(config, workdir), world.device)

    torch.manual_seed(spec.seed)
    model = build_model(spec.architecture.kind, spec.architecture.hyperparameters,
                        _input_shape(config), data.num_classes)
    model.to(world.device)  # before the optimizer sees the parameters
    torch.manual_seed(_dropout_seed(spec.seed, world.rank))
    parameters = list(model.parameters())
    optimizer = build_optimizer(spec.optimizer, parameters)
    schedule = LearningRateSchedule(spec.schedule, spec.optimizer.learning_rate, spec.epochs)
    stopper = EarlyStopper(spec.early_stopping)
    checkpoint_path = workdir / CHECKPOINT_FILENAME
    progress: dict[str, Any] = {"stopped_early": False, "last_metrics": {}}
    first_epoch = 1

    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.optimizer_state)
        stopper.restore(checkpoint.progress["early_stopping"], checkpoint.best_model_state)
        progress = checkpoint.progress
        if len(checkpoint.rng_states) == world.size:
            torch.set_rng_state(checkpoint.rng_states[world.rank])
        first_epoch = checkpoint.epoch + 1
        reporter.log(LogLevel.INFO, f"resuming after epoch {checkpoint.epoch} from its checkpoint")
    else:
        reporter.log(LogLevel.INFO,
                     f"training {spec.architecture.kind} on {facts.source}: "
                     f"{len(data.train_y)} train / {len(data.validation_y)} validation / "
                     f"{len(data.test_y)} test examples, {world.size} worker(s)")

    if world.distributed:
        on_gpu = world.device.startswith("cuda")
        trained: nn.Module = DistributedDataParallel(
            model, device_ids=[torch.device(world.device).index] if on_gpu else None)
    else:
        trained = model
    # The sampler only ever indexes its dataset's length: a range of example indices will do.
    sampler: DistributedSampler = DistributedSampler(
        range(len(data.train_y)),  # type: ignore[arg-type]
        num_replicas=world.size, rank=world.rank, shuffle=True, seed=spec.seed)
    rank_batch_size = math.ceil(spec.batch_size / world.size)
    last_epoch = first_epoch - 1
    for epoch in range(first_epoch, spec.epochs + 1):
        if progress["stopped_early"]:
            break
        learning_rate = schedule.at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        sampler.set_epoch(epoch)
        stats = train_one_epoch(trained, parameters, optimizer, data, sampler, rank_batch_size,
                                spec.gradient_clip_norm, world)
        validation_loss, validation_accuracy = evaluate(model, data.validation_x,
                                                        data.validation_y)
        metrics = {"loss": stats.loss, "accuracy": stats.accuracy, "val_loss": validation_loss,
                   "val_accuracy": validation_accuracy, "lr": learning_rate,
                   "samples_per_second": stats.samples / max(stats.seconds, 1e-9)}
        reporter.metrics(epoch, "train", metrics)
        stop = _leader_decides(stopper.observe(epoch, metrics, model), world)
        progress = {"stopped_early": stop, "last_metrics": metrics,
                    "early_stopping": stopper.state()}
        rng_states = _rng_states_of_all_ranks(world)
        if world.is_leader:
            save_checkpoint(checkpoint_path, TrainingCheckpoint(
                epoch=epoch, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                rng_states=rng_states, progress=progress,
                best_model_state=stopper.best_model_state))
        last_epoch = epoch
        if stop and spec.early_stopping is not None:
            reporter.log(LogLevel.INFO,
                         f"early stopping after epoch {epoch}: {spec.early_stopping.metric} has "
                         f"not improved since epoch {stopper.best_epoch}")
    epochs_completed = last_epoch

    if stopper.best_model_state is not None:
        model.load_state_dict(stopper.best_model_state)
    if world.is_leader:
        _finish(config, workdir, reporter, model, data, progress, epochs_completed)
    if world.distributed:
        dist.barrier()  # the others wait until the package is written, then exit together


def _input_shape(config: RunConfig) -> list[int]:
    """One example as the model reads it: features, or a text's max_length token ids."""
    facts, architecture = config.plan.dataset, config.plan.spec.architecture
    if facts.format == TEXT_CSV:
        return [architecture.hyperparameters["max_length"]]
    return list(facts.feature_shape)


def _finish(config: RunConfig, workdir: Path, reporter: ProgressReporter, model: nn.Module,
            data: PreparedData, progress: dict[str, Any], epochs_completed: int) -> None:
    spec, facts = config.plan.spec, config.plan.dataset
    test_loss, test_accuracy = evaluate(model, data.test_x, data.test_y)
    validation_loss, validation_accuracy = evaluate(model, data.validation_x, data.validation_y)
    reporter.metrics(epochs_completed, "test", {"test_loss": test_loss,
                                                "test_accuracy": test_accuracy})
    signature = text_signature(data.num_classes) if facts.format == TEXT_CSV else SignatureSpec(
        inputs=[TensorSignatureSpec(name=INPUT_TENSOR, datatype="FP32",
                                    shape=list(facts.feature_shape))],
        outputs=[TensorSignatureSpec(name=OUTPUT_TENSOR, datatype="FP32",
                                     shape=[data.num_classes])])
    manifest = ModelManifest(
        architecture=ManifestArchitecture(kind=spec.architecture.kind,
                                          hyperparameters=spec.architecture.hyperparameters),
        signature=signature,
        preprocessing=data.preprocessing,
        labels=data.class_names,
        framework=FrameworkInfo(name="torch", version=torch.__version__))
    save_torch_package(workdir / PACKAGE_FILENAME, manifest,
                       {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()})
    last = progress.get("last_metrics", {})
    metrics = {"test_accuracy": test_accuracy, "test_loss": test_loss,
               "val_accuracy": validation_accuracy, "val_loss": validation_loss,
               "epochs": float(epochs_completed)}
    if "accuracy" in last:
        metrics.update(accuracy=last["accuracy"], loss=last["loss"])
    RunResult(metrics, epochs_completed, bool(progress.get("stopped_early"))).write(workdir)
    reporter.log(LogLevel.INFO, f"test accuracy {test_accuracy:.4f} after {epochs_completed} "
                                "epochs; model package written")
