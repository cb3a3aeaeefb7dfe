"""The one model-scope helper every service asks: names, all-of-them rule, list filtering."""

from __future__ import annotations

import pytest
from maas_runtime import errors, scopes
from maas_runtime.auth import ANONYMOUS_ADMIN, Principal, Role

TEAM = Principal("team", Role.EDITOR, ("digits", "mnist-*"))


@pytest.mark.parametrize(("resource", "model_id"), [
    ("models/digits", "digits"), ("models/digits@prod", "digits"),
    ("models/digits/versions/3", "digits"), ("models/digits/aliases/prod", "digits"),
    ("datasets/mnist", None), ("deployments/digits", None)])
def test_the_model_a_resource_is_under_comes_from_its_name(resource, model_id):
    assert scopes.model_id_of(resource) == model_id


def test_a_resource_serving_several_models_is_in_scope_only_when_every_one_is():
    assert scopes.may_see_models(TEAM, ["digits", "mnist-small"])
    assert not scopes.may_see_models(TEAM, ["digits", "secret"])
    assert scopes.may_see_models(ANONYMOUS_ADMIN, ["secret"])
    with pytest.raises(errors.PermissionDenied) as caught:
        scopes.require_models(TEAM, ["digits", "secret", "zzz"])
    assert caught.value.reason == "MODEL_OUT_OF_SCOPE" and "'secret'" in caught.value.message
    scopes.require_models(TEAM, ["mnist-large"])


def test_names_not_under_a_model_are_shared():
    assert scopes.may_see_resource(TEAM, "datasets/secret")
    assert scopes.may_see_resource(TEAM, "models/mnist-x/versions/1")
    assert not scopes.may_see_resource(TEAM, "models/secret@prod")


def test_lists_keep_only_visible_items_in_order():
    items = [["digits"], ["secret"], ["mnist-a", "digits"], ["mnist-a", "other"]]
    assert scopes.visible(TEAM, items, lambda models: models) == [["digits"], ["mnist-a", "digits"]]
    assert scopes.visible(ANONYMOUS_ADMIN, items, lambda models: models) == items
