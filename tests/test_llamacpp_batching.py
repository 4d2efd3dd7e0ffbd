"""The llama.cpp backend's continuous batching and prompt reuse, on the real starter model.

Greedy outputs computed beside other sequences are compared with solo runs
"up to a near-tie" (tests/greedy_check.py says why llama.cpp's arithmetic
differs with batch shape); everything else (lengths, stops, aborts, stats,
ordering in time) is exact.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from greedy_check import assert_same_or_near_tie, greedy_ids
from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
from localllm.core.modelinfo import read_model_info
from waiting import until

FRANCE = "The capital of France is"
THREADS = 1  # the CPU is shared with other test processes; two spinning threads suffer most


@pytest.fixture(scope="module")
def engine(starter_gguf):
    backend = LlamaCppBackend(
        "starter", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=4096, n_threads=THREADS, n_parallel=8)
    )
    yield backend
    backend.close()


def open_engine(starter_gguf, **options) -> LlamaCppBackend:
    return LlamaCppBackend("starter", read_model_info(starter_gguf), LlamaCppOptions(n_threads=THREADS, **options))


@dataclass
class Outcome:
    events: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None
    first_at: float = 0.0  # when the first token arrived
    done_at: float = 0.0

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


async def stream(
    backend, rid: str, prompt, params: SamplingParams, *, templated: bool = False, started: asyncio.Event | None = None
) -> Outcome:
    out = Outcome()
    async for event in backend.generate(GenerationRequest(rid, prompt, params, templated=templated)):
        if isinstance(event, TokenEvent):
            if event.token_ids and not out.first_at:
                out.first_at = time.perf_counter()
                if started is not None:
                    started.set()  # the prompt is in the cache now
            out.events.append(event)
        else:
            out.finish = event
    out.done_at = time.perf_counter()
    return out


def run(backend, rid, prompt, params) -> Outcome:
    return asyncio.run(stream(backend, rid, prompt, params))


async def peak_running(backend, until: asyncio.Future) -> int:
    peak = 0
    while not until.done():
        peak = max(peak, backend.stats().running)
        await asyncio.sleep(0.01)
    return peak


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


# -- slot bookkeeping (no model) --------------------------------------------------------------


def test_common_prefix_agrees_with_a_plain_scan():
    import random

    from localllm.backends.llamacpp_slots import common_prefix

    rng = random.Random(3)
    for _ in range(300):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 40))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 10))]
        plain = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == plain


def test_slot_plans_reuse_the_longest_prefix_and_count_shared_cells_once():
    from localllm.backends.llamacpp_slots import SlotTable

    table = SlotTable(3)
    chat, other = table.slots[0], table.slots[1]
    chat.cached = [1, 2, 3, 4, 5, 6]
    other.cached = [1, 2, 9]
    plan = table.plan([1, 2, 3, 4, 5, 6, 7, 8])  # a chat's next turn continues its own slot
    assert (plan.slot, plan.source, plan.reuse) == (chat, chat, 6)
    plan = table.plan([1, 2, 3, 4, 5, 6])  # the same prompt again: its last token must run
    assert plan.reuse == 5
    chat.job = object()  # busy: a request sharing its prefix copies into the empty slot
    plan = table.plan([1, 2, 3, 4, 0])
    assert (plan.slot, plan.source, plan.reuse) == (table.slots[2], chat, 4)
    assert table.plan([7, 7]).reuse == 0
    table.slots[2].cached = [1, 2, 3, 4, 0]  # as if that copy was made and the prompt run
    assert table.cells_in_use() == 6 + 1 + 1  # [1..6], 9 after [1, 2], 0 after [1..4]
    for slot in table.slots:
        slot.job = object()
    assert table.plan([1]) is None  # every slot busy: the request waits


# Eight requests that differ in prompt, length, stop strings and sampling.
DIGITS = 'root ::= [0-9] [0-9] [0-9] "-" [0-9] [0-9] [0-9] [0-9]'
REQUESTS = {
    "short": ("The quick brown fox", greedy(max_tokens=3)),
    "stop": (FRANCE, greedy(max_tokens=40, stop=["France"])),
    "long": ("Once upon a time", greedy(max_tokens=48)),
    "code": ("def fibonacci(n):", greedy(max_tokens=24, stop=["return 1"])),
    "seeded": ("My favourite colour is", SamplingParams(temperature=0.9, seed=1234, max_tokens=20)),
    "penalty": ("Water boils at", SamplingParams(temperature=0.7, seed=5, repeat_penalty=1.5, max_tokens=16)),
    "grammar": ("Call me at", SamplingParams(temperature=0.8, seed=9, max_tokens=30, grammar=DIGITS)),
    "logprobs": ("In 1492, Columbus", greedy(max_tokens=12, logprobs=3)),
}


def test_eight_concurrent_requests_with_their_own_lengths_stops_and_sampling(engine):
    """All eight run in one batch; each ends as its own parameters say, greedy ones as they would alone."""
    solo = {
        name: run(engine, f"solo-{name}", prompt, SamplingParams(**{**vars(params), "logprobs": 5}) if params.temperature == 0 else params)
        for name, (prompt, params) in REQUESTS.items()
    }

    async def together():
        tasks = {name: asyncio.ensure_future(stream(engine, name, prompt, params)) for name, (prompt, params) in REQUESTS.items()}
        all_done = asyncio.ensure_future(asyncio.gather(*tasks.values()))
        peak = await peak_running(engine, all_done)
        await all_done
        return {name: t.result() for name, t in tasks.items()}, peak

    batched, peak = asyncio.run(together())
    assert peak >= 6, f"only {peak} requests ran at once"
    for name, (prompt, params) in REQUESTS.items():
        out, finish = batched[name], batched[name].finish
        assert finish is not None and finish.reason in ("stop", "length"), (name, finish)
        assert finish.usage.prompt_tokens == len(engine.prompt_tokens(GenerationRequest("x", prompt)))
        emitted = len(greedy_ids(out.events))  # an end-of-generation token counts but is not sent
        assert finish.usage.completion_tokens in (emitted, emitted + (finish.reason == "stop"))
        assert finish.usage.completion_tokens <= params.max_tokens
        if finish.reason == "length":
            assert finish.usage.completion_tokens == params.max_tokens
        for stop in params.stop:
            assert stop not in out.text
        if params.temperature == 0:
            assert_same_or_near_tie(solo[name].events, greedy_ids(out.events), name)
    # what each parameter promises, beside seven other requests
    assert batched["short"].finish.usage.completion_tokens == 3
    assert batched["stop"].finish.reason == "stop" and batched["stop"].text.startswith(" the capital")
    grammar_text = batched["grammar"].text
    assert len(grammar_text) == 8 and grammar_text[3] == "-" and grammar_text.replace("-", "").isdigit(), grammar_text
    first = batched["logprobs"].events[0].logprobs[0]
    assert first["token"] == batched["logprobs"].events[0].token_ids[0] == first["top"][0]["token"]
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.slots_total == 8


def test_a_cancelled_request_frees_its_slot_at_once(starter_gguf):
    """One slot: a long request holds it, a second waits; cancelling the first lets the second in."""
    engine = open_engine(starter_gguf, n_ctx=1024, n_parallel=1)

    async def scenario():
        holder = engine.generate(GenerationRequest("holder", FRANCE, greedy(max_tokens=500)))
        first = await holder.__anext__()  # it is generating
        assert isinstance(first, TokenEvent)
        waiter = asyncio.ensure_future(stream(engine, "waiter", "Once upon a time", greedy(max_tokens=4)))
        await until(lambda: engine.stats().waiting == 1, what="the second request waiting")
        assert engine.stats().running == 1
        cancelled_at = time.perf_counter()
        await holder.aclose()  # the client went away: the request is aborted
        out = await waiter
        return out, cancelled_at

    try:
        out, cancelled_at = asyncio.run(scenario())
        assert out.finish.reason == "length" and out.finish.usage.completion_tokens == 4
        waited = out.first_at - cancelled_at
        assert waited < 2.0, f"the waiting request started {waited:.2f} s after the cancel"
        assert out.finish.timings.queued_s > 0
        stats = engine.stats()
        assert stats.running == 0 and stats.waiting == 0
    finally:
        engine.close()


def test_a_request_arriving_during_a_long_prompt_streams_before_that_prompt_finishes(engine):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 200
    n_long = len(engine.prompt_tokens(GenerationRequest("x", long_prompt)))
    assert n_long >= 2000

    async def scenario():
        big = asyncio.ensure_future(stream(engine, "big", long_prompt, greedy(max_tokens=2)))
        await until(lambda: engine.stats().running == 1, what="the long prompt being admitted")  # it is processed from now on
        small = await stream(engine, "small", "Once upon a time", greedy(max_tokens=8))
        return await big, small

    big, small = asyncio.run(scenario())
    assert big.finish.reason == "length" and small.finish.reason == "length"
    assert big.finish.usage.cached_prompt_tokens < n_long // 2  # it really was processed
    assert small.first_at < big.first_at, "the short request waited for the whole long prompt"
    assert small.done_at < big.first_at, "the short request's stream stalled behind the long prompt"


def test_a_prefix_reuse_hit_shows_in_stats_and_gives_the_cold_greedy_output(engine, starter_gguf):
    """A second request sharing a long prefix with a running one copies its cache instead of recomputing."""
    system = "You are a careful assistant who answers questions about geography in one short sentence. " * 6
    first_prompt, second_prompt = system + "Question: what is the capital of Italy?", system + "Question: what is the capital of Spain?"
    n_system = len(engine.prompt_tokens(GenerationRequest("x", system)))
    before = engine.stats()

    async def scenario():
        started = asyncio.Event()
        first = asyncio.ensure_future(stream(engine, "first", first_prompt, greedy(max_tokens=40), started=started))
        await asyncio.wait_for(started.wait(), 120)  # its prompt is cached and it is still generating
        second = await stream(engine, "second", second_prompt, greedy(max_tokens=16))
        return await first, second

    first, second = asyncio.run(scenario())
    after = engine.stats()
    assert second.finish.usage.cached_prompt_tokens >= n_system - 1
    assert after.prefix_cache_hits >= before.prefix_cache_hits + 1
    assert after.prefix_cache_tokens >= before.prefix_cache_tokens + n_system - 1
    assert 0 < after.prefix_cache_hit_rate <= 1

    cold_engine = open_engine(starter_gguf, n_ctx=1024, n_parallel=1)
    try:
        cold = run(cold_engine, "cold", second_prompt, greedy(max_tokens=16, logprobs=5))
        cold_first = run(cold_engine, "cold-first", first_prompt, greedy(max_tokens=40, logprobs=5))
    finally:
        cold_engine.close()
    assert cold.finish.usage.cached_prompt_tokens == 0
    assert_same_or_near_tie(cold.events, greedy_ids(second.events), "reused prefix")
    assert_same_or_near_tie(cold_first.events, greedy_ids(first.events), "the request whose cache was shared")


def test_a_full_cache_preempts_and_resumes_without_losing_tokens(starter_gguf):
    """Two requests that together outgrow a 256-token cache: one waits and is recomputed; both finish whole."""
    prompt_a = "The history of the city of Paris begins with a small settlement on an island in the river. " * 6
    prompt_b = "Once upon a time there was a little girl who lived in a village near the forest. " * 6
    engine = open_engine(starter_gguf, n_ctx=256, n_parallel=2)
    try:
        lengths = [len(engine.prompt_tokens(GenerationRequest("x", p))) for p in (prompt_a, prompt_b)]
        assert sum(lengths) + 2 * 40 > 256 and max(lengths) + 40 < 256
        solo = run(engine, "solo", prompt_b, greedy(max_tokens=40, logprobs=5))

        async def together():
            return await asyncio.gather(
                stream(engine, "a", prompt_a, greedy(max_tokens=40)), stream(engine, "b", prompt_b, greedy(max_tokens=40))
            )

        a, b = asyncio.run(together())
        assert engine._engine.scheduler.preemptions >= 1  # the scenario did fill the cache
    finally:
        engine.close()
    for out in (a, b):
        assert out.finish.reason in ("length", "stop"), out.finish
        if out.finish.reason == "length":
            assert out.finish.usage.completion_tokens == 40
    assert_same_or_near_tie(solo.events, greedy_ids(b.events), "preempted or not")


def test_concurrent_http_streams_reach_the_engine_together(tmp_path, starter_gguf):
    """Through `localllm serve --parallel 4`: four streams are all under way before any of them ends."""
    import json

    import httpx

    from server_harness import make_store, start_server

    make_store(tmp_path, {"starter": starter_gguf})
    server = start_server(tmp_path, "starter", "--ctx", "1024", "--threads", str(THREADS), "--parallel", "4")

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        body = {"model": "starter", "prompt": f"Story number {i}: once upon a time", "max_tokens": 24, "temperature": 0, "stream": True}
        stamps = []
        async with client.stream("POST", f"{server.v1}/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    if any(c.get("text") for c in json.loads(line[5:])["choices"]):
                        stamps.append(time.perf_counter())
        return stamps

    async def four():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    try:
        streams = asyncio.run(four())
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    assert all(len(s) >= 2 for s in streams)
    assert max(s[0] for s in streams) < min(s[-1] for s in streams), "the streams ran one after another"
    assert "localllm_slots 4.0" in metrics
    assert "localllm_prefix_cache_hits_total" in metrics
