"""Model scopes: which models' resources a token may see and touch, decided in one place.

A token may be scoped to some model ids (shell-style patterns, see `maas_runtime.auth`).
Every service asks these functions, never `Principal.model_scopes` directly:

- a resource named under a model (`models/{model}[@alias]/…`) is in scope when its model is;
  resources not named under a model (datasets, jobs, audit-only names) are shared;
- a resource that serves or trains several models (a deployment with its canary and shadow
  targets, a training job) is in scope only when **every** model it involves is: seeing it
  reveals all of them, and using it sends data to all of them.

An out-of-scope read by name is PERMISSION_DENIED with reason `MODEL_OUT_OF_SCOPE` (as the
registry has always answered), and a list leaves out-of-scope items out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from maas_runtime.auth import Principal

T = TypeVar("T")


def model_id_of(resource: str) -> str | None:
    """The model id a resource name or reference is under, or None when it is not a model's.

    `models/digits`, `models/digits@prod`, `models/digits/versions/3` → `digits`.
    """
    if not resource.startswith("models/"):
        return None
    return resource.split("/")[1].split("@")[0]


def may_see_models(principal: Principal, model_ids: Iterable[str]) -> bool:
    """Whether every one of `model_ids` is in the principal's scope."""
    return not principal.model_scopes or all(
        principal.may_access_model(model_id) for model_id in model_ids)


def require_models(principal: Principal, model_ids: Iterable[str]) -> None:
    """Raise PermissionDenied (MODEL_OUT_OF_SCOPE) naming the first model out of scope."""
    if principal.model_scopes:
        for model_id in sorted(set(model_ids)):
            principal.require_model(model_id)


def may_see_resource(principal: Principal, resource: str) -> bool:
    """Whether a resource name is in scope (names not under a model are shared)."""
    model_id = model_id_of(resource)
    return model_id is None or may_see_models(principal, (model_id,))


def visible(principal: Principal, items: Iterable[T],
            model_ids_of: Callable[[T], Iterable[str]]) -> list[T]:
    """The items whose every model is in the principal's scope, in their order."""
    items = list(items)
    if not principal.model_scopes:
        return items
    return [item for item in items if may_see_models(principal, model_ids_of(item))]
