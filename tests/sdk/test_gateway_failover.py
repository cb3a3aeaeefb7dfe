"""The SDK over several gateway replicas: round-robin over the healthy ones, idempotent calls
sent again to the next replica on UNAVAILABLE (bounded, with backoff), writes never repeated,
a job's Watch stream resumed on the next replica after its last event, and a generation
repeated on the next replica only while none of its text reached the caller.

The replicas are real gRPC servers on loopback (the inference service's contract and the
stock health service), each answering Predict with its own name as the model version and
counting the calls it got; the scale drill (tests/drills/test_scale_drill.py) does the same
against the real services under kill -9.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import maas
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from maas.common.v1 import job_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.trainer.v1 import trainer_service_pb2_grpc, training_job_pb2 as tj
from maas_runtime.discovery import StaticDiscovery
from maas_sdk.retries import RetryPolicy, is_idempotent

ROWS = {"input": np.ones((1, 4), np.float32)}
FAST_RETRIES = RetryPolicy(max_attempts=4, initial_backoff_seconds=0.01, max_backoff_seconds=0.05)


class Gateway(inference_service_pb2_grpc.InferenceServiceServicer):
    """One replica: answers Predict and GetDeployment with its name, or UNAVAILABLE when told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: Counter[str] = Counter()
        self.unavailable = False
        self.chunks_before_failing = 0
        self.health = health.HealthServicer()
        self.health.set("inference", health_pb2.HealthCheckResponse.SERVING)
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serving(self, serving: bool) -> None:
        self.health.set("inference", health_pb2.HealthCheckResponse.SERVING if serving
                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _answer(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is going away")

    def Predict(self, request, context):  # noqa: N802 - the contract's name
        self._answer("Predict", context)
        return inf.PredictResponse(model_version=self.name)

    def GetDeployment(self, request, context):  # noqa: N802
        self._answer("GetDeployment", context)
        return deployment_pb2.Deployment(name=request.name, message=self.name)

    def CreateDeployment(self, request, context):  # noqa: N802
        self._answer("CreateDeployment", context)
        return deployment_pb2.Deployment(name=f"deployments/{request.deployment_id}")

    def Generate(self, request, context):  # noqa: N802
        """Two chunks naming the replica, then the end; while `unavailable`, the stream is
        cut UNAVAILABLE after `chunks_before_failing` chunks."""
        self.calls["Generate"] += 1
        for index in range(2):
            if self.unavailable and index == self.chunks_before_failing:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is going away")
            yield inf.GenerateResponse(delta=inf.TextDelta(text=f"{self.name}{index} "))
        yield inf.GenerateResponse(final=inf.GenerationFinal(finish_reason=inf.FINISH_REASON_STOP))


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    replicas = [Gateway("a"), Gateway("b")]
    yield replicas
    for replica in replicas:
        replica.server.stop(None)


def client_over(replicas: list[Gateway], **options) -> maas.Client:
    return maas.Client(targets={"inference": ",".join(r.target for r in replicas)},
                       token="t", retry=FAST_RETRIES, timeout=5, **options)


def answered_by(client: maas.Client, calls: int) -> Counter[str]:
    return Counter(client.predict_detailed("d", ROWS).model_version for _ in range(calls))


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_predictions_go_round_robin_over_serving_gateways_and_a_not_serving_one_is_skipped(
        gateways):
    with client_over(gateways) as client:
        wait_until(lambda: len(answered_by(client, 4)) == 2)  # both connected
        assert answered_by(client, 20) == {"a": 10, "b": 10}
        gateways[0].serving(False)  # the health Watch stream tells its channel at once
        wait_until(lambda: answered_by(client, 4) == {"b": 4})
        assert answered_by(client, 20) == {"b": 20}
        gateways[0].serving(True)  # it rejoins
        wait_until(lambda: answered_by(client, 4)["a"] > 0)
        assert answered_by(client, 20) == {"a": 10, "b": 10}


def test_a_gateway_failing_or_stopped_under_load_costs_no_prediction(gateways):
    failures: list[Exception] = []
    answers: Counter[str] = Counter()
    stop = threading.Event()

    with client_over(gateways) as client:
        def load() -> None:
            while not stop.is_set():
                try:
                    answers[client.predict_detailed("d", ROWS).model_version] += 1
                except Exception as error:  # noqa: BLE001 - every failure is the finding
                    failures.append(error)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        gateways[0].unavailable = True  # answers UNAVAILABLE (its Triton died, say)
        time.sleep(0.5)
        gateways[0].server.stop(None)  # then goes away
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert answers["a"] > 0 and answers["b"] > 0
    assert gateways[0].calls["Predict"] > answers["a"]  # it did fail calls, and they were retried


def test_retries_are_bounded_and_writes_are_never_repeated(gateways):
    for replica in gateways:
        replica.unavailable = True
    with client_over(gateways) as client:
        with pytest.raises(maas.Unavailable, match="going away"):
            client.predict("d", ROWS)
        assert sum(r.calls["Predict"] for r in gateways) == FAST_RETRIES.max_attempts
        with pytest.raises(maas.Unavailable):
            client.get_deployment("d")
        assert sum(r.calls["GetDeployment"] for r in gateways) == FAST_RETRIES.max_attempts
        with pytest.raises(maas.Unavailable):
            client.deploy("d", "m@production")
        assert sum(r.calls["CreateDeployment"] for r in gateways) == 1
    with maas.Client(targets={"inference": gateways[0].target}, token="t",
                     retry=RetryPolicy(max_attempts=1)) as single:
        with pytest.raises(maas.Unavailable):
            single.predict("d", ROWS)
    assert gateways[0].calls["Predict"] + gateways[1].calls["Predict"] == (
        FAST_RETRIES.max_attempts + 1)


def test_gateways_found_through_discovery_are_retried_the_same_way(gateways):
    gateways[0].unavailable = True
    discovery = StaticDiscovery({"inference": [r.target for r in gateways]})
    with maas.Client(discovery=discovery, token="t", retry=FAST_RETRIES, timeout=5) as client:
        assert {client.predict_detailed("d", ROWS).model_version for _ in range(10)} == {"b"}
        assert {client.get_deployment("d").message for _ in range(10)} == {"b"}
    assert gateways[0].calls["Predict"] > 0 and gateways[0].calls["GetDeployment"] > 0


def test_only_reads_and_predict_are_idempotent_and_the_policy_is_checked():
    assert all(map(is_idempotent, ("Predict", "GetModelVersion", "ListDeployments",
                                    "WatchTrainingJob")))
    assert not any(map(is_idempotent, ("CreateTrainingJob", "UpdateDeployment",
                                       "DeleteModel", "UploadModelVersion", "SetModelAlias",
                                       "CancelTrainingJob", "StreamPredict")))
    policy = RetryPolicy(max_attempts=5, initial_backoff_seconds=0.1, max_backoff_seconds=0.3)
    assert 0.05 <= policy.backoff_seconds(1) <= 0.1
    assert 0.15 <= policy.backoff_seconds(4) <= 0.3  # capped
    unavailable, invalid = maas.Unavailable("gone"), maas.InvalidArgument("bad input")
    assert policy.should_retry("Predict", unavailable, 4)
    assert policy.should_retry("GetModel", maas.Cancelled("a replica shutting down"), 1)
    assert not policy.should_retry("Predict", unavailable, 5)
    assert not policy.should_retry("Predict", invalid, 1)
    assert not policy.should_retry("CreateDeployment", unavailable, 1)
    for bad in ({"max_attempts": 0}, {"initial_backoff_seconds": 2.0},
                {"backoff_multiplier": 0.5}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_streams_are_repeated_only_as_far_as_the_caller_cannot_tell():
    policy = RetryPolicy(max_attempts=3)
    unavailable = maas.Unavailable("gone")
    for download in ("DownloadModelVersion", "DownloadDatasetVersion"):  # resumed at their byte
        assert is_idempotent(download) and policy.should_retry(download, unavailable, 2)
    assert not is_idempotent("Generate")
    assert policy.should_retry("Generate", unavailable, 1)
    assert policy.should_retry("Generate", maas.Cancelled("a gateway shutting down"), 2)
    assert not policy.should_retry("Generate", unavailable, 1, output_delivered=True)
    assert not policy.should_retry("Generate", unavailable, 3)
    assert not policy.should_retry("Generate", maas.InvalidArgument("bad prompt"), 1)


def test_a_generation_is_repeated_on_the_next_gateway_only_before_its_first_text(gateways):
    with client_over(gateways) as client:
        wait_until(lambda: {client.get_deployment("d").message for _ in range(4)} == {"a", "b"})
        gateways[0].unavailable = True  # cuts every stream before its first chunk
        assert [client.generate("d", "hi").text() for _ in range(4)] == ["b0 b1 "] * 4
        assert gateways[0].calls["Generate"] > 0  # tried, and repeated on the other

        for replica in gateways:  # now every stream is cut after its first chunk
            replica.unavailable, replica.chunks_before_failing = True, 1
        calls_before = sum(replica.calls["Generate"] for replica in gateways)
        generation = client.generate("d", "hi")
        chunks = iter(generation)
        assert next(chunks) in ("a0 ", "b0 ")
        with pytest.raises(maas.Unavailable, match="cannot be replayed") as cut_short:
            next(chunks)
    assert cut_short.value.reason == "GENERATION_INTERRUPTED"
    assert "going away" in cut_short.value.message
    assert sum(replica.calls["Generate"] for replica in gateways) == calls_before + 1


class TrainerReplica(trainer_service_pb2_grpc.TrainerServiceServicer):
    """One trainer replica over a job shared with the others (`job`): its Watch streams every
    event after the one asked for, except that the job's first Watch is cut after sequence 2
    with UNAVAILABLE, as a replica killed mid-stream cuts it."""

    def __init__(self, job: SharedJob) -> None:
        self.job = job
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(self, self.server)
        health_servicer = health.HealthServicer()
        health_servicer.set("trainer", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def GetTrainingJob(self, request, context):  # noqa: N802 - the contract's name
        return tj.TrainingJob(name=request.name, spec=tj.TrainingSpec(epochs=3), state=(
            job_pb2.JOB_STATE_SUCCEEDED if self.job.finished.is_set()
            else job_pb2.JOB_STATE_RUNNING))

    def WatchTrainingJob(self, request, context):  # noqa: N802
        self.job.watches.append((self.target, request.after_sequence))
        first = len(self.job.watches) == 1
        for event in self.job.events[request.after_sequence:]:
            if first and event.sequence > 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
            yield event
        self.job.finished.set()


@dataclass
class SharedJob:
    """A running job as every trainer replica sees it (their shared table)."""

    events: list[job_pb2.JobEvent]
    finished: threading.Event = field(default_factory=threading.Event)
    watches: list[tuple[str, int]] = field(default_factory=list)
    """(replica, after_sequence) of every Watch call."""


def test_waiting_on_a_job_resumes_on_the_other_replica_after_the_last_event():
    events = [job_pb2.JobEvent(sequence=1, state_change=job_pb2.StateChange(
        state=job_pb2.JOB_STATE_RUNNING))]
    events += [job_pb2.JobEvent(sequence=1 + epoch, metrics=job_pb2.MetricsReport(
        epoch=epoch, phase="val", values={"accuracy": 0.5})) for epoch in (1, 2, 3)]
    events.append(job_pb2.JobEvent(sequence=5, state_change=job_pb2.StateChange(
        state=job_pb2.JOB_STATE_SUCCEEDED)))
    job = SharedJob(events)
    replicas = [TrainerReplica(job), TrainerReplica(job)]
    seen: list[int] = []
    try:
        with maas.Client(targets={"trainer": ",".join(r.target for r in replicas)}, token="t",
                         retry=FAST_RETRIES, timeout=5) as client:
            final = client.wait("trainingJobs/j", lambda update: seen.append(update.epoch))
    finally:
        for replica in replicas:
            replica.server.stop(None)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED
    assert seen == [0, 1, 2, 3, 0]  # every event once, none repeated across the replicas
    (cut, first_after), (resumed, resumed_after) = job.watches
    assert (first_after, resumed_after) == (0, 2) and resumed != cut
