"""The continuous-batching engine on the real SmolLM2 (bf16): the same greedy text as
transformers' generate, alone or batched with other streams; stop strings, seeds, cancellation,
the queue bound and prompt checks behave as the Triton contract says."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from maas_llm.engine import EngineSettings, GenerationEngine, GenerationQueueFull
from maas_llm.sampling import SamplingParams
from maas_runtime.errors import InvalidArgument

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2+2?",
    "Write one sentence about the sea.",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A raw prompt SmolLM2 goes on counting from, greedily, for hundreds of tokens: a stream that
holds its slot until it is cancelled."""


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = GenerationEngine.from_directory(
        smollm2, EngineSettings(max_running=4, max_waiting=2, torch_threads=2)
    ).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.renderer.render([{"role": "user", "content": q}]) for q in QUESTIONS]


def reference_greedy(engine, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([engine.renderer.encode(prompt)])
    with torch.inference_mode():
        out = engine.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    generated = [t for t in out[0, ids.shape[1]:].tolist() if t not in engine.eos_token_ids]
    return engine.renderer.decode(generated)


def test_greedy_text_equals_transformers_generate(engine, prompts):
    text, final = engine.submit(prompts[0], GREEDY).text()
    assert text == reference_greedy(engine, prompts[0], GREEDY.max_tokens)
    assert "Paris" in text
    assert final.finish_reason == "stop", "SmolLM2 ends its answer with <|im_end|>"
    assert final.usage.prompt_tokens == len(engine.renderer.encode(prompts[0]))
    assert 0 < final.usage.completion_tokens <= GREEDY.max_tokens
    assert final.usage.time_to_first_token_s is not None and final.usage.time_to_first_token_s > 0


@pytest.mark.parametrize("prefill_token_budget", [1024, 1], ids=["one-prefill", "one-per-step"])
def test_four_concurrent_streams_give_the_same_greedy_text_as_alone(
    smollm2, prompts, prefill_token_budget
):
    # float32: in bf16 a batch of another shape rounds differently and a near-tie token can flip.
    engine = GenerationEngine.from_directory(
        smollm2,
        EngineSettings(
            max_running=4, torch_threads=2, dtype="float32", prefill_token_budget=prefill_token_budget
        ),
    ).start()
    try:
        alone = [engine.submit(prompt, GREEDY).text()[0] for prompt in prompts]
        streams = [engine.submit(prompt, GREEDY) for prompt in prompts]
        finals = [stream.text() for stream in streams]
    finally:
        engine.stop()
    assert [text for text, _ in finals] == alone
    if prefill_token_budget == 1:
        # A budget smaller than any prompt admits one stream per step, in arrival order, while
        # the ones already admitted decode: first tokens arrive one after another.
        first_tokens = [
            stream.submitted_at + (final.usage.time_to_first_token_s or 0.0)
            for stream, (_, final) in zip(streams, finals, strict=True)
        ]
        assert first_tokens == sorted(first_tokens)
        assert len(set(first_tokens)) == len(first_tokens)


def test_a_stream_joining_a_running_batch_gets_its_own_greedy_text(engine, prompts):
    long_params = SamplingParams(max_tokens=40, temperature=0)
    first = engine.submit(prompts[3], long_params)
    events = iter(first)
    next(events)  # the first stream is decoding when the second one joins
    second = engine.submit(prompts[1], GREEDY).text()[0]
    rest = "".join(event.text for event in events)
    assert second == reference_greedy(engine, prompts[1], GREEDY.max_tokens)
    assert rest


def test_max_tokens_ends_with_length_and_counts_exactly(engine, prompts):
    text, final = engine.submit(prompts[3], SamplingParams(max_tokens=3, temperature=0)).text()
    assert final.finish_reason == "length"
    assert final.usage.completion_tokens == 3
    assert text == reference_greedy(engine, prompts[3], 3)


def test_a_stop_string_ends_the_stream_and_is_not_emitted(engine, prompts):
    full = engine.submit(prompts[0], GREEDY).text()[0]
    assert "Paris" in full
    pieces = list(engine.submit(prompts[0], SamplingParams(max_tokens=24, temperature=0, stop=["Paris"])))
    text = "".join(piece.text for piece in pieces)
    assert pieces[-1].finish_reason == "stop"
    assert text == full[: full.index("Paris")]
    assert all("Par" not in piece.text for piece in pieces)


def test_the_same_seed_gives_the_same_sample_and_another_seed_differs(engine, prompts):
    def sample(seed: int) -> str:
        params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return engine.submit(prompts[3], params).text()[0]

    first = sample(11)
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14))


