"""The small training loop the torch steps share: fine-tuning after pruning, distillation.

Adam over shuffled mini-batches, seeded so a job rerun gives the same weights, one epoch's
mean loss reported per epoch through the step context. The loss is the caller's: cross-entropy
on the labels for fine-tuning, the soft/hard mix for distillation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as functional

from maas_compressor.steps.base import StepContext

DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 64

BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(logits of a batch, the batch's example indices) -> loss`."""


def train_epochs(
    module: torch.nn.Module,
    inputs: torch.Tensor,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    learning_rate: float,
    context: StepContext,
    batch_size: int = DEFAULT_BATCH_SIZE,
    after_step: Callable[[], None] | None = None,
    metric_prefix: str = "finetune",
) -> list[float]:
    """Train `module` in place for `epochs`; returns each epoch's mean loss.

    `after_step` runs after every optimizer step (pruning re-applies its masks there so
    pruned weights stay zero). The module is left in eval mode.
    """
    generator = torch.Generator().manual_seed(context.seed)
    torch.manual_seed(context.seed)  # dropout draws
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        module.train()
        order = torch.randperm(len(inputs), generator=generator)
        total, seen = 0.0, 0
        for begin in range(0, len(order), batch_size):
            batch = order[begin:begin + batch_size]
            loss = batch_loss(module(inputs[batch]), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        losses.append(total / max(seen, 1))
        context.metrics({f"{metric_prefix}_epoch": float(epoch), f"{metric_prefix}_loss": losses[-1]})
    module.eval()
    return losses


def label_loss(targets: torch.Tensor) -> BatchLoss:
    """Cross-entropy against the hard labels `targets` (indexed like the inputs)."""
    return lambda logits, batch: functional.cross_entropy(logits, targets[batch])
