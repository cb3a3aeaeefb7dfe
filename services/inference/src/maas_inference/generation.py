"""Generation: a prompt or a conversation in, text streamed out of a deployment's Triton model.

Transport-free. A generation is validated (field by field, against the model's context),
rendered with the model's chat template and counted in tokens (`PromptRenderer`, built from
the version's artifact), admitted by the tenant limiter on its prompt tokens, then sent on
one Triton `ModelStreamInfer` call to the decoupled generation model. Each response of the
model is a text delta; the last one carries the finish reason and the usage. Completion
tokens are charged to the tenant as they stream; leaving (normally, on an error, or because
the caller went away) ends the Triton call at once, which frees the model's slot, and the
tenant's usage record is written.

The Triton model's contract (fixed with the generation model in `maas_inference.triton`):
inputs `text_input` BYTES [1] (the rendered prompt) and `sampling_parameters` BYTES [1] (JSON
of `SamplingParameters`), the request parameter `maas.tenant` (the caller's tenant: the model
shares its running slots and prefills fairly between tenants); each response has
`text_output` BYTES [1] (the delta), `finish_reason` BYTES [1] ("" until the last response,
then "stop", "length" or "cancelled") and `usage` BYTES [1] (JSON {prompt_tokens,
completion_tokens, time_to_first_token_s, ...}), the last one flagged final. Errors whose
message starts with "RESOURCE_EXHAUSTED:" or "INVALID_ARGUMENT: <field>: " are answered with
those codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from maas_llm.directory import CausalLmDirectory, unzip_causal_lm
from maas_llm.prompts import ChatMessage, PromptRenderer
from maas_runtime import errors
from maas_runtime.auth import Principal
from maas_runtime.telemetry import trace_metadata
from opentelemetry.metrics import Meter
from tritonclient.grpc import service_pb2

from maas_inference.routing import RouteTable, ServedModel, parse_deployment_name
from maas_inference.tensors import ServingSignature
from maas_inference.triton.client import TritonClient, TritonModelNotFound
from maas_inference.usage import tenant_of

TEXT_INPUT = "text_input"
SAMPLING_INPUT = "sampling_parameters"
TEXT_OUTPUT = "text_output"
FINISH_OUTPUT = "finish_reason"
USAGE_OUTPUT = "usage"
CHAT_ROLES = frozenset({"system", "user", "assistant"})
TENANT_PARAMETER = "maas.tenant"
ENABLE_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParameters:
    """What the Triton model samples with (sent as JSON in `sampling_parameters`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "stop": list(self.stop)}).encode()


@dataclass(frozen=True)
class GenerationRequest:
    """A caller's request as it came (optional fields None when unset)."""

    deployment: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class GenerationLimits:
    """Bounds on what a request may ask (settings)."""

    default_max_tokens: int = 512
    """max_tokens when the request leaves it unset (capped by the room left in the context)."""
    max_stop_strings: int = 4
    max_stop_chars: int = 64
    max_messages: int = 256


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_count: int


@dataclass(frozen=True)
class GenerationEnd:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    """Seconds from the request's arrival to the first token; None when none came."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class PromptFacts:
    """What the gateway needs of a generative version before it reaches Triton: its chat
    template and tokenizer (`maas_llm`'s renderer) and its context length."""

    renderer: PromptRenderer
    context_length: int


class Admission(Protocol):
    """What the tenant limiter's `admit` hands out (`maas_inference.tenancy.Lease`)."""

    version: str
    exceeded: errors.MaasError | None

    def charge(self, completion_tokens: int) -> bool: ...


class Limiter(Protocol):
    def admit(self, principal: Principal, deployment: str,
              prompt_tokens: int = 0) -> contextlib.AbstractAsyncContextManager: ...


def is_generative(signature: ServingSignature) -> bool:
    """Whether a served version speaks the generation model's contract."""
    inputs = {rule.name for rule in signature.inputs}
    outputs = {rule.name for rule in signature.outputs}
    return {TEXT_INPUT, SAMPLING_INPUT} <= inputs and TEXT_OUTPUT in outputs


class PromptRenderers:
    """One renderer per served version, built once (off the event loop) and kept."""

    def __init__(self, load: Callable[[ServedModel], PromptFacts]) -> None:
        self._load = load
        self._renderers: dict[str, PromptFacts] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, served: ServedModel) -> PromptFacts:
        renderer = self._renderers.get(served.triton_model)
        if renderer is not None:
            return renderer
        async with self._locks.setdefault(served.triton_model, asyncio.Lock()):
            renderer = self._renderers.get(served.triton_model)
            if renderer is None:
                renderer = await asyncio.to_thread(self._load, served)
                self._renderers[served.triton_model] = renderer
        return renderer


