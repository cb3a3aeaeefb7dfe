"""Prune: remove the smallest weights (unstructured) or whole neurons and channels (structured).

Unstructured magnitude pruning zeroes the smallest |w| of every weight matrix and kernel, over
all of them at once (`scope="global"`) or the same share in each (`"per_layer"`). It is done
on the tensors themselves, so the result has no masks or forward hooks: the zeros are in the
weights, and stay there through fine-tuning because the mask is re-applied after each step.

Structured pruning removes the neurons or channels of smallest L2 norm (Torch-Pruning's
DepGraph finds every layer coupled to them: the next layer's inputs, the classifier behind a
flatten) and expresses the result as a smaller zoo spec, e.g. `hidden_sizes` [128] → [64],
into which the pruned weights are loaded, so the package stays manifest + safetensors.
Per kind: mlp hidden neurons, cnn conv channels, transformer feed-forward width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from maas_runtime.errors import FailedPrecondition, Internal

from maas_compressor.steps.base import ModelUnderCompression, StepContext, StepResult, TorchForm
from maas_compressor.torch_models import (
    build_zoo_module,
    classifier_shape,
    count_parameters,
    module_inputs,
    torch_form_of,
)
from maas_compressor.training import DEFAULT_LEARNING_RATE, label_loss, train_epochs

PrunableLayer = torch.nn.Linear | torch.nn.Conv2d
SCOPE_GLOBAL = "global"
SCOPE_PER_LAYER = "per_layer"
# A pruned module and the zoo module rebuilt from the smaller spec compute the same function;
# float reassociation in a narrower matmul moves the last bits only.
_REBUILD_TOLERANCE = 1e-4


def prune(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """Prune the torch model by `params["amount"]`, then optionally fine-tune it."""
    form = torch_form_of(model)
    amount = float(params["amount"])
    parameters_before, nonzero_before = count_parameters(form.module)
    if params.get("structured", False):
        pruned, details = _prune_structured(model, form, amount)
        masks: dict[str, torch.Tensor] = {}
    else:
        pruned = _copy_form(model, form)
        masks, details = _prune_unstructured(pruned, amount, params.get("scope", SCOPE_GLOBAL))
    losses = _finetune(model, pruned, masks, params, ctx)
    parameters_after, nonzero_after = count_parameters(pruned.module)
    details.update(
        parameters_before=parameters_before,
        parameters_after=parameters_after,
        nonzero_parameters_before=nonzero_before,
        nonzero_parameters_after=nonzero_after,
        overall_sparsity=1.0 - nonzero_after / parameters_after,
        finetune_epochs=len(losses),
    )
    if masks:
        details["sparsity"] = _sparsity(pruned.module, masks)
    if losses:
        details["finetune_final_loss"] = losses[-1]
    ctx.log(f"pruned: {parameters_before} → {parameters_after} parameters, {nonzero_after} non-zero")
    return StepResult(
        model=model.with_form(pruned), details=details
    )


def _copy_form(model: ModelUnderCompression, form: TorchForm) -> TorchForm:
    """A fresh module with the same weights: a step never changes its input model."""
    module = build_zoo_module(form.architecture, model.signature)
    module.load_state_dict(form.module.state_dict(), strict=True)
    return TorchForm(module=module.eval(), architecture=form.architecture)


# -- unstructured -----------------------------------------------------------------------------


def _prunable_weights(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Weight matrices and kernels (biases, norms and embeddings are left whole)."""
    return {
        name: parameter
        for name, parameter in module.named_parameters()
        if name.endswith("weight") and parameter.dim() >= 2
    }


def _prune_unstructured(
    form: TorchForm, amount: float, scope: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = _prunable_weights(form.module)
    if scope == SCOPE_GLOBAL:
        magnitudes = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        keep_flat = _keep_largest(magnitudes, amount)
        masks, offset = {}, 0
        for name, weight in weights.items():
            masks[name] = keep_flat[offset : offset + weight.numel()].reshape(weight.shape)
            offset += weight.numel()
    else:
        masks = {
            name: _keep_largest(w.detach().abs().flatten(), amount).reshape(w.shape)
            for name, w in weights.items()
        }
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name])
    per_layer = {name: 1.0 - float(mask.float().mean()) for name, mask in masks.items()}
    return masks, {"structured": False, "scope": scope, "sparsity_per_layer": per_layer}


def _keep_largest(magnitudes: torch.Tensor, amount: float) -> torch.Tensor:
    """A float mask keeping all but the `amount` share of smallest entries (ties by index)."""
    removed = round(amount * magnitudes.numel())
    keep = torch.ones_like(magnitudes)
    keep[torch.argsort(magnitudes, stable=True)[:removed]] = 0.0
    return keep


