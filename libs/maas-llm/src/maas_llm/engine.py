"""A continuous-batching generation engine for a Hugging Face causal LM, in torch on CPU.

One background thread owns the model. Running streams decode together: each step is one
forward pass over all of them (batch B, one new token each) against their key/value caches,
held as one batched cache left-padded to a common length with an attention mask hiding the
padding, and per-row position ids so each stream sees its own positions. New streams join
between steps: each is prefilled (a left-padded forward over the streams prefilled together),
its first token sampled and sent at once, and its cache merged into the batch; at most
`prefill_token_budget` padded prompt tokens are prefilled between two steps, so running
streams keep flowing while a burst joins (the rest join at the next steps). A stream that
finishes or is cancelled leaves its row at once (the cache rows are dropped, and columns that
only padding holds are trimmed). Waiting streams queue up to a bound; past it `submit` raises
`GenerationQueueFull` (RESOURCE_EXHAUSTED).

Fairness between tenants (`submit(..., tenant=)`; the inference gateway names the caller's):

* Slots: a free running slot goes to the waiting stream whose tenant has the fewest running
  streams (counting those admitted in the same round), the oldest first among equals: round
  robin between tenants, first come, first served within one. The gateway's per-tenant
  `concurrent_streams` limit, set below `max_running`, keeps one tenant from holding every
  slot; this order decides who gets the slots that free up.
* Prefills: the streams admitted together are prefilled in one forward per tenant, in the
  order above, never in a padded batch mixing tenants: a newcomer from a tenant with few
  streams is prefilled first and alone (its prompt only), not behind or beside a flooding
  tenant's prompts; a tenant's own burst still shares one forward.
* No wait for the step in flight: a stream that arrives during a decode step is admitted
  between two of the step's decoder layers (a forward pre-hook on each layer of the model's
  `model.layers`), prefilled there, and its first token sent before the step resumes; its row
  joins the batch after the step. So its time to first token is its own prefill, whatever
  other tenants keep running; the running streams pay that prefill once, as they would
  between steps (at most one cut-in per step, within the prefill budget).
* CPU: with `cpu_nice` the engine thread and the torch threads it starts run below the
  processes that carry requests and tokens on the same cores (Triton's server, the gateway),
  which then are scheduled first when they wake; the forwards take the rest.

Each stream's usage also says how long it waited before its prefill, how long the prefill
took and how many streams it held (`Usage.queue_time_s`, `prefill_time_s`,
`prefill_streams`).

Each stream receives `TokenGroup`s: the text produced since the previous group (decoded from
all of its tokens, held back while it ends inside a UTF-8 character or might be the start of
a stop string), and a last group with the finish reason ("stop", "length" or "cancelled")
and cumulative usage. Stop strings are text stops and are never emitted; an end-of-sequence
token ends with "stop" and is neither emitted nor counted.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from maas_runtime.errors import InvalidArgument, MaasError, ResourceExhausted
from pydantic import BaseModel, ConfigDict, Field

from maas_llm.directory import CausalLmDirectory
from maas_llm.prompts import PromptRenderer
from maas_llm.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


class GenerationQueueFull(ResourceExhausted):
    """The engine's waiting queue is full: retry later or elsewhere."""

    default_reason = "GENERATION_QUEUE_FULL"