def load_prompt_facts(served: ServedModel, unpack_dir: Path) -> PromptFacts:
    """A generative version's renderer, from its artifact (a CAUSAL_LM zip, validated and
    unpacked once under `unpack_dir`)."""
    if served.artifact is None:
        raise errors.FailedPrecondition(f"{served.version} has no artifact on this gateway",
                                        reason="NOT_GENERATIVE")
    destination = unpack_dir / served.artifact.name
    directory = (CausalLmDirectory.open(_only_child(destination)) if destination.is_dir()
                 else unzip_causal_lm(served.artifact, destination))
    return PromptFacts(PromptRenderer.from_directory(directory), directory.context_length)


def _only_child(directory: Path) -> Path:
    """The model directory an unpacked archive holds (its one subdirectory, or itself)."""
    children = [child for child in directory.iterdir() if child.is_dir()]
    return children[0] if len(children) == 1 and not (directory / "config.json").exists() \
        else directory


def validate_sampling(request: GenerationRequest, limits: GenerationLimits) -> None:
    """The checks that need no tokenizer; INVALID_ARGUMENT naming every offending field."""
    violations = errors.ViolationCollector()
    if request.messages is None:
        violations.check(bool(request.prompt), "prompt",
                         "is required and must not be empty (or send conversation)")
    else:
        if violations.check(0 < len(request.messages) <= limits.max_messages,
                            "conversation.messages",
                            f"must hold 1 to {limits.max_messages} messages"):
            for index, turn in enumerate(request.messages):
                violations.check(turn.role in CHAT_ROLES,
                                 f"conversation.messages[{index}].role",
                                 f"must be one of {sorted(CHAT_ROLES)}, got {turn.role!r}")
    if request.max_tokens is not None:
        violations.check(request.max_tokens >= 1, "max_tokens", "must be at least 1")
    if request.temperature is not None:
        violations.check(math.isfinite(request.temperature) and request.temperature >= 0,
                         "temperature", "must be 0 (greedy) or more")
    if request.top_p is not None:
        violations.check(0 < request.top_p <= 1, "top_p", "must be in (0, 1]")
    violations.check(request.top_k >= 0, "top_k", "must be 0 (no limit) or more")
    if request.repetition_penalty is not None:
        violations.check(math.isfinite(request.repetition_penalty) and
                         request.repetition_penalty > 0, "repetition_penalty",
                         "must be more than 0 (1: none)")
    if violations.check(len(request.stop) <= limits.max_stop_strings, "stop",
                        f"at most {limits.max_stop_strings} stop strings"):
        for index, stop in enumerate(request.stop):
            violations.check(0 < len(stop) <= limits.max_stop_chars, f"stop[{index}]",
                             f"must be 1 to {limits.max_stop_chars} characters")
    violations.raise_if_any("invalid generation request")


def fit_to_context(request: GenerationRequest, prompt_tokens: int, context_length: int,
                   limits: GenerationLimits) -> int:
    """max_tokens for this prompt: the request's, checked against the room the context has
    left, or the default capped by it."""
    prompt_field = "prompt" if request.messages is None else "conversation"
    room = context_length - prompt_tokens
    if room < 1:
        raise errors.InvalidArgument.for_field(
            prompt_field, f"has {prompt_tokens} tokens; the model's context holds "
            f"{context_length} (prompt and completion together)",
            reason="PROMPT_TOO_LONG")
    if request.max_tokens is None:
        return min(limits.default_max_tokens, room)
    if request.max_tokens > room:
        raise errors.InvalidArgument.for_field(
            "max_tokens", f"{request.max_tokens} does not fit: the context holds "
            f"{context_length} tokens and the prompt takes {prompt_tokens}",
            reason="MAX_TOKENS_BEYOND_CONTEXT")
    return request.max_tokens


def sampling_parameters(request: GenerationRequest, max_tokens: int) -> SamplingParameters:
    return SamplingParameters(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k,
        stop=request.stop, seed=request.seed,
        repetition_penalty=(1.0 if request.repetition_penalty is None
                            else request.repetition_penalty))


def triton_generate_request(triton_model: str, prompt: str, sampling: SamplingParameters,
                            request_id: str, tenant: str = "") -> service_pb2.ModelInferRequest:
    """The generation model's request: the rendered prompt, the sampling parameters and the
    tenant the model shares its slots and prefills between."""
    request = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    for name, value in ((TEXT_INPUT, prompt.encode()), (SAMPLING_INPUT, sampling.to_json())):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    request.parameters[ENABLE_FINAL_RESPONSE].bool_param = True
    request.parameters[TENANT_PARAMETER].string_param = tenant
    return request


@dataclass(frozen=True)
class ModelStep:
    """One response of the generation model, decoded."""

    text: str
    finish_reason: str
    usage: dict
    final: bool