def test_a_cancelled_stream_frees_its_slot_at_once(engine, prompts):
    stream = engine.submit(prompts[3], SamplingParams(max_tokens=200, temperature=0))
    events = iter(stream)
    next(events)
    stream.cancel()
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].usage.completion_tokens < 200
    deadline = time.monotonic() + 5
    while engine.running_streams and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running_streams == 0


def test_a_cancel_callback_ends_the_stream_within_its_poll_interval(engine, prompts):
    stop = threading.Event()
    events = []
    cancelled_at: list[float] = []

    def on_event(event):
        events.append(event)
        if not stop.is_set():
            cancelled_at.append(time.perf_counter())
            stop.set()

    stream = engine.submit(prompts[3], SamplingParams(max_tokens=200, temperature=0),
                           on_event=on_event, is_cancelled=stop.is_set)
    assert stream.finished.wait(30)
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].usage.completion_tokens < 200
    # One poll interval (0.25 s) plus the step in flight, with room for a loaded machine.
    assert time.perf_counter() - cancelled_at[0] < engine.settings.cancel_poll_seconds + 3


def test_the_cancel_callback_is_asked_at_most_once_per_poll_interval(engine, prompts):
    # Triton's is_cancelled is a round trip to the server process: not one per token.
    calls = []
    started = time.perf_counter()
    _, final = engine.submit(
        prompts[3], SamplingParams(max_tokens=40, temperature=0),
        is_cancelled=lambda: calls.append(1) or False,
    ).text()
    elapsed = time.perf_counter() - started
    assert final.usage.completion_tokens > 1
    assert 1 <= len(calls) <= elapsed / engine.settings.cancel_poll_seconds + 2


def test_past_running_and_waiting_slots_submit_is_refused_with_resource_exhausted(engine, prompts):
    params = SamplingParams(max_tokens=400, temperature=0)
    streams = []
    try:
        with pytest.raises(GenerationQueueFull) as caught:
            for _ in range(4 + 2 + 1):  # max_running 4 + max_waiting 2, then one more
                streams.append(engine.submit(prompts[3], params))
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert caught.value.reason == "GENERATION_QUEUE_FULL"
        assert len(streams) >= 6
    finally:
        for stream in streams:
            stream.cancel()
        for stream in streams:
            assert stream.finished.wait(30)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", GREEDY, "text_input"),
        ("word " * 9000, GREEDY, "text_input"),
        ("hello", SamplingParams(max_tokens=8192), "max_tokens"),
    ],
)
def test_bad_prompts_are_refused_naming_the_field(engine, prompt, params, field):
    with pytest.raises(InvalidArgument) as caught:
        engine.submit(prompt, params)
    assert caught.value.field_violations[0].field == field


class _EngineGate:
    """Holds the engine thread inside a stream's `on_event` (the engine delivers events on its
    own thread) so that streams submitted meanwhile all wait for the same admission."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self.armed = False

    def on_event(self, event) -> None:
        if self.armed and not event.final:
            self.armed = False
            self.holding.set()
            assert self.release.wait(30)

    def hold(self) -> None:
        self.armed = True
        assert self.holding.wait(30), "the engine thread never reached the gate"


class _FirstTokens:
    """The order in which streams got their first token (recorded on the engine thread)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def on_event(self, name: str, also=None):
        def record(event) -> None:
            if (event.text or event.usage.completion_tokens) and name not in self.order:
                self.order.append(name)
            if also is not None:
                also(event)
        return record


def test_a_free_slot_goes_to_the_tenant_with_fewest_running_streams_not_the_oldest_waiting(
    smollm2, prompts
):
    engine = GenerationEngine.from_directory(
        smollm2, EngineSettings(max_running=2, torch_threads=2)
    ).start()
    gate, firsts = _EngineGate(), _FirstTokens()
    long = SamplingParams(max_tokens=300, temperature=0)
    try:
        flood = [
            engine.submit(COUNTING, long, tenant="flooder",
                          on_event=firsts.on_event(f"F{n}", gate.on_event if n == 0 else None))
            for n in range(2)
        ]
        while len(firsts.order) < 2:
            time.sleep(0.01)
        gate.hold()  # both slots are the flooder's; everything below waits for one
        waiting = [engine.submit(prompts[1], GREEDY, tenant="flooder", on_event=firsts.on_event(f"W{n}"))
                   for n in range(2)]
        quiet = engine.submit(prompts[0], GREEDY, tenant="quiet", on_event=firsts.on_event("Q"))
        flood[1].cancel()
        gate.release.set()
        assert quiet.finished.wait(60)
        # The quiet tenant came last, yet took the freed slot: the flooder already had one.
        assert firsts.order[:3] == ["F0", "F1", "Q"] or firsts.order[:3] == ["F1", "F0", "Q"]
        assert not any(stream.finished.is_set() for stream in waiting)
    finally:
        for stream in [*flood, *waiting, quiet]:
            stream.cancel()
        engine.stop()