class EngineSettings(BaseModel):
    """How many streams one engine runs and queues, and the torch threads it uses."""

    model_config = ConfigDict(use_attribute_docstrings=True, frozen=True)

    max_running: int = Field(default=8, ge=1, le=256)
    """Streams decoded together in one forward pass; more wait in the queue."""

    max_waiting: int = Field(default=32, ge=0, le=10_000)
    """Streams allowed to wait for a running slot; one more is refused (RESOURCE_EXHAUSTED)."""

    torch_threads: int = Field(default=0, ge=0, le=256)
    """torch intra-op threads for the engine's forwards; 0 keeps torch's default."""

    prefill_token_budget: int = Field(default=1024, ge=1, le=1_000_000)
    """Prompt tokens (padded batch width × streams) prefilled together between two decode
    steps; a longer prompt is prefilled alone. Bounds how long running streams stall while
    new ones join, and admits waiting streams in arrival order a few per step."""

    cpu_nice: int = Field(default=0, ge=0, le=19)
    """Niceness the engine thread adds to its own (the torch threads it starts inherit it):
    on a machine whose cores the forwards keep busy, the processes that carry requests and
    tokens (a server, a gateway) are then scheduled first when they wake, and the forwards
    take every cycle they leave. 0 leaves the priority alone."""

    cancel_poll_seconds: float = Field(default=0.25, ge=0, le=10)
    """How often a stream's `is_cancelled` callback is asked (it may be a round trip to another
    process, as Triton's is); `GenerationStream.cancel()` is seen every step regardless."""

    idle_poll_seconds: float = Field(default=0.05, gt=0, le=5)
    """How often an idle engine wakes up to look for cancelled waiting streams."""

    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Weights and activations: bf16 halves memory and time; float32 makes batched greedy
    decoding agree with single-stream decoding more tightly (fewer near-tie flips)."""


@dataclass(frozen=True)
class Usage:
    """Cumulative token counts of one stream and its time to first token."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    queue_time_s: float | None = None
    """From `submit` to the start of the stream's prefill forward (waiting for a slot, for the
    step in flight and for prefills ahead of it)."""
    prefill_time_s: float | None = None
    """The prefill forward the stream's prompt went through."""
    prefill_streams: int = 0
    """How many streams that prefill forward held (1: prefilled alone)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token_s": self.time_to_first_token_s,
            "queue_time_s": self.queue_time_s,
            "prefill_time_s": self.prefill_time_s,
            "prefill_streams": self.prefill_streams,
        }


@dataclass(frozen=True)
class TokenGroup:
    """New text of one stream; `finish_reason` is "" until the last group of the stream."""

    text: str
    finish_reason: str
    usage: Usage
    error: str = ""

    @property
    def final(self) -> bool:
        return bool(self.finish_reason)


EventCallback = Callable[[TokenGroup], None]


class GenerationStream:
    """One submitted generation. Iterate it for its token groups, or pass `on_event`."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: EventCallback | None,
        is_cancelled: Callable[[], bool] | None,
        tenant: str = "",
        sequence: int = 0,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.tenant = tenant
        """Whose stream this is: the engine shares running slots and prefills across tenants."""
        self.sequence = sequence
        """Arrival order in its engine."""
        self.submitted_at = time.perf_counter()
        self._on_event = on_event
        self._is_cancelled = is_cancelled
        self._cancelled = threading.Event()
        self._cancel_polled_at = 0.0
        self._events: queue.Queue[TokenGroup] = queue.Queue()
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop generating: the engine frees the stream's slot before its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self.poll_cancelled(0.0)

    def poll_cancelled(self, interval: float) -> bool:
        """Whether the stream is cancelled, asking `is_cancelled` at most every `interval` s."""
        if self._cancelled.is_set():
            return True
        if self._is_cancelled is None:
            return False
        now = time.monotonic()
        if now - self._cancel_polled_at < interval:
            return False
        self._cancel_polled_at = now
        if self._is_cancelled():
            self._cancelled.set()
            return True
        return False

    def _deliver(self, event: TokenGroup) -> None:
        if event.final:
            self.finished.set()
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._events.put(event)

    def __iter__(self) -> Iterator[TokenGroup]:
        while True:
            event = self._events.get()
            yield event
            if event.final:
                return

    def text(self) -> tuple[str, TokenGroup]:
        """Wait for the end; (the whole text, the final group)."""
        parts = []
        for event in self:
            parts.append(event.text)
            last = event
        return "".join(parts), last


@dataclass
class _Row:
    """A running stream's decoding state."""

    stream: GenerationStream
    generator: Any
    stop_hold: int
    generated: list[int] = field(default_factory=list)
    seen: Any = None
    position: int = 0
    pending_token: int = -1
    emitted_chars: int = 0
    first_token_at: float | None = None
    prefill_started_at: float = 0.0
    prefill_seconds: float = 0.0
    prefill_streams: int = 0


