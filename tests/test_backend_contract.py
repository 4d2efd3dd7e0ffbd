"""What every backend promises, written once and run on llama.cpp, the native engine and the remote backend.

Each case drives only the public Backend interface (generate, abort, stats,
close) of a backend opened with `open_backend`, on the real starter model:
llama.cpp and the native engine (torch on the CPU) load the GGUF; the remote
backend talks to a real `localllm serve starter` on 127.0.0.1. Where a backend
does not keep a promise, its case is marked with the reason, as a strict
expected failure: the mark must go when the backend gains the behaviour.
What only one engine does (its KV blocks, its batching, its cold/warm
exactness, the upstream seeing a cancel) stays in that engine's own tests.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest

from localllm.backends.base import Backend
from localllm.backends.remotes import RemoteModel
from localllm.backends.select import LoadOptions, open_backend
from localllm.core.errors import BadRequest
from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from localllm.store.store import ResolvedModel
from server_harness import make_store, start_server
from waiting import until

BACKENDS = ("llamacpp", "native", "remote")
N_CTX = 1024
FRANCE = "The capital of France is"
FRANCE_PROMPT_TOKENS = 6  # BOS and five words, as llama.cpp's reference tokenizer splits them
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding counts on for thousands of tokens
# Prompts whose 6 greedy tokens are far from any near-tie (the top two choices at least
# 1.8 nats apart on llama.cpp), so batching, which moves llama.cpp's logits by up to
# ~0.25 nats (greedy_check.py), cannot change them.
CONFIDENT = [COUNTING, "one, two, three, four,", "2, 4, 6, 8, 10,", "A, B, C, D, E, F,"]
TEXT = "The river runs past the old mill, under the stone bridge and through the village. "

_ids = itertools.count()


def each_backend(**gaps: pytest.MarkDecorator):
    """Run the case on every backend; `gaps` maps a backend to the mark that says why it fails there."""
    params = [pytest.param(name, marks=gaps.get(name, ())) for name in BACKENDS]
    return pytest.mark.parametrize("backend", params, indirect=True, scope="module")


def gap(reason: str, raises: type[BaseException] = AssertionError) -> pytest.MarkDecorator:
    return pytest.mark.xfail(reason=reason, raises=raises, strict=True)


@pytest.fixture(scope="module")
def backend(request, starter_gguf, tmp_path_factory) -> Iterator[Backend]:
    if request.param == "remote":
        home = tmp_path_factory.mktemp("upstream")
        make_store(home, {"starter": starter_gguf})
        upstream = start_server(home, "starter", "--ctx", str(N_CTX), "--threads", "2")
        try:
            opened = open_backend(RemoteModel.named("starter"), LoadOptions(backend="remote", remote_url=upstream.v1))
            yield opened
            opened.close()
        finally:
            upstream.stop()
        assert "Traceback" not in upstream.log_text(), upstream.log_text()
        return
    threads = 2 if request.param == "llamacpp" else 1
    opened = open_backend(
        ResolvedModel("starter", starter_gguf), LoadOptions(backend=request.param, n_ctx=N_CTX, n_threads=threads)
    )
    assert opened.name == request.param
    yield opened
    opened.close()


# -- driving a backend -------------------------------------------------------------------------


@dataclass
class Reply:
    text: str = ""
    events: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None

    @property
    def tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.events)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def request(prompt: str | list[int], params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(f"contract-{next(_ids)}", prompt, params)


async def stream(backend: Backend, req: GenerationRequest, on_event: Callable[[], None] = lambda: None) -> Reply:
    reply = Reply()
    async for event in backend.generate(req):
        on_event()
        if isinstance(event, TokenEvent):
            reply.events.append(event)
            reply.text += event.text
        else:
            reply.finish = event
    assert reply.finish is not None, "the stream ended without a finish event"
    return reply


def run(backend: Backend, prompt: str | list[int], params: SamplingParams) -> Reply:
    return asyncio.run(stream(backend, request(prompt, params)))


async def counted_running(backend: Backend) -> None:
    """Wait for the stats to count the one streaming request (an engine may publish them a step late)."""
    await until(lambda: backend.stats().running == 1, what="the stats counting the streaming request")


def wait_until_idle(backend: Backend) -> None:
    asyncio.run(until(lambda: backend.stats().running == 0, what="the backend running no request"))


def assert_still_serves(backend: Backend) -> None:
    after = run(backend, FRANCE, greedy(max_tokens=4))
    assert after.finish.reason == "length" and after.text.startswith(" the capital")


# -- the contract ---------------------------------------------------------------------------------


@each_backend()
def test_the_finish_event_carries_usage_and_timings(backend):
    finished_before = backend.stats().requests_finished
    reply = run(backend, FRANCE, greedy(max_tokens=8))
    assert reply.text.startswith(" the capital of the country")  # the starter's greedy answer
    finish = reply.finish
    assert finish.reason == "length" and finish.error is None
    assert finish.usage.prompt_tokens == FRANCE_PROMPT_TOKENS
    assert finish.usage.completion_tokens == 8 == reply.tokens
    assert finish.usage.total_tokens == FRANCE_PROMPT_TOKENS + 8
    t = finish.timings
    assert 0 < t.prompt_s <= t.ttft_s <= t.total_s and t.decode_s > 0
    assert t.decode_tokens_per_s(finish.usage.completion_tokens) > 0
    assert backend.stats().requests_finished == finished_before + 1


@each_backend()
def test_stop_strings_end_the_text_and_never_leak(backend):
    """A stop string that starts inside one token and ends inside another: nothing of it is ever sent."""
    free = run(backend, FRANCE, greedy(max_tokens=12)).text
    stop = "y of Fr"  # " country" | " of" | " France"
    assert stop in free
    reply = run(backend, FRANCE, greedy(max_tokens=40, stop=["never", stop]))
    assert reply.text == free[: free.index(stop)]
    assert reply.finish.reason == "stop"
    assert backend.stats().running == 0


@each_backend(remote=gap("the OpenAI stream does not say which stop string matched"))
def test_the_finish_names_the_stop_string_that_ended_the_text(backend):
    reply = run(backend, FRANCE, greedy(max_tokens=40, stop=["never", "France"]))
    assert reply.finish.reason == "stop" and reply.finish.stop_sequence == "France"


@each_backend()
def test_abort_mid_stream_ends_with_abort_and_frees_the_request(backend):
    req = request(COUNTING, greedy(max_tokens=400))

    async def go() -> Reply:
        reply, asked = Reply(), False
        async for event in backend.generate(req):
            if isinstance(event, FinishEvent):
                reply.finish = event
                continue
            reply.events.append(event)
            if reply.tokens >= 3 and not asked:
                await counted_running(backend)
                backend.abort(req.request_id)
                asked = True
        return reply

    reply = asyncio.run(go())
    assert reply.finish.reason == "abort"
    assert 3 <= reply.finish.usage.completion_tokens < 400
    wait_until_idle(backend)
    assert_still_serves(backend)


@each_backend()
@pytest.mark.parametrize("leave", ["close", "cancel"])
def test_a_client_that_walks_away_frees_its_request(backend, leave):
    """The consumer stops iterating (closes the stream) or its task is cancelled: the request ends."""

    async def go() -> None:
        events = backend.generate(request(COUNTING, greedy(max_tokens=400)))
        if leave == "close":
            async for event in events:
                if isinstance(event, TokenEvent) and event.token_ids:
                    break
            await counted_running(backend)
            await events.aclose()
        else:
            first_token = asyncio.Event()

            async def listen() -> None:
                async for event in events:
                    if isinstance(event, TokenEvent) and event.token_ids:
                        first_token.set()

            task = asyncio.create_task(listen())
            await asyncio.wait_for(first_token.wait(), 120)
            await counted_running(backend)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await until(lambda: backend.stats().running == 0, what="the walked-away request ending")

    asyncio.run(go())
    assert_still_serves(backend)


@each_backend()
def test_many_requests_at_once_each_get_their_own_reply(backend):
    params = greedy(max_tokens=6)
    alone = [run(backend, prompt, params).text for prompt in CONFIDENT]
    most_running = 0

    def note_running() -> None:
        nonlocal most_running
        most_running = max(most_running, backend.stats().running)

    async def together() -> list[Reply]:
        return await asyncio.gather(*(stream(backend, request(p, params), note_running) for p in CONFIDENT))

    replies = asyncio.run(together())
    assert [r.text for r in replies] == alone
    assert all(r.finish.reason == "length" and r.finish.usage.completion_tokens == 6 for r in replies)
    assert most_running >= 2, "the requests never ran side by side"


@each_backend()
def test_a_request_sharing_a_prefix_is_served_from_the_cache(backend):
    shared = TEXT * 5  # about 90 tokens
    run(backend, shared + "The mill", greedy(max_tokens=2))
    second = run(backend, shared + "A heron", greedy(max_tokens=2))
    assert second.finish.reason == "length" and second.finish.usage.completion_tokens == 2
    assert second.finish.usage.cached_prompt_tokens >= 64


@each_backend(remote=gap("the remote backend's stats are its own; the upstream's cache shows only in each reply's usage"))
def test_stats_report_prefix_reuse(backend):
    shared = TEXT * 6 + "Once"
    run(backend, shared, greedy(max_tokens=2))
    before = backend.stats().prefix_cache_hit_rate
    run(backend, shared + " more", greedy(max_tokens=2))  # almost all of its prompt is cached
    assert backend.stats().prefix_cache_hit_rate > before


@each_backend()
def test_logprobs_name_each_token_and_its_best_alternatives(backend):
    reply = run(backend, FRANCE, greedy(max_tokens=3, logprobs=3))
    entries = [entry for event in reply.events for entry in event.logprobs or []]
    assert len(entries) == 3 == reply.finish.usage.completion_tokens
    assert "".join(entry["text"] for entry in entries) == reply.text
    for entry in entries:
        top = entry["top"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["text"] == top[0]["text"] and entry["logprob"] == top[0]["logprob"] <= 0  # greedy takes the best
    assert [t["text"] for t in entries[0]["top"]] == [" the", " a", " Paris"]  # llama.cpp's reference top 3


@each_backend()
@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(stop=[""])], ids=str)
def test_invalid_sampling_values_are_refused_before_anything_runs(backend, bad):
    with pytest.raises(BadRequest):
        run(backend, FRANCE, SamplingParams(**bad))
    assert backend.stats().running == 0


@each_backend()
def test_a_prompt_longer_than_the_context_is_refused(backend):
    with pytest.raises(BadRequest, match="context"):
        run(backend, "word " * 2000, greedy(max_tokens=4))
    assert backend.stats().running == 0
    assert_still_serves(backend)


@each_backend()
def test_an_empty_prompt_is_refused(backend):
    with pytest.raises(BadRequest, match="empty"):
        run(backend, [], greedy(max_tokens=4))
