"""The llama.cpp backend on the real starter model (Gemma 3 270M Q4_K_M): what only it does.

What every backend promises (stop strings, abort, concurrency, logprobs, usage, ...) is in
tests/test_backend_contract.py.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
from localllm.cli.error_words import cli_message
from localllm.core.errors import BadRequest, NoChatTemplate, PromptTooLong, TemplateError
from localllm.core.modelinfo import read_model_info
from greedy_check import assert_same_or_near_tie, greedy_ids
from waiting import until

FRANCE = "The capital of France is"
FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]


@pytest.fixture(scope="module")
def backend(starter_gguf):
    engine = LlamaCppBackend("starter", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=1024, n_threads=2))
    yield engine
    engine.close()


def collect(backend, prompt, params=None, *, templated=False, request_id="r"):
    """Run one request; return (text, finish event, token events)."""

    async def go():
        tokens, text, finish = [], "", None
        req = GenerationRequest(request_id, prompt, params or SamplingParams(temperature=0), templated=templated)
        async for event in backend.generate(req):
            if isinstance(event, TokenEvent):
                tokens.append(event)
                text += event.text
            else:
                finish = event
        return text, finish, tokens

    return asyncio.run(go())


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def test_tokenizer_matches_llama_cpp_reference(backend):
    assert backend.tokenize(FRANCE) == FRANCE_IDS


def test_same_seed_same_text_at_temperature(backend):
    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=24)
    first, _, _ = collect(backend, "Once upon a time", params)
    second, _, _ = collect(backend, "Once upon a time", dataclasses.replace(params))
    assert first == second
    others = {collect(backend, "Once upon a time", dataclasses.replace(params, seed=s))[0] for s in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds should not all give the same text"


def test_repeat_last_n_minus_one_penalises_the_whole_context(backend):
    """-1 means the whole context (llama.cpp's tools, Ollama), not "off"; 0 is off."""
    def text(last_n: int) -> str:
        return collect(backend, "The bicycle was", greedy(max_tokens=40, repeat_penalty=1.5, repeat_last_n=last_n))[0]

    whole, off = text(-1), text(0)
    assert whole == text(1024)  # the context is 1024 tokens
    assert whole != off


def test_prompt_longer_than_context_is_a_bad_request(backend):
    with pytest.raises(PromptTooLong, match="context") as refused:
        collect(backend, "word " * 2000, greedy(max_tokens=4))
    assert refused.value.prompt_tokens > refused.value.context == backend.n_ctx


def test_chat_prompt_uses_gemma_turns_and_one_bos(backend):
    prompt = backend.render_chat([{"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    tokens = backend.prompt_tokens(GenerationRequest("t", prompt, templated=True))
    assert tokens[0] == 2 and tokens[1] != 2
    start_of_turn = backend.tokenize("<start_of_turn>", add_bos=False, special=True)
    assert len(start_of_turn) == 1 and start_of_turn[0] in tokens
    text, finish, _ = collect(backend, prompt, greedy(max_tokens=16), templated=True)
    assert finish.reason in ("stop", "length")


def test_second_turn_reuses_the_cached_prefix_and_matches_a_cold_run(backend, starter_gguf):
    """Same greedy tokens as a cold run, up to a near-tie (see tests/greedy_check.py for why not always all)."""
    history = FRANCE + " the capital of the country of France."
    collect(backend, history, greedy(max_tokens=2))
    _, warm, warm_events = collect(backend, history + " It is", greedy(max_tokens=10))
    assert warm.usage.cached_prompt_tokens > 0
    cold_engine = LlamaCppBackend("cold", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=1024, n_threads=2))
    try:
        _, cold, cold_events = collect(cold_engine, history + " It is", greedy(max_tokens=10, logprobs=5))
    finally:
        cold_engine.close()
    assert cold.usage.cached_prompt_tokens == 0
    assert_same_or_near_tie(cold_events, greedy_ids(warm_events), "warm run")


def test_hostile_model_template_is_refused(starter_gguf, tmp_path):
    marker = tmp_path / "pwned"
    hostile = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    info = dataclasses.replace(read_model_info(starter_gguf), chat_template=hostile)
    engine = LlamaCppBackend("hostile", info, LlamaCppOptions(n_ctx=256, n_threads=2))
    try:
        with pytest.raises(TemplateError, match="hostile"):
            engine.render_chat([{"role": "user", "content": "hi"}])
    finally:
        engine.close()
    assert not marker.exists()


def test_unknown_architecture_without_template_refuses_chat_but_runs_raw(starter_gguf):
    info = dataclasses.replace(read_model_info(starter_gguf), architecture="mystery")
    engine = LlamaCppBackend("mystery-model", info, LlamaCppOptions(n_ctx=256, n_threads=2))
    try:
        with pytest.raises(NoChatTemplate, match="no chat template") as refused:
            engine.render_chat([{"role": "user", "content": "hi"}])
        assert cli_message(refused.value).endswith("; use --raw")  # the CLI names the way out
        text, finish, _ = collect(engine, FRANCE, greedy(max_tokens=4))
        assert text.startswith(" the capital") and finish.reason == "length"
    finally:
        engine.close()


def test_context_larger_than_trained_is_refused(starter_gguf):
    with pytest.raises(BadRequest, match="trained"):
        LlamaCppBackend("big", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=10**6))


def test_abort_during_a_long_prompt_lands_quickly(starter_gguf):
    """Esc or Ctrl+Q while a long prompt is processed must not wait for the whole chunk."""
    import time

    engine = LlamaCppBackend("long", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=4096, n_threads=2))
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 300  # ~3,000 tokens, seconds of work

    async def go():
        agen = engine.generate(GenerationRequest("long", long_prompt, greedy(max_tokens=4)))
        task = asyncio.ensure_future(agen.__anext__())
        await until(lambda: engine.stats().running == 1, what="the long prompt being admitted")  # its prompt runs now
        asked = time.perf_counter()
        engine.abort("long")
        event = await task
        return event, time.perf_counter() - asked

    try:
        event, waited = asyncio.run(go())
        assert isinstance(event, FinishEvent) and event.reason == "abort"
        assert waited < 0.5, f"abort took {waited:.2f} s"
        text, finish, _ = collect(engine, FRANCE, greedy(max_tokens=6), request_id="after")
        assert text.startswith(" the capital of the country")
    finally:
        engine.close()
