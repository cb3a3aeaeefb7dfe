"""Fuse: average the weights of several versions of one architecture ("model soups").

The model under compression is the first member; `model_versions` adds the others. Methods:
`uniform` (every member alike), `weighted` (by `weights`, source first, normalised to sum 1)
and `greedy_soup` (Wortsman et al. 2022): members sorted by accuracy on a validation slice of
the training data, each added to the soup only if the soup's validation accuracy does not
drop. The evaluation split stays untouched, so the accuracy gate judges the soup fairly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import torch
from maas_runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument

from maas_compressor.steps.base import ModelUnderCompression, StepContext, StepResult, TorchForm
from maas_compressor.torch_models import build_zoo_module, predict_torch

METHOD_UNIFORM = "uniform"
METHOD_WEIGHTED = "weighted"
METHOD_GREEDY_SOUP = "greedy_soup"
SOURCE_MEMBER = "source"
VALIDATION_FRACTION = 0.2
_MIN_VALIDATION_EXAMPLES = 1


def fuse(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """Average the source with `params["model_versions"]` by `params["method"]`."""
    names = [SOURCE_MEMBER, *params["model_versions"]]
    members = [model, *(ctx.load_version(name) for name in params["model_versions"])]
    forms = _same_architecture_forms(members, names)
    method = params.get("method", METHOD_UNIFORM)
    details: dict[str, Any] = {"method": method}
    if method == METHOD_GREEDY_SOUP:
        used, validation = _greedy_soup(forms, names, model, ctx)
        weights = [1.0 / len(used)] * len(used)
        details["validation_accuracy"] = validation
    else:
        used = list(range(len(forms)))
        weights = _member_weights(params.get("weights") or [], len(forms), method)
    fused = _average([forms[i] for i in used], weights, model)
    details["members_used"] = [names[i] for i in used]
    details["weights"] = weights
    ctx.log(f"fused {len(used)} of {len(forms)} members: {', '.join(details['members_used'])}")
    return StepResult(model.with_form(fused), details)


def _same_architecture_forms(
    members: Sequence[ModelUnderCompression], names: Sequence[str]
) -> list[TorchForm]:
    forms = []
    for index, member in enumerate(members):
        if not isinstance(member.form, TorchForm):
            _refuse(_member_field(index), "is an ONNX model; weights are averaged in torch, before convert")
        forms.append(member.form)
    reference = forms[0].architecture
    for index, (member, form) in enumerate(zip(members, forms, strict=True)):
        if form.architecture != reference or member.signature != members[0].signature:
            _refuse(
                _member_field(index),
                f"{names[index]} is a {form.architecture['kind']} "
                f"{form.architecture['hyperparameters']} but the source is a "
                f"{reference['kind']} {reference['hyperparameters']} (or their signatures "
                "differ): only versions of one architecture can be averaged",
            )
    return forms


def _member_field(index: int) -> str:
    """The step field naming member `index` (the source is member 0, not in the list)."""
    return SOURCE_MEMBER if index == 0 else f"model_versions[{index - 1}]"


def _refuse(field: str, description: str) -> NoReturn:
    raise FailedPrecondition(f"{field}: {description}", field_violations=[FieldViolation(field, description)],
                             reason="FUSE_MEMBER_INCOMPATIBLE")


def _member_weights(given: Sequence[float], count: int, method: str) -> list[float]:
    if method == METHOD_UNIFORM or not given:
        return [1.0 / count] * count
    if len(given) != count:
        raise InvalidArgument.for_field(
            "weights", f"needs one weight per member, the source first: {count}, got {len(given)}"
        )
    total = float(sum(given))
    if total <= 0:
        raise InvalidArgument.for_field("weights", "must sum to a positive number")
    return [float(w) / total for w in given]


def _average(forms: Sequence[TorchForm], weights: Sequence[float], model: ModelUnderCompression) -> TorchForm:
    states = [form.module.state_dict() for form in forms]
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            weighted = [w * state[name].double() for w, state in zip(weights, states, strict=True)]
            averaged[name] = torch.stack(weighted).sum(dim=0).to(first.dtype)
        else:  # counters and integer buffers cannot be averaged; keep the first member's
            averaged[name] = first.clone()
    module = build_zoo_module(forms[0].architecture, model.signature)
    module.load_state_dict(averaged, strict=True)
    return TorchForm(module=module.eval(), architecture=forms[0].architecture)


def _validation_slice(ctx: StepContext) -> tuple[np.ndarray, np.ndarray]:
    """A seeded share of the training split to choose the soup's members on; the evaluation
    split stays for the measurements and the gate."""
    count = len(ctx.data.train_y)
    size = max(_MIN_VALIDATION_EXAMPLES, round(count * VALIDATION_FRACTION))
    chosen = np.random.default_rng(ctx.seed).permutation(count)[:size]
    return ctx.data.train_x[chosen], ctx.data.train_y[chosen]


def _greedy_soup(
    forms: Sequence[TorchForm], names: Sequence[str], model: ModelUnderCompression, ctx: StepContext
) -> tuple[list[int], dict[str, float]]:
    x, y = _validation_slice(ctx)

    def accuracy(form: TorchForm) -> float:
        logits = predict_torch(form, x, preprocessing=model.preprocessing)
        return float(np.mean(logits.argmax(axis=1) == y))

    single = [accuracy(form) for form in forms]
    order = sorted(range(len(forms)), key=lambda i: -single[i])
    soup, soup_accuracy = [order[0]], single[order[0]]
    for candidate in order[1:]:
        trial = soup + [candidate]
        uniform = [1.0 / len(trial)] * len(trial)
        trial_accuracy = accuracy(_average([forms[i] for i in trial], uniform, model))
        if trial_accuracy >= soup_accuracy:
            soup, soup_accuracy = trial, trial_accuracy
    validation = {names[i]: single[i] for i in range(len(forms))}
    validation["soup"] = soup_accuracy
    return soup, validation
