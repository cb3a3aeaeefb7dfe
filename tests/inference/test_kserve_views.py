"""The KServe-v2 domain on real parts (the session's tritonserver, the registry in this
process): a stream of requests to a decoupled model, and statistics summed per deployment.

The decoupled model is the suite's own generation model serving the real SmolLM2 (the cached
bf16 fixture of tests/support/llm.py): each request gets one response per step of text, the
last flagged final by Triton when asked.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from maas_inference.kserve import KServeViews
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
from tests.support.llm import upload_smollm2
from tests.support.registry_server import registry_in_process

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

FINAL = "triton_final_response"
ENABLE_FINAL = "triton_enable_empty_final_response"
CANARY = {"model": "models/digits/versions/1", "traffic": [
    {"model_version": "models/digits/versions/1", "percent": 90},
    {"model_version": "models/digits/versions/2", "percent": 10}]}


def scoped(*patterns: str) -> Principal:
    return Principal("team", Role.EDITOR, patterns)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(tmp_path_factory, triton_client: TritonClient,
                 model_repository: ModelRepository) -> AsyncIterator[Deployments]:
    """ "canary" (digits v1 90 % / v2 10 %), "secret" and "decoupled" (SmolLM2), loaded
    in the session's Triton (under names of their own: the generation smoke deploys
    SmolLM2 there as "chat")."""
    root: Path = tmp_path_factory.mktemp("kserve-views")
    async with registry_in_process(root) as registry:
        await upload_mlps(registry.target, registry.token,
                          [("digits", 1), ("digits", 2), ("secret", 1)])
        chat_version = await upload_smollm2(registry.target, registry.token)
        async with deployments_on(root, registry.target, registry.token, triton_client,
                                  model_repository) as deployments:
            try:
                await asyncio.gather(
                    deployments.controller.create("canary", CANARY, ANONYMOUS_ADMIN),
                    deployments.controller.create(
                        "secret", {"model": "models/secret/versions/1"}, ANONYMOUS_ADMIN),
                    deployments.controller.create("decoupled", {"model": chat_version},
                                                  ANONYMOUS_ADMIN))
                yield deployments
            finally:
                await delete_every_deployment(deployments)


def generation_request(request_id: str, *, ask_for_final: bool = False,
                       model: str = "decoupled",
                       **sampling) -> service_pb2.ModelInferRequest:
    """A KServe-v2 request to the generation model (BYTES tensors: length-prefixed)."""
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in (("text_input", b"1, 2, 3, 4,"),
                        ("sampling_parameters", json.dumps(sampling).encode())):
        message.inputs.add(name=name, datatype="BYTES", shape=[1])
        message.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    if ask_for_final:
        message.parameters[ENABLE_FINAL].bool_param = True
    return message


async def requests(*messages):
    for message in messages:
        yield message


async def test_a_decoupled_models_responses_come_in_order_named_after_the_deployment(served):
    greedy = {"max_tokens": 4, "temperature": 0}
    answers = [response async for response in served.predictor.kserve_stream_infer(
        requests(generation_request("a", **greedy),
                 generation_request("missing", model="ghost", **greedy),
                 generation_request("bad", temperature=-1),
                 generation_request("b", ask_for_final=True, **greedy)),
        120, ANONYMOUS_ADMIN)]

    ids = [r.infer_response.id for r in answers]
    a_count, b_count = ids.count("a"), ids.count("b")
    assert a_count >= 2, ids  # several responses to one request: a decoupled model
    assert ids == ["a"] * a_count + ["missing", "bad"] + ["b"] * b_count  # one after another
    errors_by_id = {r.infer_response.id: r.error_message for r in answers if r.error_message}
    assert set(errors_by_id) == {"missing", "bad"}  # answered in the stream, which goes on
    assert "ghost" in errors_by_id["missing"]
    assert "temperature" in errors_by_id["bad"]  # the model's own error
    a_answers = answers[:a_count]
    assert {(r.infer_response.model_name, r.infer_response.model_version)
            for r in a_answers} == {("decoupled", "1")}
    assert not any(FINAL in r.infer_response.parameters for r in a_answers)  # not asked for
    b_answers = answers[-b_count:]
    assert [r.infer_response.parameters[FINAL].bool_param for r in b_answers] == \
        [False] * (b_count - 1) + [True]  # asked for: passed on, on the last response only
    assert {r.infer_response.model_name for r in b_answers} == {"decoupled"}


async def infer_on(served: Deployments, version: str, rows: int, seed: int) -> None:
    """One KServe-v2 infer on "canary" whose request id routes it to `version`."""
    route = served.routes.live("canary").route
    request_id = next(f"{version}-{rows}-{seed}-{n}" for n in range(10_000)
                      if route.pick(f"{version}-{rows}-{seed}-{n}").version == version)
    request = service_pb2.ModelInferRequest(model_name="canary", id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=[rows, 64])
    data = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    request.raw_input_contents.append(data.tobytes())
    reply = await served.predictor.kserve_infer(request, 30, ANONYMOUS_ADMIN)
    assert (reply.model_name, reply.model_version) == ("canary", version.rsplit("/", 1)[-1])


async def executions(triton: TritonClient, name: str) -> int:
    return sum(s.execution_count for s in (await triton.model_statistics(name)).model_stats)


async def test_statistics_are_summed_over_a_deployments_triton_models_and_scoped(
        served, triton_client):
    sent = {"models/digits/versions/1": [1, 1, 1, 2], "models/digits/versions/2": [2, 4]}
    for version, batches in sent.items():
        for seed, rows in enumerate(batches):  # one at a time: one execution each
            await infer_on(served, version, rows, seed)
    for version, batches in sent.items():  # Triton counts an execution once it has answered
        name = f"canary.digits.v{version[-1]}"
        for _ in range(100):
            if await executions(triton_client, name) == len(batches):
                break
            await asyncio.sleep(0.05)
    parts = [(await triton_client.model_statistics(name)).model_stats[0]
             for name in ("canary.digits.v1", "canary.digits.v2")]
    views = KServeViews(served.controller, served.routes, lambda: triton_client)

    [canary] = await views.model_statistics("canary", ANONYMOUS_ADMIN)
    assert (canary.name, canary.inference_count, canary.execution_count) == ("canary", 11, 6)
    assert canary.last_inference == max(p.last_inference for p in parts) > 0
    assert (canary.inference_stats.success.count, canary.inference_stats.success.ns) == (
        6, sum(p.inference_stats.success.ns for p in parts))
    assert canary.inference_stats.compute_infer.ns == sum(
        p.inference_stats.compute_infer.ns for p in parts)
    assert {b.batch_size: b.compute_infer.count for b in canary.batch_stats} == {1: 3, 2: 2, 4: 1}

    everything = await views.model_statistics("", ANONYMOUS_ADMIN)
    assert [s.name for s in everything] == ["canary", "decoupled", "secret"]
    team = await views.model_statistics("", scoped("digits"))
    assert [s.name for s in team] == ["canary"]
    with pytest.raises(errors.PermissionDenied):
        await views.model_statistics("secret", scoped("digits"))
