"""Reflection-driven hostile requests to every RPC of every service, seeded and bounded.

Each running service is asked through gRPC reflection which services it offers and what
their methods take; every method of every service (streaming ones included, and the
standard KServe-v2 `inference.GRPCInferenceService` of the inference service) then gets
REQUESTS_PER_METHOD random hostile requests, some without a token or with a wrong one.

Passes only when no answer is UNKNOWN or INTERNAL, no call outlives its deadline, every
service still answers SERVING on grpc.health.v1 afterwards, and nothing the services logged
is an unhandled error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.fuzz.hostile import HostileMessages

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

SEED = int(os.environ.get("MAAS_FUZZ_SEED", "20261130"))
"""Fixed, so a failure reproduces; set MAAS_FUZZ_SEED to explore other requests."""
REQUESTS_PER_METHOD = 50
CONCURRENCY = 8
CALL_TIMEOUT_SECONDS = 10.0
"""Deadline of every call. Ending with DEADLINE_EXCEEDED is an answer (a create that loads a
model into Triton may take that long under this load); no answer GRACE_SECONDS after the
deadline is a hang."""
GRACE_SECONDS = 5.0
OPEN_ENDED_TIMEOUT_SECONDS = 1.0
"""Watch streams never end on their own: they are read until this deadline."""
MAX_STREAM_READS = 20
WHOLE_RUN_SECONDS = 150.0
NOT_INFRASTRUCTURE = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
FORBIDDEN_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
HANG = "HANG"  # a call that outlived its deadline (a code of its own in the summary)
WRITE_AFTER_END = "WRITE_AFTER_END"
"""The aio client's report when the server ended a request stream the client was still
writing: INTERNAL "Internal error from Core" replaces the server's status on the client side
(grpc/grpc#36066). The server's own code for such a call is in its access log, checked too."""
CLIENT_WRITE_FAILURE = "Internal error from Core"

# Names of resources that exist (seeded by the fixture), so requests reach deeper code.
EXISTING_NAMES = (
    "digits", "prod", "models/digits", "models/digits/versions/1", "models/digits/versions/2",
    "models/digits@prod", "models/digits/aliases/prod", "datasets/digits",
    "datasets/digits/versions/1", "deployments/digits", "input", "logits", "1",
    # Valid names of nothing yet: creates and their follow-ups.
    "fuzz", "models/fuzz", "datasets/fuzz", "trainingJobs/fuzz", "models/digits/aliases/fuzz",
)


@dataclass(frozen=True)
class Case:
    """One hostile call: which method, the message(s) sent, the authorization header."""

    service: str
    method: MethodDescriptor
    requests: tuple[Message, ...]
    authorization: str | None

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def open_ended(self) -> bool:
        return self.method.server_streaming and self.method.name.startswith("Watch")


@dataclass(frozen=True)
class Outcome:
    case: Case
    code: grpc.StatusCode | str
    details: str


def offered_methods(target: str) -> list[MethodDescriptor]:
    """Every method of every service the server lists through reflection (sync channel)."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        names = [n for n in database.get_services() if n not in NOT_INFRASTRUCTURE]
        return [method for name in names for method in pool.FindServiceByName(name).methods]


def authorization(rng: random.Random, token: str) -> str | None:
    roll = rng.random()
    if roll < 0.72:
        return f"Bearer {token}"
    return rng.choice((None, "Bearer wrong-token", "Basic YWRtaW46YWRtaW4=", "Bearer",
                       f"bearer {token}x", f"  Bearer {token}  "))


def cases_for(service: str, method: MethodDescriptor, token: str) -> list[Case]:
    rng = random.Random(f"{SEED}:{method.full_name}")
    hostile = HostileMessages(rng, EXISTING_NAMES)
    cases = []
    for _ in range(REQUESTS_PER_METHOD):
        count = rng.choice((0, 1, 1, 2, 3, 4)) if method.client_streaming else 1
        requests = tuple(hostile.message(method.input_type) for _ in range(count))
        cases.append(Case(service, method, requests, authorization(rng, token)))
    return cases


def _metadata(case: Case):
    if case.authorization is None:
        return ()
    return (("authorization", case.authorization),)


async def _send(channel: grpc.aio.Channel, case: Case) -> None:
    method = case.method
    serialize, identity = (lambda m: m.SerializeToString()), (lambda b: b)
    timeout = OPEN_ENDED_TIMEOUT_SECONDS if case.open_ended else CALL_TIMEOUT_SECONDS
    kwargs = {"timeout": timeout, "metadata": _metadata(case)}
    if not method.client_streaming and not method.server_streaming:
        await channel.unary_unary(case.path, serialize, identity)(case.requests[0], **kwargs)
    elif not method.server_streaming:
        await channel.stream_unary(case.path, serialize, identity)(iter(case.requests), **kwargs)
    else:
        if method.client_streaming:
            call = channel.stream_stream(case.path, serialize, identity)(iter(case.requests),
                                                                        **kwargs)
        else:
            call = channel.unary_stream(case.path, serialize, identity)(case.requests[0],
                                                                       **kwargs)
        reads = 0
        async for _ in call:
            reads += 1
            if reads >= MAX_STREAM_READS:
                call.cancel()
                break


async def run_case(channel: grpc.aio.Channel, case: Case) -> Outcome:
    guard = (OPEN_ENDED_TIMEOUT_SECONDS if case.open_ended else CALL_TIMEOUT_SECONDS) + GRACE_SECONDS
    try:
        await asyncio.wait_for(_send(channel, case), guard)
    except TimeoutError:
        return Outcome(case, HANG, f"no answer {guard:.0f}s after sending")
    except grpc.aio.AioRpcError as error:
        code = error.code()
        if (code == grpc.StatusCode.INTERNAL and case.method.client_streaming
                and error.details() == CLIENT_WRITE_FAILURE):
            return Outcome(case, WRITE_AFTER_END, error.details())
        return Outcome(case, code, error.details() or "")
    return Outcome(case, grpc.StatusCode.OK, "")


async def serving(target: str, services: tuple[str, ...]) -> dict[str, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answers = {}
        for name in ("", *services):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            answers[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return answers


def summary(outcomes: list[Outcome], seconds: float) -> str:
    by_service: dict[str, Counter] = defaultdict(Counter)
    methods: dict[str, set[str]] = defaultdict(set)
    for outcome in outcomes:
        code = outcome.code if isinstance(outcome.code, str) else outcome.code.name
        by_service[outcome.case.service][code] += 1
        methods[outcome.case.service].add(outcome.case.path)
    lines = [f"fuzz: {len(outcomes)} hostile requests in {seconds:.1f}s (seed {SEED})",
             f"{'service':<10} {'methods':>7} {'requests':>8}  codes"]
    for service, codes in sorted(by_service.items()):
        spread = ", ".join(f"{code} {count}" for code, count in codes.most_common())
        lines.append(f"{service:<10} {len(methods[service]):>7} {sum(codes.values()):>8}  "
                     f"{spread}")
    return "\n".join(lines)


def per_method_summary(outcomes: list[Outcome]) -> str:
    """Codes per method and the commonest detail of each (MAAS_FUZZ_DETAIL=1 prints it)."""
    codes: dict[str, Counter] = defaultdict(Counter)
    for outcome in outcomes:
        code = outcome.code if isinstance(outcome.code, str) else outcome.code.name
        codes[outcome.case.path][f"{code}: {outcome.details[:70]}"] += 1
    return "\n".join(f"{path}\n    " + "\n    ".join(f"{n:>3} {what}" for what, n in
                                                    counter.most_common(4))
                     for path, counter in sorted(codes.items()))


def describe(outcome: Outcome) -> str:
    sent = "; ".join(str(r).replace("\n", " ")[:300] for r in outcome.case.requests)
    return (f"{outcome.case.path} -> {outcome.code}: {outcome.details[:300]} "
            f"[authorization={outcome.case.authorization!r}] sent: {sent}")


async def test_hostile_requests_to_every_rpc_get_canonical_answers(fuzz_suite, capsys):
    plan: list[Case] = []
    for name, service in fuzz_suite.services.items():
        methods = await asyncio.to_thread(offered_methods, service.target)
        offered = {m.containing_service.full_name for m in methods}
        assert offered == set(service.services), f"{name} offers {offered}"
        for method in methods:
            plan.extend(cases_for(name, method, service.token))
    random.Random(SEED).shuffle(plan)
    fuzz_suite.logs.records.clear()

    channels = {name: grpc.aio.insecure_channel(service.target, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        for name, service in fuzz_suite.services.items()}
    limit = asyncio.Semaphore(CONCURRENCY)

    async def bounded(case: Case) -> Outcome:
        async with limit:
            return await run_case(channels[case.service], case)

    started = time.monotonic()
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*map(bounded, plan)),
                                          WHOLE_RUN_SECONDS)
    finally:
        for channel in channels.values():
            await channel.close()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print("\n" + summary(outcomes, elapsed))
        if os.environ.get("MAAS_FUZZ_DETAIL"):
            print(per_method_summary(outcomes))

    per_method = Counter(o.case.path for o in outcomes)
    assert min(per_method.values()) >= REQUESTS_PER_METHOD
    failures = [o for o in outcomes if o.code in FORBIDDEN_CODES or o.code == HANG]
    assert not failures, "\n".join(describe(o) for o in failures[:20])
    for name, service in fuzz_suite.services.items():
        health = await serving(service.target, service.services)
        assert set(health.values()) == {"SERVING"}, (name, health)
    answered_by_servers = Counter((r.rpc_method, r.grpc_code) for r in fuzz_suite.logs.records
                                  if hasattr(r, "grpc_code"))
    assert answered_by_servers, "no access log captured: the server-side check would be blind"
    forbidden = {key: n for key, n in answered_by_servers.items()
                 if key[1] in {c.name for c in FORBIDDEN_CODES}}
    assert not forbidden, f"servers answered {forbidden}"
    unhandled = fuzz_suite.logs.unhandled()
    assert not unhandled, "\n".join(
        f"{r.name}: {r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"
        if r.exc_info else f"{r.name}: {r.getMessage()}" for r in unhandled[:10])