def _sparsity(module: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> float:
    weights = _prunable_weights(module)
    zeros = sum(int((weights[name] == 0).sum()) for name in masks)
    return zeros / sum(weights[name].numel() for name in masks)


# -- structured -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StructuredPlan:
    """Where a zoo kind's prunable widths live and which hyperparameter records them."""

    hyperparameter: str
    layers: Callable[[torch.nn.Module], Sequence[PrunableLayer]]
    """The layers whose output neurons/channels are removed, one per width."""
    prune_function: Any
    """Torch-Pruning's out-channel pruning function for those layers."""
    one_width_for_all: bool
    """The spec holds one width for every layer (transformer), not one per layer."""


def _structured_plans() -> dict[str, _StructuredPlan]:
    import torch_pruning

    return {
        "mlp": _StructuredPlan(
            "hidden_sizes",
            # every Linear but the classifier at the end
            lambda m: [layer for layer in m.modules() if isinstance(layer, torch.nn.Linear)][:-1],
            torch_pruning.prune_linear_out_channels,
            one_width_for_all=False,
        ),
        "cnn": _StructuredPlan(
            "channels",
            lambda m: [layer for layer in m.modules() if isinstance(layer, torch.nn.Conv2d)],
            torch_pruning.prune_conv_out_channels,
            one_width_for_all=False,
        ),
        "transformer": _StructuredPlan(
            "dim_feedforward",
            lambda m: [
                layer.linear1 for layer in m.modules() if isinstance(layer, torch.nn.TransformerEncoderLayer)
            ],
            torch_pruning.prune_linear_out_channels,
            one_width_for_all=True,
        ),
    }


def _prune_structured(
    model: ModelUnderCompression, form: TorchForm, amount: float
) -> tuple[TorchForm, dict[str, Any]]:
    import torch_pruning

    kind = form.architecture["kind"]
    plan = _structured_plans().get(kind)
    if plan is None:
        raise FailedPrecondition(
            f"structured pruning knows the zoo kinds {', '.join(_structured_plans())}; "
            f"a {kind!r} model has no smaller spec to prune into",
            reason="ARCHITECTURE_NOT_PRUNABLE",
        )
    working = _copy_form(model, form).module
    layers = plan.layers(working)
    if not layers:
        raise FailedPrecondition(
            f"this {kind} has no hidden layers ({plan.hyperparameter} is empty): "
            "there are no neurons to remove",
            reason="NOTHING_TO_PRUNE",
        )
    widths = [int(layer.weight.shape[0]) for layer in layers]
    kept = [max(1, width - round(width * amount)) for width in widths]
    if kept == widths:
        raise FailedPrecondition(
            f"amount {amount} removes no neuron from widths {widths}; use a larger amount",
            reason="PRUNE_AMOUNT_TOO_SMALL",
        )
    input_shape, _ = classifier_shape(model.signature)
    graph = torch_pruning.DependencyGraph().build_dependency(
        working,
        example_inputs=torch.zeros(1, *input_shape),
        unwrapped_parameters=_unwrapped_parameters(working),
    )
    importance = torch_pruning.importance.GroupMagnitudeImportance(p=2)
    for layer, width, keep in zip(layers, widths, kept, strict=True):
        everything = graph.get_pruning_group(layer, plan.prune_function, idxs=list(range(width)))
        scores = importance(everything)
        weakest = torch.argsort(scores, stable=True)[: width - keep].tolist()
        graph.get_pruning_group(layer, plan.prune_function, idxs=weakest).prune()
    hyperparameters = dict(form.architecture["hyperparameters"])
    hyperparameters[plan.hyperparameter] = kept[0] if plan.one_width_for_all else kept
    smaller = TorchForm(
        module=_rebuilt(working, {"kind": kind, "hyperparameters": hyperparameters}, model),
        architecture={"kind": kind, "hyperparameters": hyperparameters},
    )
    details = {
        "structured": True,
        "pruned_hyperparameter": plan.hyperparameter,
        "hyperparameters_before": form.architecture["hyperparameters"],
        "hyperparameters_after": hyperparameters,
    }
    return smaller, details


def _unwrapped_parameters(module: torch.nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
    # Parameters held by no leaf layer (the transformer's position embedding): tell DepGraph
    # their channel dimension (the last) instead of letting it guess with a warning.
    in_layers = {
        id(p) for m in module.modules() if not list(m.children()) for p in m.parameters(recurse=False)
    }
    return [(p, p.dim() - 1) for p in module.parameters() if id(p) not in in_layers]


def _rebuilt(
    pruned: torch.nn.Module, architecture: dict[str, Any], model: ModelUnderCompression
) -> torch.nn.Module:
    """The zoo module of the smaller spec holding the pruned weights, checked to compute the
    same outputs (anything else would mean the spec does not describe the pruned network)."""
    rebuilt = build_zoo_module(architecture, model.signature)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    rebuilt.eval()
    pruned.eval()
    input_shape, _ = classifier_shape(model.signature)
    probe = torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = float((rebuilt(probe) - pruned(probe)).abs().max())
    if difference > _REBUILD_TOLERANCE:
        raise Internal(
            f"the pruned {architecture['kind']} rebuilt from its smaller spec differs "
            f"from the pruned network by {difference:g}"
        )
    return rebuilt


# -- fine-tuning ------------------------------------------------------------------------------


def _finetune(
    model: ModelUnderCompression,
    form: TorchForm,
    masks: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    ctx: StepContext,
) -> list[float]:
    epochs = int(params.get("finetune_epochs", 0))
    if epochs == 0:
        return []
    weights = _prunable_weights(form.module)

    def reapply_masks() -> None:
        for name, mask in masks.items():
            weights[name].mul_(mask)

    inputs = module_inputs(model.preprocessing, ctx.data.train_x)
    targets = torch.from_numpy(ctx.data.train_y.astype("int64"))
    ctx.log(f"fine-tuning the pruned model for {epochs} epochs")
    return train_epochs(
        form.module,
        inputs,
        label_loss(targets),
        epochs=epochs,
        learning_rate=float(params.get("learning_rate", DEFAULT_LEARNING_RATE)),
        context=ctx,
        after_step=reapply_masks if masks else None,
    )
