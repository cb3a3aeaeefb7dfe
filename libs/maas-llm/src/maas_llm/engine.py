"""A continuous-batching generation engine for a Hugging Face causal LM, in torch on CPU.

One background thread owns the model. Running streams decode together: each step is one
forward pass over all of them (batch B, one new token each) against their key/value caches,
held as one batched cache left-padded to a common length with an attention mask hiding the
padding, and per-row position ids so each stream sees its own positions. A new stream joins
between steps: the streams admitted together are prefilled in one left-padded forward (at
most `prefill_token_budget` padded prompt tokens, so running streams keep flowing while a burst
joins; the rest join at the next steps, in arrival order), each one's first token is sampled,
and their caches merged into the batch. A stream that finishes or is cancelled leaves its row
at once (the cache rows are dropped, and columns that only padding holds are trimmed).
Waiting streams queue up to a bound; past it `submit` raises `GenerationQueueFull` (RESOURCE_EXHAUSTED).

Fairness between tenants: the engine does not know tenants; its queue is first come, first
served, and a stream admitted to a free slot is prefilled before the next decode step, so its
time to first token is its prefill plus at most the step in flight. What keeps one tenant from
holding every slot is the gateway's per-tenant `concurrent_streams` limit, set below the
deployment's `max_running` streams: another tenant's stream then always finds a free slot and
never waits behind the flood.

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token_s": self.time_to_first_token_s,
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
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
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
    ) -> GenerationStream:
        """Queue a generation; its events come through `on_event` (engine thread) or iteration."""
        params = params or SamplingParams()
        prompt_ids = self.check_prompt(prompt, params)
        stream = GenerationStream(prompt_ids, params, on_event, is_cancelled)
        with self._lock:
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

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
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
                    if admitted:
                        self._prefill(admitted)
                    self._drop_rows(
                        [row for row in self._rows if row.stream.poll_cancelled(poll)], FINISH_CANCELLED
                    )
                    if self._rows:
                        self._decode_step()
                except Exception as error:  # a broken forward ends every stream, not the thread
                    message = error.message if isinstance(error, MaasError) else repr(error)
                    self._drop_rows(list(self._rows), FINISH_ERROR, error=message)
        with self._lock:
            leftover = list(self._waiting)
            self._waiting.clear()
        for stream in leftover:
            self._finish_unstarted(stream, FINISH_CANCELLED)
        self._drop_rows(list(self._rows), FINISH_CANCELLED)

    def _admit(self) -> list[GenerationStream]:
        """Take the next waiting streams (arrival order, lock held) for one prefill: as many as
        free running slots allow while the padded prompt batch stays within the budget (the
        first one always goes, however long its prompt)."""
        admitted: list[GenerationStream] = []
        width = 0
        while self._waiting and len(self._rows) + len(admitted) < self.settings.max_running:
            next_width = max(width, len(self._waiting[0].prompt_ids))
            if admitted and next_width * (len(admitted) + 1) > self.settings.prefill_token_budget:
                break
            admitted.append(self._waiting.popleft())
            width = next_width
        return admitted

    def _usage(self, row_or_stream: _Row | GenerationStream) -> Usage:
        if isinstance(row_or_stream, GenerationStream):
            return Usage(len(row_or_stream.prompt_ids), 0, None)
        row = row_or_stream
        ttft = None if row.first_token_at is None else row.first_token_at - row.stream.submitted_at
        return Usage(len(row.stream.prompt_ids), len(row.generated), ttft)

    def _finish_unstarted(self, stream: GenerationStream, reason: str) -> None:
        self._deliver(stream, TokenGroup("", reason, self._usage(stream)))

    def _new_generator(self, seed: int | None) -> Any:
        import torch

        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return generator

    def _prefill(self, streams: list[GenerationStream]) -> None:
        """Prefill the admitted streams together (one left-padded forward), sample each one's
        first token and merge the rows that go on into the running batch."""
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
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = output.logits[:, -1, :].float()
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
            )
            if not self._accept(row, self._sample(row, logits[index])):
                continuing.append(index)
                rows.append(row)
        if rows:
            # The cache was filled in place; rows that already ended are left out of it.
            self._merge(rows, cache, mask, continuing)

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
        output = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=position_ids,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
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


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The longest end of `text` that could be the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