def read_model_step(response: service_pb2.ModelStreamInferResponse,
                    deployment_id: str) -> ModelStep:
    """Decode one response; the model's own errors become the suite's."""
    if response.error_message:
        raise model_error(response.error_message, deployment_id)
    reply = response.infer_response
    values: dict[str, bytes] = {}
    for index, output in enumerate(reply.outputs):
        if index < len(reply.raw_output_contents):
            values[output.name] = _first_bytes(reply.raw_output_contents[index])
    flag = reply.parameters.get(FINAL_RESPONSE)
    final = flag is None or flag.bool_param
    try:
        usage = json.loads(values[USAGE_OUTPUT]) if values.get(USAGE_OUTPUT) else {}
        return ModelStep(values.get(TEXT_OUTPUT, b"").decode(),
                         values.get(FINISH_OUTPUT, b"").decode(), usage, final)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.Internal(f"{deployment_id}'s model answered an unreadable response: {exc}",
                              reason="MODEL_RESPONSE_UNREADABLE") from None


def _finish_reason(value: str) -> FinishReason:
    try:
        return FinishReason(value or FinishReason.STOP)
    except ValueError:
        raise errors.Internal(f"the model ended a generation with an unknown reason {value!r}",
                              reason="MODEL_RESPONSE_UNREADABLE") from None


def _first_bytes(raw: bytes) -> bytes:
    """The first element of a serialized BYTES tensor (4-byte little-endian length first)."""
    if len(raw) < 4:
        return b""
    (length,) = struct.unpack_from("<I", raw)
    return raw[4:4 + length]


def model_error(message: str, deployment_id: str) -> errors.MaasError:
    """The error a model's `error_message` stands for (its contract's prefixes)."""
    if message.startswith("RESOURCE_EXHAUSTED:"):
        return errors.ResourceExhausted(
            f"{deployment_id} is at capacity: {message.partition(':')[2].strip()}",
            reason="GENERATION_QUEUE_FULL", retry_delay_seconds=1.0)
    if message.startswith("INVALID_ARGUMENT:"):
        field_path, _, description = message.partition(":")[2].strip().partition(": ")
        return errors.InvalidArgument.for_field(field_path or "request",
                                                description or message,
                                                reason="MODEL_REFUSED_REQUEST")
    return errors.Unavailable(f"{deployment_id}'s model failed the generation: {message}",
                              reason="GENERATION_FAILED")


class GenerationMetrics:
    """Per deployment: time to first token, inter-token latency, tokens per second (of each
    generation, from its first token to its last) and the generations waiting for their
    first token and running after it."""

    def __init__(self, meter: Meter | None) -> None:
        self._meter = meter
        if meter is None:
            return
        self._ttft = meter.create_histogram(
            "maas.inference.generation.time_to_first_token", unit="s",
            description="from a generation's arrival to its first token")
        self._inter_token = meter.create_histogram(
            "maas.inference.generation.inter_token_latency", unit="s",
            description="between consecutive streamed tokens of a generation")
        self._rate = meter.create_histogram(
            "maas.inference.generation.tokens_per_second", unit="{token}/s",
            description="completion tokens per second of each generation after its first")
        self._tokens = meter.create_counter(
            "maas.inference.generation.tokens", unit="{token}",
            description="completion tokens streamed")
        self._waiting = meter.create_up_down_counter(
            "maas.inference.generation.streams.waiting",
            description="generations sent to the model that have no token yet")
        self._running = meter.create_up_down_counter(
            "maas.inference.generation.streams.running",
            description="generations streaming tokens")

    @contextlib.contextmanager
    def stream(self, deployment_id: str, arrived: float) -> Iterator[StreamClock]:
        clock = StreamClock(self, {"deployment": deployment_id}, arrived)
        if self._meter is not None:
            self._waiting.add(1, clock.labels)
        try:
            yield clock
        finally:
            if self._meter is not None:
                if clock.first_token is None:
                    self._waiting.add(-1, clock.labels)
                else:
                    self._running.add(-1, clock.labels)
                    if clock.tokens > 1 and clock.last_token > clock.first_token:
                        self._rate.record((clock.tokens - 1) /
                                          (clock.last_token - clock.first_token), clock.labels)


@dataclass
class StreamClock:
    """The timings of one generation, recorded as its tokens come."""

    metrics: GenerationMetrics
    labels: dict[str, str]
    arrived: float
    first_token: float | None = None
    last_token: float = 0.0
    tokens: int = 0
    _gaps: list[float] = field(default_factory=list)

    def tokens_came(self, count: int) -> None:
        now = time.monotonic()
        metrics = self.metrics
        if self.first_token is None:
            self.first_token = now
            if metrics._meter is not None:
                metrics._waiting.add(-1, self.labels)
                metrics._running.add(1, self.labels)
                metrics._ttft.record(now - self.arrived, self.labels)
        elif metrics._meter is not None and count > 0:
            metrics._inter_token.record((now - self.last_token) / count, self.labels)
        if metrics._meter is not None and count > 0:
            metrics._tokens.add(count, self.labels)
        self.last_token = now
        self.tokens += count

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrived


