"""The KServe-v2 domain without a Triton: streams from a decoupled model, summed statistics.

A decoupled model (several responses per request) cannot be deployed from the formats the
suite serves today, so its stream handling is tested here against a fake Triton stream that
answers as Triton does when asked to flag the last response.
"""

from __future__ import annotations

from collections import deque

from maas_inference.kserve import KServeViews
from maas_runtime.auth import ANONYMOUS_ADMIN
from tritonclient.grpc import service_pb2

from tests.inference.test_deployment_manager import (
    FakeTriton,
    TwoModelRegistry,
    manager,
    scoped,
)

FINAL = "triton_final_response"
ENABLE_FINAL = "triton_enable_empty_final_response"


class DecoupledStream:
    """Answers each request with two responses and Triton's empty flagged final one."""

    def __init__(self) -> None:
        self.sent: list[service_pb2.ModelInferRequest] = []
        self.pending: deque = deque()
        self.closed = False

    async def send(self, request) -> None:
        self.sent.append(request)
        for part in range(2):
            response = service_pb2.ModelStreamInferResponse()
            reply = response.infer_response
            reply.model_name, reply.id = request.model_name, request.id
            reply.outputs.add(name="logits", datatype="FP32", shape=[1, 1])
            reply.raw_output_contents.append(bytes([part]) * 4)
            reply.parameters[FINAL].bool_param = False
            self.pending.append(response)
        final = service_pb2.ModelStreamInferResponse()
        final.infer_response.id = request.id
        final.infer_response.parameters[FINAL].bool_param = True
        self.pending.append(final)

    async def receive(self):
        return self.pending.popleft()

    async def close(self) -> None:
        self.closed = True


class StreamingTriton(FakeTriton):
    def __init__(self) -> None:
        super().__init__()
        self.stream = DecoupledStream()
        self.statistics: dict[str, service_pb2.ModelStatisticsResponse] = {}

    def open_stream(self, *, timeout=None, metadata=None):
        return self.stream

    async def model_statistics(self, name: str) -> service_pb2.ModelStatisticsResponse:
        return self.statistics[name]


def request(request_id: str, *, ask_for_final: bool = False, model: str = "digits"):
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(bytes(4 * 64))
    if ask_for_final:
        message.parameters[ENABLE_FINAL].bool_param = True
    return message


async def requests(*messages):
    for message in messages:
        yield message


async def test_a_decoupled_models_responses_come_in_order_named_after_the_deployment(tmp_path):
    triton = StreamingTriton()
    served = manager(tmp_path, TwoModelRegistry(), triton)
    await served.controller.create("digits", {"model": "models/digits/versions/1"}, ANONYMOUS_ADMIN)
    answers = [response async for response in served.predictor.kserve_stream_infer(
        requests(request("a"), request("missing", model="ghost"),
                 request("b", ask_for_final=True)), None, ANONYMOUS_ADMIN)]

    assert [(r.infer_response.id, r.error_message != "") for r in answers] == [
        ("a", False), ("a", False), ("missing", True), ("b", False), ("b", False), ("b", False)]
    assert "ghost" in answers[2].error_message
    first, second = answers[0].infer_response, answers[1].infer_response
    assert (first.model_name, first.model_version) == ("digits", "1")
    assert FINAL not in first.parameters and FINAL not in second.parameters  # not asked for
    assert [r.infer_response.parameters[FINAL].bool_param for r in answers[3:]] == [
        False, False, True]  # asked for: passed on, the empty closing response included
    assert [m.model_name for m in triton.stream.sent] == ["digits.digits.v1"] * 2
    assert all(m.parameters[ENABLE_FINAL].bool_param for m in triton.stream.sent)
    assert triton.stream.closed
    await served.close()


def statistics(name: str, count: int, batch_sizes: dict[int, int]):
    stats = service_pb2.ModelStatistics(name=name, version="1", inference_count=count,
                                        execution_count=count, last_inference=count)
    stats.inference_stats.success.count = count
    stats.inference_stats.success.ns = 1000 * count
    for size, executions in batch_sizes.items():
        stats.batch_stats.add(batch_size=size).compute_infer.count = executions
    return service_pb2.ModelStatisticsResponse(model_stats=[stats])


async def test_statistics_are_summed_over_a_deployments_triton_models_and_scoped(tmp_path):
    triton = StreamingTriton()
    served = manager(tmp_path, TwoModelRegistry(), triton)
    split = {"model": "models/digits/versions/1", "traffic": [
        {"model_version": "models/digits/versions/1", "percent": 90},
        {"model_version": "models/digits/versions/2", "percent": 10}]}
    await served.controller.create("canary", split, ANONYMOUS_ADMIN)
    await served.controller.create("secret", {"model": "models/secret/versions/1"}, ANONYMOUS_ADMIN)
    triton.statistics = {"canary.digits.v1": statistics("canary.digits.v1", 5, {1: 3, 2: 1}),
                         "canary.digits.v2": statistics("canary.digits.v2", 2, {2: 1, 4: 1}),
                         "secret.secret.v1": statistics("secret.secret.v1", 9, {1: 9})}
    views = KServeViews(served.controller, served.routes, lambda: triton)

    [canary] = await views.model_statistics("canary", ANONYMOUS_ADMIN)
    assert (canary.name, canary.inference_count, canary.execution_count) == ("canary", 7, 7)
    assert canary.last_inference == 5
    assert (canary.inference_stats.success.count, canary.inference_stats.success.ns) == (7, 7000)
    assert {b.batch_size: b.compute_infer.count for b in canary.batch_stats} == {1: 3, 2: 2, 4: 1}

    everything = await views.model_statistics("", ANONYMOUS_ADMIN)
    assert [s.name for s in everything] == ["canary", "secret"]
    team = await views.model_statistics("", scoped("digits"))
    assert [s.name for s in team] == ["canary"]
    await served.close()
