"""The deployment controller and predictor as domain objects: fake registry and Triton, real
store and repository.

Covers what the end-to-end tests cannot stage cheaply: a restart while the registry is
unreachable must not fail the deployment; it is retried until the registry answers.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import pytest
from maas_inference.controller import DeploymentController, ServingDefaults
from maas_inference.predictor import Predictor
from maas_inference.routing import RouteTable
from maas_inference.store import SqliteDeploymentStore
from maas_inference.triton.model_repository import ModelRepository
from maas_runtime import errors
from maas_runtime.auth import ANONYMOUS_ADMIN, Principal, Role
from maas_runtime.pagination import PageTokenCodec

VERSION = {
    "name": "models/digits/versions/1", "format": "MODEL_FORMAT_MAAS_PACKAGE",
    "artifact": {"sha256": "a" * 64, "size_bytes": 3},
    "signature": {"inputs": [{"name": "input", "datatype": "DATA_TYPE_FP32", "shape": [64]}],
                  "outputs": [{"name": "logits", "datatype": "DATA_TYPE_FP32", "shape": [10]}]},
}


class FlakyRegistry:
    """Answers after `outages` calls have failed with UNAVAILABLE."""

    def __init__(self, outages: int = 0):
        self.outages = outages
        self.calls = 0

    async def resolve(self, reference: str) -> dict:
        self.calls += 1
        if self.outages:
            self.outages -= 1
            raise errors.Unavailable("registry is down")
        return VERSION

    async def download_model_version(self, version: dict, destination) -> None:
        destination.write_bytes(b"abc")

    async def alias_changes(self):
        await asyncio.Event().wait()
        yield ""


class FakeTriton:
    def __init__(self):
        self.loaded: set[str] = set()

    async def load_model(self, name: str) -> None:
        self.loaded.add(name)

    async def wait_model_ready(self, name: str, timeout: float) -> None:
        assert name in self.loaded

    async def unload_model(self, name: str) -> None:
        self.loaded.discard(name)

    async def infer_request(self, request, *, timeout=None, metadata=None):
        raise AssertionError("these tests send no inference requests")


class Deployments(NamedTuple):
    """The controller and the predictor wired to one route table, as the server wires them."""

    controller: DeploymentController
    predictor: Predictor
    routes: RouteTable

    async def close(self) -> None:
        await self.predictor.close()
        await self.controller.close()


def manager(tmp_path, registry, triton) -> Deployments:
    store = SqliteDeploymentStore(tmp_path / "deployments.db")
    routes = RouteTable(store.get, lambda: True)
    controller = DeploymentController(
        store, registry, triton, ModelRepository(tmp_path / "models"), tmp_path / "artifacts",
        ServingDefaults(), routes, PageTokenCodec(b"k" * 32))
    return Deployments(controller, Predictor(routes, triton), routes)


async def test_restart_during_a_registry_outage_retries_until_it_answers(tmp_path):
    first = manager(tmp_path, FlakyRegistry(), FakeTriton())
    await first.controller.create("digits", {"model": "models/digits/versions/1"}, ANONYMOUS_ADMIN)
    await first.close()

    registry, triton = FlakyRegistry(outages=2), FakeTriton()
    restarted = manager(tmp_path, registry, triton)
    await restarted.controller.reload_all()
    with pytest.raises(errors.Unavailable):  # known but not loaded yet: retry, not NOT_FOUND
        await restarted.predictor.predict("deployments/digits", "", [], [], None, ANONYMOUS_ADMIN)
    for _ in range(100):
        if triton.loaded:
            break
        await asyncio.sleep(0.1)
    assert triton.loaded == {"digits.digits.v1"} and registry.calls == 3
    view = await restarted.controller.get("deployments/digits", ANONYMOUS_ADMIN)
    assert view["state"] == "DEPLOYMENT_STATE_READY"
    with pytest.raises(errors.NotFound):
        await restarted.predictor.predict("deployments/ghost", "", [], [], None, ANONYMOUS_ADMIN)
    await restarted.close()


async def test_a_model_triton_lost_is_unavailable_not_not_found(tmp_path):
    """Between a Triton restart and the reload, Triton answers "unknown model" for a
    deployment that exists; callers must hear UNAVAILABLE (retry), never NOT_FOUND."""
    from maas_inference.triton.client import TritonModelNotFound
    from tritonclient.grpc import service_pb2

    class ForgetfulTriton(FakeTriton):
        async def infer_request(self, request, *, timeout=None, metadata=None):
            self.loaded.clear()  # as after a kill -9 and a restart that has not reloaded yet
            raise TritonModelNotFound(request.model_name, "Request for unknown model")

    served = manager(tmp_path, FlakyRegistry(), ForgetfulTriton())
    await served.controller.create("digits", {"model": "models/digits/versions/1"}, ANONYMOUS_ADMIN)
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(bytes(4 * 64))
    with pytest.raises(errors.Unavailable) as caught:
        await served.predictor.kserve_infer(request, None, ANONYMOUS_ADMIN)
    assert caught.value.reason == "MODEL_NOT_LOADED"
    await served.close()


class TwoModelRegistry(FlakyRegistry):
    """Resolves any `models/{model}/versions/{n}` to a servable version of that name."""

    async def resolve(self, reference: str) -> dict:
        return {**VERSION, "name": reference}


def scoped(*patterns: str) -> Principal:
    return Principal("team", Role.EDITOR, patterns)


async def test_a_scoped_token_sees_only_deployments_whose_every_model_is_in_scope(tmp_path):
    served = manager(tmp_path, TwoModelRegistry(), FakeTriton())
    shadowed = {"model": "models/digits/versions/1",
                "shadow": {"model_version": "models/secret/versions/1", "percent": 10}}
    split = {"model": "models/digits/versions/1", "traffic": [
        {"model_version": "models/digits/versions/1", "percent": 90},
        {"model_version": "models/secret/versions/2", "percent": 10}]}
    for deployment_id, fields in [("a-digits", {"model": "models/digits/versions/1"}),
                                  ("b-secret", {"model": "models/secret/versions/1"}),
                                  ("c-shadowed", shadowed), ("d-split", split),
                                  ("e-digits", {"model": "models/digits/versions/2"})]:
        await served.controller.create(deployment_id, fields, ANONYMOUS_ADMIN)
    team = scoped("digits")

    assert (await served.controller.get("deployments/a-digits", team))["name"] == "deployments/a-digits"
    for hidden in ("b-secret", "c-shadowed", "d-split"):  # a canary or shadow target counts
        with pytest.raises(errors.PermissionDenied) as caught:
            await served.controller.get(f"deployments/{hidden}", team)
        assert caught.value.reason == "MODEL_OUT_OF_SCOPE"
        with pytest.raises(errors.PermissionDenied):
            served.controller.require_visible(hidden, team)
    with pytest.raises(errors.NotFound):  # a missing one is NOT_FOUND, as for anyone
        await served.controller.get("deployments/ghost", team)
    served.controller.require_visible("e-digits", team)

    visible = [d["name"] for d in await served.controller.visible(team)]
    assert visible == ["deployments/a-digits", "deployments/e-digits"]
    assert len(await served.controller.visible(ANONYMOUS_ADMIN)) == 5
    assert [d["name"] for d in await served.controller.visible(scoped("other"))] == []
    await served.close()


async def test_listing_with_a_scoped_token_fills_every_page_and_ends_exactly(tmp_path):
    served = manager(tmp_path, TwoModelRegistry(), FakeTriton())
    for index in range(9):  # digits every third id, secret in between
        model = "digits" if index % 3 == 0 else "secret"
        await served.controller.create(f"d{index}", {"model": f"models/{model}/versions/1"},
                            ANONYMOUS_ADMIN)
    team = scoped("digit*")
    pages, token = [], ""
    while True:
        items, token = await served.controller.list(2, token, team)
        pages.append([d["name"] for d in items])
        if not token:
            break
    assert pages == [["deployments/d0", "deployments/d3"], ["deployments/d6"]]

    everything, token = await served.controller.list(9, "", ANONYMOUS_ADMIN)
    assert len(everything) == 9 and token == ""
    _, admin_token = await served.controller.list(2, "", ANONYMOUS_ADMIN)
    with pytest.raises(errors.InvalidArgument):  # a token is bound to the scope it was for
        await served.controller.list(2, admin_token, team)
    await served.close()