class GenerationEngine:
    """Continuous batching over one causal LM; `start()` it, `submit()` prompts, `stop()` it."""

    def __init__(
        self,
        model: Any,
        renderer: PromptRenderer,
        *,
        eos_token_ids: Sequence[int],
        context_length: int,
        settings: EngineSettings | None = None,
    ) -> None:
        self.model = model
        self.renderer = renderer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_length = context_length
        self.settings = settings or EngineSettings()
        self._waiting: deque[GenerationStream] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Streams submitted and not finished (waiting, being prefilled or running): the bound.
        self._unfinished = 0
        self._submitted = 0
        # A decode step in flight lets newcomers cut in between two of its layers (at most
        # once); their rows join the batch when the step is over.
        self._decoding = False
        self._cut_in_taken = False
        self._cut_ins: list[tuple[list[_Row], Any, Any, list[int]]] = []

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike[str] | CausalLmDirectory, settings: EngineSettings | None = None
    ) -> GenerationEngine:
        """Load a causal-LM directory (safetensors only; pickle is refused) in `settings.dtype`."""
        import torch
        from transformers import AutoModelForCausalLM

        checked = (
            directory if isinstance(directory, CausalLmDirectory) else CausalLmDirectory.open(directory)
        )
        settings = settings or EngineSettings()
        model = AutoModelForCausalLM.from_pretrained(
            Path(checked.path),
            dtype=getattr(torch, settings.dtype),
            use_safetensors=True,
            local_files_only=True,
        )
        model.eval()
        return cls(
            model,
            PromptRenderer.from_directory(checked),
            eos_token_ids=checked.eos_token_ids(),
            context_length=checked.context_length,
            settings=settings,
        )

    # ---- public API -------------------------------------------------------------------------

    def start(self) -> GenerationEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every stream and end the engine thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running_streams(self) -> int:
        return len(self._rows)

    @property
    def waiting_streams(self) -> int:
        return len(self._waiting)

    def check_prompt(
        self, prompt: str | Sequence[int], params: SamplingParams, *, field_path: str = "text_input"
    ) -> list[int]:
        """The prompt's token ids; InvalidArgument if it is empty or leaves no room to generate."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument.for_field(field_path, "the prompt is empty")
            prompt_ids = self.renderer.encode(prompt)
        else:
            prompt_ids = [int(token) for token in prompt]
        if not prompt_ids:
            raise InvalidArgument.for_field(field_path, "the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise InvalidArgument.for_field(
                field_path,
                f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{self.context_length}",
                reason="PROMPT_TOO_LONG",
            )
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise InvalidArgument.for_field(
                "max_tokens",
                f"{params.max_tokens} new tokens after a {len(prompt_ids)}-token prompt exceed the "
                f"model's context of {self.context_length}",
                reason="MAX_TOKENS_BEYOND_CONTEXT",
            )
        return prompt_ids

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        on_event: EventCallback | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        tenant: str = "",
    ) -> GenerationStream:
        """Queue a generation of `tenant` ("" for streams whose caller names none, which then
        share one tenant); its events come through `on_event` (engine thread) or iteration."""
        params = params or SamplingParams()
        prompt_ids = self.check_prompt(prompt, params)
        with self._lock:
            self._submitted += 1
            stream = GenerationStream(
                prompt_ids, params, on_event, is_cancelled, tenant=tenant, sequence=self._submitted
            )
            if self._stopping:
                raise GenerationQueueFull("the generation engine is shutting down")
            capacity = self.settings.max_running + self.settings.max_waiting
            if self._unfinished >= capacity:
                running = min(self._unfinished, self.settings.max_running)
                raise GenerationQueueFull(
                    f"{running} streams running and {self._unfinished - running} waiting; the "
                    f"queue holds {self.settings.max_waiting}",
                    metadata={"max_waiting": str(self.settings.max_waiting)},
                    retry_delay_seconds=1.0,
                )
            self._waiting.append(stream)
            self._unfinished += 1
            self._lock.notify_all()
        return stream

    def _deliver(self, stream: GenerationStream, event: TokenGroup) -> None:
        if event.final:
            with self._lock:
                self._unfinished -= 1
        stream._deliver(event)

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        if self.settings.cpu_nice:
            # Linux: a thread's niceness is its own, and threads it creates start with it.
            thread_id = threading.get_native_id()
            current = os.getpriority(os.PRIO_PROCESS, thread_id)
            os.setpriority(os.PRIO_PROCESS, thread_id, min(current + self.settings.cpu_nice, 19))
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        hooks = [
            layer.register_forward_pre_hook(self._between_layers)
            for layer in getattr(getattr(self.model, "model", None), "layers", None) or ()
        ]
        try:
            self._loop()
        finally:
            for hook in hooks:
                hook.remove()

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            # One small forward first: the first passes over freshly loaded weights are many
            # times slower than the rest, and the first caller's time to first token should not
            # pay for it.
            self.model(input_ids=torch.zeros((1, 8), dtype=torch.long), use_cache=False)
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    if not self._rows and not self._waiting:
                        self._lock.wait(self.settings.idle_poll_seconds)
                        continue
                    admitted = self._admit()
                    poll = self.settings.cancel_poll_seconds
                    waiting_cancelled = [s for s in self._waiting if s.poll_cancelled(poll)]
                    for stream in waiting_cancelled:
                        self._waiting.remove(stream)
                for stream in waiting_cancelled:
                    self._finish_unstarted(stream, FINISH_CANCELLED)
                try:
                    for group in admitted:
                        self._prefill(group)
                    self._drop_rows(
                        [row for row in self._rows if row.stream.poll_cancelled(poll)], FINISH_CANCELLED
                    )
                    if self._rows:
                        self._decode_step()
                except Exception as error:  # a broken forward ends every stream, not the thread
                    message = _error_message(error)
                    self._drop_rows(list(self._rows), FINISH_ERROR, error=message)
                    for rows, *_ in self._cut_ins:
                        for row in rows:
                            self._emit(row, "", FINISH_ERROR, final_text_end=0, error=message)
                    self._cut_ins.clear()
        with self._lock:
            leftover = list(self._waiting)
            self._waiting.clear()
        for stream in leftover:
            self._finish_unstarted(stream, FINISH_CANCELLED)
        self._drop_rows(list(self._rows), FINISH_CANCELLED)

    def _between_layers(self, module: Any, args: Any) -> None:
        """A decoder layer's forward pre-hook: while a decode step is in flight, a stream that
        arrived after it started is admitted and prefilled here, between two of its layers,
        instead of after the whole step; its first token goes out at once. At most once per
        step (the prefill budget bounds it, as between steps)."""
        if not self._decoding or self._cut_in_taken or not self._waiting:
            return
        if threading.current_thread() is not self._thread:
            return  # another thread running the model (a caller's own generate) never cuts in
        with self._lock:
            groups = self._admit()
        if not groups:
            return
        self._cut_in_taken = True
        self._decoding = False  # the prefills' own layers are not cut into
        try:
            for group in groups:
                self._prefill(group, merge=False)
        finally:
            self._decoding = True

    def _admit(self) -> list[list[GenerationStream]]:
        """Take waiting streams for free running slots (lock held), fairly across tenants, as
        prefill groups: one group per tenant, in the order its first stream was picked.

        Each pick is the waiting stream whose tenant has the fewest streams running (counting
        the ones picked here), the oldest first among equals: round robin between tenants, and
        first come, first served within one. Picking stops when the slots are full or when the
        padded prompt tokens of all the groups would pass `prefill_token_budget` (the first
        stream always goes, however long its prompt)."""
        free = self.settings.max_running - len(self._rows)
        if free <= 0 or not self._waiting:
            return []
        running: dict[str, int] = {}
        for row in self._rows:
            running[row.stream.tenant] = running.get(row.stream.tenant, 0) + 1
        groups: dict[str, list[GenerationStream]] = {}
        widths: dict[str, int] = {}
        admitted = 0
        while self._waiting and admitted < free:
            candidate = min(
                self._waiting, key=lambda stream: (running.get(stream.tenant, 0), stream.sequence)
            )
            tenant = candidate.tenant
            group = groups.get(tenant, [])
            width = max(widths.get(tenant, 0), len(candidate.prompt_ids))
            padded = sum(
                widths[other] * len(streams) for other, streams in groups.items() if other != tenant
            ) + width * (len(group) + 1)
            if admitted and padded > self.settings.prefill_token_budget:
                break
            self._waiting.remove(candidate)
            groups.setdefault(tenant, group).append(candidate)
            widths[tenant] = width
            running[tenant] = running.get(tenant, 0) + 1
            admitted += 1
        return list(groups.values())

    def _usage(self, row_or_stream: _Row | GenerationStream) -> Usage:
        if isinstance(row_or_stream, GenerationStream):
            return Usage(len(row_or_stream.prompt_ids), 0, None)
        row = row_or_stream
        ttft = None if row.first_token_at is None else row.first_token_at - row.stream.submitted_at
        return Usage(
            len(row.stream.prompt_ids),
            len(row.generated),
            ttft,
            queue_time_s=row.prefill_started_at - row.stream.submitted_at,
            prefill_time_s=row.prefill_seconds,
            prefill_streams=row.prefill_streams,
        )

    def _finish_unstarted(self, stream: GenerationStream, reason: str, *, error: str = "") -> None:
        self._deliver(stream, TokenGroup("", reason, self._usage(stream), error=error))

    def _new_generator(self, seed: int | None) -> Any:
        import torch

        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return generator

    def _prefill(self, streams: list[GenerationStream], *, merge: bool = True) -> None:
        """Prefill the admitted streams together (one left-padded forward), sample each one's
        first token and merge the rows that go on into the running batch (`merge=False`: once
        the decode step in flight is over)."""
        import torch
        from transformers import DynamicCache

        live = []
        for stream in streams:
            if stream.cancelled:
                self._finish_unstarted(stream, FINISH_CANCELLED)
            else:
                live.append(stream)
        if not live:
            return
        width = max(len(stream.prompt_ids) for stream in live)
        input_ids = torch.zeros((len(live), width), dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for index, stream in enumerate(live):
            length = len(stream.prompt_ids)
            input_ids[index, width - length:] = torch.tensor(stream.prompt_ids, dtype=torch.long)
            mask[index, width - length:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        prefill_started_at = time.perf_counter()
        try:
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception as error:  # these streams end; the running batch is not touched
            message = _error_message(error)
            for stream in live:
                self._finish_unstarted(stream, FINISH_ERROR, error=message)
            return
        logits = output.logits[:, -1, :].float()
        prefill_seconds = time.perf_counter() - prefill_started_at
        continuing: list[int] = []
        rows: list[_Row] = []
        for index, stream in enumerate(live):
            params = stream.params
            row = _Row(
                stream=stream,
                generator=self._new_generator(params.seed),
                stop_hold=max((len(s) for s in params.stop), default=1) - 1,
                seen=torch.tensor(stream.prompt_ids, dtype=torch.long),
                position=len(stream.prompt_ids),
                prefill_started_at=prefill_started_at,
                prefill_seconds=prefill_seconds,
                prefill_streams=len(live),
            )
            if not self._accept(row, self._sample(row, logits[index])):
                continuing.append(index)
                rows.append(row)
        if rows and merge:
            # The cache was filled in place; rows that already ended are left out of it.
            self._merge(rows, cache, mask, continuing)
        elif rows:
            self._cut_ins.append((rows, cache, mask, continuing))

    def _merge(self, rows: list[_Row], cache: Any, mask: Any, keep: list[int]) -> None:
        """Add prefilled rows (`keep` of `cache`/`mask`) to the batch, left-padding the
        shorter side so every row ends at the same column."""
        import torch
        import torch.nn.functional as functional

        indices = torch.tensor(keep, dtype=torch.long)
        if len(keep) != mask.shape[0]:
            mask = mask.index_select(0, indices)
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, indices)
                layer.values = layer.values.index_select(0, indices)
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        current, length = self._mask.shape[1], mask.shape[1]
        width = max(current, length)
        for batch_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                merged = torch.cat(
                    [
                        functional.pad(getattr(batch_layer, name), (0, 0, width - current, 0)),
                        functional.pad(getattr(new_layer, name), (0, 0, width - length, 0)),
                    ],
                    dim=0,
                )
                setattr(batch_layer, name, merged)
        self._mask = torch.cat(
            [functional.pad(self._mask, (width - current, 0)), functional.pad(mask, (width - length, 0))],
            dim=0,
        )
        self._rows.extend(rows)

    def _decode_step(self) -> None:
        import torch

        rows = self._rows
        input_ids = torch.tensor([[row.pending_token] for row in rows], dtype=torch.long)
        position_ids = torch.tensor([[row.position] for row in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        self._decoding, self._cut_in_taken = True, False
        try:
            output = self.model(
                input_ids=input_ids,
                attention_mask=self._mask,
                position_ids=position_ids,
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self._decoding = False
        logits = output.logits[:, -1, :].float()
        if all(row.stream.params.greedy and row.stream.params.repetition_penalty == 1.0 for row in rows):
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [self._sample(row, logits[index]) for index, row in enumerate(rows)]
        finished = []
        for row, token in zip(rows, tokens, strict=True):
            row.position += 1
            if self._accept(row, int(token)):
                finished.append(row)
        self._drop_rows(finished, None)
        for pending in self._cut_ins:
            self._merge(*pending)
        self._cut_ins.clear()

    def _sample(self, row: _Row, logits: Any) -> int:
        import torch

        params = row.stream.params
        if params.repetition_penalty != 1.0:
            seen = row.seen
            scores = logits.gather(0, seen)
            penalty = params.repetition_penalty
            scores = torch.where(scores < 0, scores * penalty, scores / penalty)
            logits = logits.scatter(0, seen, scores)
        if params.greedy:
            return int(logits.argmax().item())
        logits = logits / params.temperature
        if params.top_k and params.top_k < logits.shape[-1]:
            threshold = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probabilities = torch.softmax(ordered, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = probabilities.cumsum(dim=-1) - probabilities >= params.top_p
            logits = logits.scatter(0, order, ordered.masked_fill(outside, float("-inf")))
        probabilities = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=row.generator).item())

    def _accept(self, row: _Row, token: int) -> bool:
        """Record a sampled token and deliver the text it completes; True when the stream ends."""
        import torch

        stream, params = row.stream, row.stream.params
        if row.first_token_at is None:
            row.first_token_at = time.perf_counter()
        if token in self.eos_token_ids:
            self._emit(row, self.renderer.decode(row.generated), FINISH_STOP, final_text_end=None)
            return True
        row.generated.append(token)
        row.pending_token = token
        if params.repetition_penalty != 1.0:
            row.seen = torch.cat([row.seen, torch.tensor([token], dtype=torch.long)])
        text = self.renderer.decode(row.generated)
        stop_at = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self._emit(row, text, FINISH_STOP, final_text_end=stop_at)
            return True
        if len(row.generated) >= params.max_tokens or row.position + 1 >= self.context_length:
            self._emit(row, text, FINISH_LENGTH, final_text_end=None)
            return True
        safe_end = len(text)
        if text.endswith("\ufffd"):  # the last tokens end inside a UTF-8 character
            safe_end = len(text.rstrip("\ufffd"))
        if params.stop:
            held = _stop_prefix_length(text, params.stop)
            safe_end = min(safe_end, max(row.emitted_chars, len(text) - held))
        if safe_end > row.emitted_chars:
            delta = text[row.emitted_chars:safe_end]
            row.emitted_chars = safe_end
            self._deliver(stream, TokenGroup(delta, "", self._usage(row)))
        return False

    def _emit(
        self, row: _Row, text: str, reason: str, *, final_text_end: int | None, error: str = ""
    ) -> None:
        end = len(text) if final_text_end is None else final_text_end
        if reason == FINISH_LENGTH or reason == FINISH_STOP:
            text = text[:end].rstrip("\ufffd") if final_text_end is None else text[:end]
            end = len(text)
        delta = text[row.emitted_chars:end] if end > row.emitted_chars else ""
        row.emitted_chars = max(row.emitted_chars, end)
        self._deliver(row.stream, TokenGroup(delta, reason, self._usage(row), error=error))

    def _drop_rows(self, rows: list[_Row], reason: str | None, *, error: str = "") -> None:
        """Remove rows from the batch (delivering `reason` to each when given)."""
        import torch

        if not rows:
            return
        if reason is not None:
            for row in rows:
                self._emit(row, "", reason, final_text_end=0, error=error)
        dropping = {id(row) for row in rows}
        keep = [index for index, row in enumerate(self._rows) if id(row) not in dropping]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        if len(keep) == len(self._rows):
            return
        indices = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, indices)
        # Columns that only padding holds any more are dropped with the rows.
        first_used = int((mask.sum(dim=0) > 0).nonzero()[0].item())
        self._mask = mask[:, first_used:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, indices)[:, :, first_used:, :]
            layer.values = layer.values.index_select(0, indices)[:, :, first_used:, :]
        self._rows = [self._rows[index] for index in keep]


def _error_message(error: Exception) -> str:
    """What a stream ended by a failed forward is told."""
    return error.message if isinstance(error, MaasError) else repr(error)


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The longest end of `text` that could be the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
