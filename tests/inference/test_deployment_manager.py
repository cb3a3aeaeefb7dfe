"""The deployment controller and predictor as domain objects on real parts: the session's
tritonserver, the registry service in this process, a SQLite deployment table.

Covers what the end-to-end tests do not stage: a restart while the registry is down must not
fail the deployment (it is retried until the registry is back); a model Triton has lost is
UNAVAILABLE, not NOT_FOUND; a scoped token sees exactly the deployments whose every model
(canary and shadow targets included) is in its scope, in reads and in full list pages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from maas.common.v1 import tensor_pb2
from maas_inference.triton import TritonClient
from maas_inference.triton.model_repository import ModelRepository
from maas_runtime import errors
from maas_runtime.auth import ANONYMOUS_ADMIN, Principal, Role
from tritonclient.grpc import service_pb2

from tests.inference.deployment_domain import (
    Deployments,
    delete_every_deployment,
    deployments_on,
    upload_mlps,
)
from tests.support.processes import free_port
from tests.support.registry_server import registry_in_process

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

SPLIT = {"model": "models/digits/versions/1", "traffic": [
    {"model_version": "models/digits/versions/1", "percent": 90},
    {"model_version": "models/secret/versions/2", "percent": 10}]}
SHADOWED = {"model": "models/digits/versions/1",
            "shadow": {"model_version": "models/secret/versions/1", "percent": 10}}
SCOPED_DEPLOYMENTS = {"a-digits": {"model": "models/digits/versions/1"},
                      "b-secret": {"model": "models/secret/versions/1"},
                      "c-shadowed": SHADOWED, "d-split": SPLIT,
                      "e-digits": {"model": "models/digits/versions/2"}}


def scoped(*patterns: str) -> Principal:
    return Principal("team", Role.EDITOR, patterns)


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (rows, 64)).astype(np.float32)


def predict_inputs(data: np.ndarray) -> list[tensor_pb2.Tensor]:
    return [tensor_pb2.Tensor(name="features", datatype=tensor_pb2.DATA_TYPE_FP32,
                              shape=list(data.shape), raw_data=data.tobytes())]


async def until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def scoped_deployments(tmp_path_factory, triton_client: TritonClient,
                             model_repository: ModelRepository
                             ) -> AsyncIterator[Deployments]:
    """Five deployments, loaded in the session's Triton, over models/digits and models/secret
    (a shadow or canary target counts as a model the deployment serves)."""
    root: Path = tmp_path_factory.mktemp("scoped-deployments")
    async with registry_in_process(root) as registry:
        await upload_mlps(registry.target, registry.token,
                          [("digits", 1), ("digits", 2), ("secret", 1), ("secret", 2)])
        async with deployments_on(root, registry.target, registry.token, triton_client,
                                  model_repository) as served:
            try:
                await asyncio.gather(*(
                    served.controller.create(deployment_id, fields, ANONYMOUS_ADMIN)
                    for deployment_id, fields in SCOPED_DEPLOYMENTS.items()))
                yield served
            finally:
                await delete_every_deployment(served)


async def test_restart_during_a_registry_outage_retries_until_it_answers(
        tmp_path, triton_client, model_repository):
    port = free_port()
    async with registry_in_process(tmp_path, port) as registry:
        references = await upload_mlps(registry.target, registry.token, [("digits", 1)])
        async with deployments_on(tmp_path, registry.target, registry.token, triton_client,
                                  model_repository) as first:
            await first.controller.create("outage", {"model": "models/digits/versions/1"},
                                          ANONYMOUS_ADMIN)
    # The service is down and its Triton lost the model (as after a restart of both); the
    # registry is down too.
    await triton_client.unload_model("outage.digits.v1")
    await until_unloaded(triton_client, "outage.digits.v1")

    async with deployments_on(tmp_path, registry.target, registry.token, triton_client,
                              model_repository) as restarted:
        try:
            await restarted.controller.reload_all()
            with pytest.raises(errors.Unavailable):  # known but not loaded: retry, not NOT_FOUND
                await restarted.predictor.predict("deployments/outage", "", [], [], None,
                                                  ANONYMOUS_ADMIN)
            waiting = restarted.controller.replica_loads()["outage"]
            assert (waiting.state, waiting.message.startswith("reload waits 0.5s")) == (
                "DEPLOYMENT_STATE_UNAVAILABLE", True), waiting
            # Retried while the registry is still down, each time waiting longer.
            await until(lambda: restarted.controller.replica_loads()["outage"].message
                        .startswith("reload waits 1.0s"), 10)
            assert restarted.routes.get("outage") is None

            async with registry_in_process(tmp_path, port):  # the registry is back
                await until(lambda: restarted.routes.get("outage") is not None, 60)
            assert await triton_client.is_model_ready("outage.digits.v1")
            assert restarted.controller.replica_loads()["outage"].state == \
                "DEPLOYMENT_STATE_READY"
            view = await restarted.controller.get("deployments/outage", ANONYMOUS_ADMIN)
            assert view["state"] == "DEPLOYMENT_STATE_READY"
            data = features(3)
            prediction = await restarted.predictor.predict(
                "deployments/outage", "", predict_inputs(data), [], 30, ANONYMOUS_ADMIN)
            logits = prediction.response.outputs[0]
            np.testing.assert_allclose(
                np.frombuffer(prediction.response.raw_output_contents[0], np.float32)
                .reshape(tuple(logits.shape)),
                references["models/digits/versions/1"](data), rtol=1e-4, atol=1e-4)
            with pytest.raises(errors.NotFound):
                await restarted.predictor.predict("deployments/ghost", "", [], [], None,
                                                  ANONYMOUS_ADMIN)
        finally:
            await delete_every_deployment(restarted)


async def until_unloaded(triton: TritonClient, name: str) -> None:
    """Triton unloads in the background after answering the request to."""
    for _ in range(200):
        try:
            if not await triton.is_model_ready(name):
                return
        except errors.NotFound:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} still loaded")


async def test_a_model_triton_lost_is_unavailable_not_not_found(
        scoped_deployments, triton_client):
    """Between a Triton restart and the reload, Triton answers "unknown model" for a
    deployment that exists; callers must hear UNAVAILABLE (retry), never NOT_FOUND."""
    served = scoped_deployments
    await served.controller.create("lost", {"model": "models/digits/versions/1"},
                                   ANONYMOUS_ADMIN)
    try:
        await triton_client.unload_model("lost.digits.v1")  # Triton no longer has it
        await until_unloaded(triton_client, "lost.digits.v1")
        request = service_pb2.ModelInferRequest(model_name="lost")
        request.inputs.add(name="features", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(features(1).tobytes())
        with pytest.raises(errors.Unavailable) as caught:
            await served.predictor.kserve_infer(request, 30, ANONYMOUS_ADMIN)
        assert caught.value.reason == "MODEL_NOT_LOADED"
        with pytest.raises(errors.Unavailable) as caught:
            await served.predictor.predict("deployments/lost", "", predict_inputs(features(2)),
                                           [], 30, ANONYMOUS_ADMIN)
        assert caught.value.reason == "MODEL_NOT_LOADED"
    finally:
        await served.controller.delete("deployments/lost", ANONYMOUS_ADMIN)


async def test_a_scoped_token_sees_only_deployments_whose_every_model_is_in_scope(
        scoped_deployments):
    served = scoped_deployments
    team = scoped("digits")

    assert (await served.controller.get("deployments/a-digits", team))["name"] == \
        "deployments/a-digits"
    for hidden in ("b-secret", "c-shadowed", "d-split"):  # a canary or shadow target counts
        with pytest.raises(errors.PermissionDenied) as caught:
            await served.controller.get(f"deployments/{hidden}", team)
        assert caught.value.reason == "MODEL_OUT_OF_SCOPE"
        with pytest.raises(errors.PermissionDenied):
            served.controller.require_visible(hidden, team)
        with pytest.raises(errors.PermissionDenied):  # nor served to it
            await served.predictor.predict(f"deployments/{hidden}", "",
                                           predict_inputs(features(1)), [], 30, team)
    with pytest.raises(errors.NotFound):  # a missing one is NOT_FOUND, as for anyone
        await served.controller.get("deployments/ghost", team)
    served.controller.require_visible("e-digits", team)
    prediction = await served.predictor.predict("deployments/e-digits", "",
                                                predict_inputs(features(1)), [], 30, team)
    assert prediction.version == "models/digits/versions/2"

    visible = [d["name"] for d in await served.controller.visible(team)]
    assert visible == ["deployments/a-digits", "deployments/e-digits"]
    assert len(await served.controller.visible(ANONYMOUS_ADMIN)) == 5
    assert [d["name"] for d in await served.controller.visible(scoped("other"))] == []


async def test_listing_with_a_scoped_token_fills_every_page_and_ends_exactly(
        scoped_deployments):
    served = scoped_deployments
    team = scoped("digit*")
    pages, token = [], ""
    while True:  # three hidden deployments lie between the two visible ones
        items, token = await served.controller.list(1, token, team)
        pages.append([d["name"] for d in items])
        if not token:
            break
    assert pages == [["deployments/a-digits"], ["deployments/e-digits"]]
    items, token = await served.controller.list(2, "", team)
    assert ([d["name"] for d in items], token) == (
        ["deployments/a-digits", "deployments/e-digits"], "")

    everything, token = await served.controller.list(5, "", ANONYMOUS_ADMIN)
    assert len(everything) == 5 and token == ""
    _, admin_token = await served.controller.list(2, "", ANONYMOUS_ADMIN)
    with pytest.raises(errors.InvalidArgument):  # a token is bound to the scope it was for
        await served.controller.list(2, admin_token, team)