class Generator:
    """Generate on the deployments the route table serves."""

    def __init__(self, routes: RouteTable, triton: TritonClient, renderers: PromptRenderers,
                 *, limiter: Limiter | None = None, limits: GenerationLimits | None = None,
                 metrics: GenerationMetrics | None = None) -> None:
        self._routes = routes
        self._triton = triton
        self._renderers = renderers
        self._limiter = limiter
        self._limits = limits or GenerationLimits()
        self._metrics = metrics or GenerationMetrics(None)

    async def served_generator(self, deployment: str, principal: Principal,
                               field_path: str = "deployment",
                               request_id: str = "") -> tuple[str, ServedModel]:
        """The deployment id and the version a generation goes to: NOT_FOUND, PERMISSION_DENIED
        and UNAVAILABLE as for Predict, FAILED_PRECONDITION when it does not generate."""
        deployment_id = parse_deployment_name(deployment, field_path)
        live = self._routes.served(deployment_id, principal)
        self._routes.require_triton()
        target = live.route.pick(request_id or uuid.uuid4().hex)
        if not is_generative(target.signature):
            raise errors.FailedPrecondition(
                f"deployments/{deployment_id} serves {target.version}, which does not generate "
                "text (Generate needs a causal language model)", reason="NOT_GENERATIVE")
        return deployment_id, target

    def generative(self, deployment_id: str) -> bool:
        """Whether a loaded deployment generates (its first version speaks the contract)."""
        live = self._routes.get(deployment_id)
        return live is not None and is_generative(live.route.targets[0][0].signature)

    async def generate(self, request: GenerationRequest, principal: Principal,
                       timeout: float | None = None
                       ) -> AsyncGenerator[TextDelta | GenerationEnd, None]:
        """Text deltas as the model produces them, then one `GenerationEnd`."""
        arrived = time.monotonic()
        validate_sampling(request, self._limits)
        deployment_id, target = await self.served_generator(request.deployment, principal)
        facts = await self._renderers.get(target)
        if request.messages is not None:
            prompt = facts.renderer.render(request.messages,
                                           field_path="conversation.messages")
        else:
            prompt = request.prompt or ""
        prompt_tokens = facts.renderer.count_tokens(prompt)
        max_tokens = fit_to_context(request, prompt_tokens, facts.context_length, self._limits)
        triton_request = triton_generate_request(
            target.triton_model, prompt, sampling_parameters(request, max_tokens),
            uuid.uuid4().hex, tenant_of(principal))
        admission = (self._limiter.admit(principal, deployment_id, prompt_tokens=prompt_tokens)
                     if self._limiter is not None else contextlib.nullcontext(None))
        finish, usage = FinishReason.STOP, {}
        async with admission as lease:
            if lease is not None:
                lease.version = target.version
            steps = self._model_steps(deployment_id, target, triton_request, timeout)
            with self._metrics.stream(deployment_id, arrived) as clock:
                async with contextlib.aclosing(steps):  # left early: the Triton call ends now
                    async for step, produced in steps:
                        if produced or step.text:
                            clock.tokens_came(produced)
                            yield TextDelta(step.text, produced)
                            if lease is not None and not lease.charge(produced):
                                break  # over a token limit: stop here, what came is charged
                        if step.final:
                            finish = _finish_reason(step.finish_reason)
                            usage = step.usage
        if lease is not None and lease.exceeded is not None:
            raise lease.exceeded
        yield GenerationEnd(finish, int(usage.get("prompt_tokens", prompt_tokens)),
                            clock.tokens, clock.time_to_first_token)

    async def _model_steps(self, deployment_id: str, target: ServedModel,
                           request: service_pb2.ModelInferRequest, timeout: float | None
                           ) -> AsyncGenerator[tuple[ModelStep, int], None]:
        """The model's responses with the tokens each produced, on one Triton call that is
        cancelled as soon as this generator is left (the model frees the slot)."""
        stream = self._triton.open_stream(timeout=timeout, metadata=trace_metadata())
        completion_tokens = 0
        try:
            with self._routes.in_flight.track(target.triton_model):
                await stream.send(request)
                while True:
                    step = read_model_step(await stream.receive(), deployment_id)
                    counted = int(step.usage.get("completion_tokens", completion_tokens))
                    produced = max(counted - completion_tokens, 0)
                    completion_tokens = max(counted, completion_tokens)
                    yield step, produced
                    if step.final:
                        return
        except TritonModelNotFound as exc:
            raise errors.Unavailable(
                f"{target.version} is being loaded into Triton again; retry shortly",
                reason="MODEL_NOT_LOADED") from exc
        finally:
            await stream.close()
