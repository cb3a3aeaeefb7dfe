"""Training checkpoints as one safetensors file: tensors in the data, the rest as JSON.

The project never unpickles an artifact, so a checkpoint is not `torch.save` output. One
safetensors file holds every tensor — model weights (`model.*`), the best weights so far
when early stopping tracks them (`best_model.*`), optimizer state tensors
(`optimizer.<param>.<name>`, e.g. Adam's `exp_avg`) and the random generator state of every
rank (`rng.<rank>`) — and its header metadata key `maas.checkpoint` holds JSON for the rest:
the epoch, optimizer hyperparameters and scalar state, and training progress (early
stopping bookkeeping; the learning-rate schedule is a pure function of the epoch).

Writes are atomic (temporary file, fsync, rename), so a kill at any moment leaves either the
previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_METADATA_KEY = "maas.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_MODEL, _BEST, _OPTIMIZER, _RNG = "model.", "best_model.", "optimizer.", "rng."


@dataclass
class TrainingCheckpoint:
    """Everything needed to continue a run after `epoch` exactly as if it never stopped."""

    epoch: int
    """The last completed epoch."""
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    """`torch.optim.Optimizer.state_dict()`."""
    rng_states: list[torch.Tensor]
    """torch's CPU generator state, one per rank."""
    progress: dict[str, Any]
    """JSON-friendly training progress (early stopping, last metrics)."""
    best_model_state: dict[str, torch.Tensor] | None = None


def _own(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors stores contiguous tensors that share no storage with each other.
    return tensor.detach().cpu().clone().contiguous()


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return value


def save_checkpoint(path: Path, checkpoint: TrainingCheckpoint) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint.model_state.items():
        tensors[_MODEL + name] = _own(tensor)
    for name, tensor in (checkpoint.best_model_state or {}).items():
        tensors[_BEST + name] = _own(tensor)
    scalar_state: dict[str, dict[str, Any]] = {}
    for parameter, values in checkpoint.optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{parameter}.{name}"] = _own(value)
            else:
                scalar_state.setdefault(str(parameter), {})[name] = _json_value(value)
    for rank, state in enumerate(checkpoint.rng_states):
        tensors[f"{_RNG}{rank}"] = _own(state)
    document = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": checkpoint.epoch,
        "ranks": len(checkpoint.rng_states),
        "has_best_model": checkpoint.best_model_state is not None,
        "optimizer": {
            "param_groups": [{key: _json_value(value) for key, value in group.items()}
                             for group in checkpoint.optimizer_state["param_groups"]],
            "scalar_state": scalar_state,
            "parameters": sorted(int(p) for p in checkpoint.optimizer_state["state"]),
        },
        "progress": checkpoint.progress,
    }
    temporary = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temporary), metadata={CHECKPOINT_METADATA_KEY: json.dumps(document)})
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> TrainingCheckpoint | None:
    """The checkpoint at `path`, or None when there is none yet."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        document = json.loads(handle.metadata()[CHECKPOINT_METADATA_KEY])
    if document.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path.name} has checkpoint format {document.get('format_version')}")
    tensors = load_file(str(path))
    optimizer_document = document["optimizer"]
    state: dict[int, dict[str, Any]] = {
        parameter: dict(optimizer_document["scalar_state"].get(str(parameter), {}))
        for parameter in optimizer_document["parameters"]}
    model_state, best_state = {}, {}
    for key, tensor in tensors.items():
        if key.startswith(_MODEL):
            model_state[key[len(_MODEL):]] = tensor
        elif key.startswith(_BEST):
            best_state[key[len(_BEST):]] = tensor
        elif key.startswith(_OPTIMIZER):
            parameter, _, name = key[len(_OPTIMIZER):].partition(".")
            state.setdefault(int(parameter), {})[name] = tensor
    param_groups = [
        # torch keeps betas as a tuple; JSON brought back a list.
        {key: tuple(value) if key == "betas" else value for key, value in group.items()}
        for group in optimizer_document["param_groups"]]
    return TrainingCheckpoint(
        epoch=int(document["epoch"]), model_state=model_state,
        optimizer_state={"state": state, "param_groups": param_groups},
        rng_states=[tensors[f"{_RNG}{rank}"] for rank in range(int(document["ranks"]))],
        progress=document["progress"],
        best_model_state=best_state if document["has_best_model"] else None)