def test_newcomers_are_prefilled_per_tenant_the_least_served_tenant_first(smollm2, prompts):
    engine = GenerationEngine.from_directory(
        smollm2, EngineSettings(max_running=8, torch_threads=2)
    ).start()
    gate, firsts = _EngineGate(), _FirstTokens()
    finals = {}

    def keep_final(name):
        def record(event) -> None:
            if event.final:
                finals[name] = event
        return record

    long = SamplingParams(max_tokens=300, temperature=0)
    try:
        running = [engine.submit(COUNTING, long, tenant="flooder",
                                 on_event=firsts.on_event(f"F{n}", gate.on_event if n == 0 else None))
                   for n in range(2)]
        while len(firsts.order) < 2:
            time.sleep(0.01)
        gate.hold()
        # Submitted while the engine is held: all of them are admitted at its next step.
        newcomers = [
            engine.submit(prompt, GREEDY, tenant=tenant,
                          on_event=firsts.on_event(name, keep_final(name)))
            for name, tenant, prompt in [
                ("A1", "flooder", prompts[1]), ("A2", "flooder", prompts[2]),
                ("B1", "burst", prompts[0]), ("B2", "burst", prompts[1]),
                ("Q", "quiet", prompts[2]),
            ]
        ]
        gate.release.set()
        for stream in newcomers:
            assert stream.finished.wait(60)
    finally:
        for stream in running:
            stream.cancel()
        engine.stop()
    # One prefill per tenant, never a padded batch mixing tenants; a tenant's own streams
    # share theirs. The tenants with no stream running go first (in arrival order), the
    # flooder, which has two, after them, although it asked first.
    assert {name: finals[name].usage.prefill_streams for name in finals} == {
        "A1": 2, "A2": 2, "B1": 2, "B2": 2, "Q": 1}
    newcomer_order = [name for name in firsts.order if name not in ("F0", "F1")]
    assert newcomer_order == ["B1", "B2", "Q", "A1", "A2"]


def test_a_newcomer_is_prefilled_between_two_layers_of_the_decode_step_in_flight(smollm2, prompts):
    engine = GenerationEngine.from_directory(
        smollm2, EngineSettings(max_running=4, torch_threads=2)
    ).start()
    events: list[tuple[str, str]] = []  # (stream, text) in the order the engine delivered them
    inside_step, resume = threading.Event(), threading.Event()
    armed = []

    def hold_mid_step(module, args) -> None:
        if armed and armed.pop():
            inside_step.set()
            assert resume.wait(30)

    def record(name):
        return lambda event: events.append((name, event.text))

    # Registered after the engine's own hooks: the engine looks for newcomers at the next layer.
    hook = engine.model.model.layers[10].register_forward_pre_hook(hold_mid_step)
    running = [engine.submit(COUNTING, SamplingParams(max_tokens=300, temperature=0),
                             on_event=record(f"F{n}")) for n in range(2)]
    try:
        while len(events) < 4:
            time.sleep(0.01)
        armed.append(True)  # the next forward is a decode step of the two running streams
        assert inside_step.wait(30)
        delivered_before = len(events)
        newcomer = engine.submit(prompts[0], GREEDY, tenant="quiet", on_event=record("Q"))
        resume.set()
        assert newcomer.finished.wait(60)
    finally:
        hook.remove()
        for stream in running:
            stream.cancel()
        for stream in running:
            assert stream.finished.wait(30)
        engine.stop()
    # Its first token came before the tokens of the step it arrived in; once merged into the
    # batch it decodes its own answer, and the running streams go on with theirs.
    assert events[delivered_before][0] == "Q"
    assert "Paris" in "".join(text for name, text in events if name == "Q")
    counted = "".join(text for name, text in events if name == "F0")
    assert len(counted) > 4 and (" " + ", ".join(str(n) for n in range(11, 200))).startswith(counted)
