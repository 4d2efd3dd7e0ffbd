"""Speculative decoding in the llama.cpp engine, on the real starter model.

Greedy texts are compared with plain decoding "up to a near-tie" where the
text is open (tests/greedy_check.py: llama.cpp's sums change order with the
number of rows in a step); where the model is copying it is sure of every
token, so there the texts must be identical. The cache is checked directly:
after a request it holds exactly verified tokens, so no rejected guess can
leak into a later request's reused prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import pytest

from greedy_check import assert_same_or_near_tie, greedy_ids
from localllm.core.requests import GenerationRequest, SamplingParams
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
from localllm.backends.llamacpp_guessers import check_same_vocabulary
from localllm.backends.llamacpp_speculative import SpecRecord
from localllm.core.errors import BadRequest
from localllm.core.modelinfo import read_model_info
from localllm.core.speculation import LlamaCppGuessing, SpeculationOptions
from test_llamacpp_batching import THREADS, greedy, run, stream
from waiting import until

PARAGRAPH = (
    "The lighthouse at the end of the harbour was built in 1871 from granite quarried on the island. "
    "Its lamp, first fed with whale oil and later with paraffin, could be seen twenty miles out to sea."
)
COPY = f"Original text:\n\n{PARAGRAPH}\n\nThe same text, copied word for word:\n\n"
# Greedy continuations of a small base model repeat themselves: prompt lookup guesses
# right for a while and then wrong where the repetition breaks, so guesses get rejected.
OPEN = ["The history of the bicycle begins in the early nineteenth century, when", "def fibonacci(n):"]


def open_backend(starter_gguf, speculation=None, **options) -> LlamaCppBackend:
    return LlamaCppBackend(
        "starter", read_model_info(starter_gguf),
        LlamaCppOptions(n_threads=THREADS, speculation=speculation, **options),
    )


@pytest.fixture(scope="module")
def plain(starter_gguf):
    backend = open_backend(starter_gguf, n_parallel=4)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ngram(starter_gguf):
    backend = open_backend(starter_gguf, SpeculationOptions("ngram"), n_parallel=4)
    yield backend
    backend.close()


def assert_cache_holds_only_verified_tokens(backend: LlamaCppBackend, prompt: str, outcome) -> None:
    """The slot that served `prompt` holds a prefix of prompt + output, and llama.cpp holds the same count."""
    engine = backend._engine
    tokens = backend.prompt_tokens(GenerationRequest("probe", prompt, SamplingParams())) + greedy_ids(outcome.events)
    slot = max(engine.slots.slots, key=lambda s: len(s.cached) if tokens[: len(s.cached)] == s.cached else -1)
    assert slot.cached == tokens[: len(slot.cached)] and len(slot.cached) >= len(tokens) - 1
    assert engine.lc.llama_memory_seq_pos_max(engine.mem, slot.seq_id) + 1 == len(slot.cached)


def test_speculative_copying_keeps_plain_greedy_text_and_nearly_every_guess(plain, ngram):
    params = greedy(max_tokens=80, stop=["\n\n"])
    reference = run(plain, "plain-copy", COPY, params)
    got = run(ngram, "spec-copy", COPY, params)
    assert greedy_ids(got.events) == greedy_ids(reference.events)
    assert got.text == reference.text and got.text.startswith(PARAGRAPH[:60])
    usage = got.finish.usage
    assert usage.completion_tokens == reference.finish.usage.completion_tokens
    assert usage.draft_tokens >= 30 and usage.accepted_draft_tokens >= 0.9 * usage.draft_tokens
    stats = ngram.stats()
    assert stats.spec_draft_tokens >= usage.draft_tokens and stats.spec_accepted_tokens >= usage.accepted_draft_tokens
    assert stats.last_spec_acceptance_rate == pytest.approx(usage.accepted_draft_tokens / usage.draft_tokens)
    assert_cache_holds_only_verified_tokens(ngram, COPY, got)


def test_speculative_rejected_guesses_roll_back_and_greedy_text_stays_plain(plain, ngram):
    checked = kept = 0
    for i, prompt in enumerate(OPEN):
        reference = run(plain, f"plain-open-{i}", prompt, greedy(max_tokens=64, logprobs=2))
        got = run(ngram, f"spec-open-{i}", prompt, greedy(max_tokens=64))
        assert_same_or_near_tie(reference.events, greedy_ids(got.events), f"open prompt {i}")
        assert got.finish.usage.completion_tokens == 64
        assert_cache_holds_only_verified_tokens(ngram, prompt, got)
        checked += got.finish.usage.draft_tokens
        kept += got.finish.usage.accepted_draft_tokens
    assert 0 < kept < checked  # guesses were made, and some were rejected and rolled back


def test_speculative_guesses_end_at_max_tokens_and_stop_strings(plain, ngram):
    for params in (greedy(max_tokens=7), greedy(max_tokens=80, stop=["paraffin"])):
        reference = run(plain, "plain-limits", COPY, params)
        got = run(ngram, "spec-limits", COPY, params)
        assert got.text == reference.text
        assert got.finish.reason == reference.finish.reason
        assert got.finish.usage.completion_tokens == reference.finish.usage.completion_tokens
        assert_cache_holds_only_verified_tokens(ngram, COPY, got)
    assert "paraffin" not in got.text and got.text.endswith("later with ")


def test_speculative_requests_beside_others_and_sampled_ones_complete(plain, ngram):
    sampled = SamplingParams(temperature=0.8, seed=11, max_tokens=48)

    async def together():
        return await asyncio.gather(
            stream(ngram, "t-copy", COPY, greedy(max_tokens=60, stop=["\n\n"])),
            stream(ngram, "t-open", OPEN[0], greedy(max_tokens=48)),
            stream(ngram, "t-sampled", COPY, sampled),
        )

    copy, open_, story = asyncio.run(together())
    assert greedy_ids(copy.events) == greedy_ids(run(plain, "p-copy", COPY, greedy(max_tokens=60, stop=["\n\n"])).events)
    reference = run(plain, "p-open", OPEN[0], greedy(max_tokens=48, logprobs=2))
    assert_same_or_near_tie(reference.events, greedy_ids(open_.events), "open beside others")
    assert story.finish.reason in ("length", "stop") and story.finish.usage.completion_tokens >= 1
    assert ngram.stats().running == 0


def test_speculative_cancel_while_guessing_frees_the_slot(ngram):
    async def scenario():
        tokens = 0
        async for event in ngram.generate(GenerationRequest("cancel-me", COPY, greedy(max_tokens=80))):
            tokens += len(getattr(event, "token_ids", []))
            if tokens >= 10:
                break  # leaving the stream aborts the request
        await until(lambda: ngram.stats().running == 0, what="the cancelled request leaving its slot")
        return True

    assert asyncio.run(scenario())
    after = run(ngram, "after-cancel", COPY, greedy(max_tokens=20))
    assert after.finish.usage.completion_tokens == 20


def test_speculative_starter_as_its_own_draft_keeps_plain_text(starter_gguf, plain):
    draft = open_backend(starter_gguf, SpeculationOptions("draft", draft=str(starter_gguf)), n_parallel=2)
    try:
        reference = run(plain, "plain-draft-copy", COPY, greedy(max_tokens=60, stop=["\n\n"]))
        got = run(draft, "draft-copy", COPY, greedy(max_tokens=60, stop=["\n\n"]))
        assert greedy_ids(got.events) == greedy_ids(reference.events)
        reference = run(plain, "plain-draft-open", OPEN[0], greedy(max_tokens=48, logprobs=2))
        got = run(draft, "draft-open", OPEN[0], greedy(max_tokens=48))
        assert_same_or_near_tie(reference.events, greedy_ids(got.events), "own draft, open prompt")
        usage = got.finish.usage
        assert usage.draft_tokens >= 20 and usage.accepted_draft_tokens >= 0.8 * usage.draft_tokens
        assert_cache_holds_only_verified_tokens(draft, OPEN[0], got)
        again = run(draft, "draft-again", OPEN[0], greedy(max_tokens=48))  # prompt reused, the draft catches up
        assert again.finish.usage.cached_prompt_tokens > 0
        assert_same_or_near_tie(reference.events, greedy_ids(again.events), "own draft, second run")
        # The draft applies the request's penalties too, or it would keep guessing what they forbid (66% kept
        # on a 1.15 penalty before it did). Texts are not compared here: logprobs show raw logits, so a
        # near-tie after the penalties cannot be told from a fault.
        got = run(draft, "draft-penalised", OPEN[0], greedy(max_tokens=48, repeat_penalty=1.15))
        usage = got.finish.usage
        assert usage.completion_tokens == 48
        assert usage.draft_tokens >= 20 and usage.accepted_draft_tokens >= 0.8 * usage.draft_tokens
    finally:
        draft.close()


def test_speculative_draft_penalties_follow_llama_cpp():
    import numpy as np

    from localllm.backends.llamacpp_guessers import penalised

    logits = np.array([2.0, -1.0, 0.5, 3.0, 1.0], dtype=np.float32)
    params = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5, repeat_last_n=3)
    out = penalised(logits, [3, 0, 1, 3], params)  # the window is the last 3: 0, 1, 3 (3 once)
    assert out.tolist() == pytest.approx([2.0 / 2 - 0.25 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, 3.0 / 2 - 0.25 - 0.5, 1.0])
    assert penalised(logits, [3, 0, 1, 3], dataclasses.replace(params, repeat_last_n=-1))[3] == pytest.approx(
        3.0 / 2 - 2 * 0.25 - 0.5)  # all four: 3 twice
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, 1.0]  # a copy was changed


class _FakeVocabModel:
    def __init__(self, texts: list[bytes], bos: int = 1) -> None:
        self.vocab = (texts, bos)

    def n_vocab(self) -> int:
        return len(self.vocab[0])


class _FakeLlama:
    @staticmethod
    def llama_vocab_bos(vocab):
        return vocab[1]

    @staticmethod
    def llama_vocab_eos(vocab):
        return 2

    @staticmethod
    def llama_vocab_get_text(vocab, token):
        return vocab[0][token]


def test_speculative_draft_with_another_vocabulary_is_refused():
    texts = [f"t{i}".encode() for i in range(5000)]
    check_same_vocabulary(_FakeLlama, _FakeVocabModel(texts), _FakeVocabModel(list(texts)))
    with pytest.raises(BadRequest, match="5001 tokens"):
        check_same_vocabulary(_FakeLlama, _FakeVocabModel(texts), _FakeVocabModel(texts + [b"x"]))
    with pytest.raises(BadRequest, match="special tokens"):
        check_same_vocabulary(_FakeLlama, _FakeVocabModel(texts), _FakeVocabModel(texts, bos=3))
    renumbered = list(texts)
    renumbered[4999], renumbered[0] = renumbered[0], renumbered[4999]
    with pytest.raises(BadRequest, match="token 0 differs"):
        check_same_vocabulary(_FakeLlama, _FakeVocabModel(texts), _FakeVocabModel(renumbered))


def test_speculative_guess_counts_grow_while_kept_and_shrink_after_rejections():
    options = SpeculationOptions("ngram", num_tokens=15, llamacpp=LlamaCppGuessing(min_steps=4))
    record = SpecRecord(k=3)
    for expected in (7, 15, 15):  # all kept: 2k + 1, up to the most allowed
        record.asked = record.k
        record.record(checked=record.k, kept=record.k, options=options)
        assert record.k == expected
    record.asked = 15
    record.record(checked=3, kept=2, options=options)  # rejected at the third guess
    assert record.k == 5
    record.asked = 5
    record.record(checked=2, kept=2, options=options)  # the guesser had only two: no growth
    assert record.k == 5 and record.enabled
    for _ in range(29):  # 29 of 30 kept so far: 29 rejections take it under half
        record.asked = record.k
        record.record(checked=1, kept=0, options=options)
        assert record.k == 1 and record.enabled == (record.kept >= 0.5 * record.checked)
    assert not record.enabled  # mostly rejected: off for this request
    story = SpecRecord(k=3)  # a story that repeats itself now and then: 2 of 6 kept in 4 checks
    for checked, kept in ((2, 1), (1, 0), (2, 1), (1, 0)):
        assert story.enabled
        story.asked = story.k
        story.record(checked=checked, kept=kept, options=options)
    assert not story.enabled  # off after its fourth check
    chat = SpecRecord(k=3)  # beside other generating sequences, only near-certain guessing pays
    assert chat.guesses_beside(3, options)  # it has yet to show what it keeps
    for _ in range(4):
        chat.asked = chat.k
        chat.record(checked=4, kept=3, options=options)  # 75% kept: worth it alone, not in a wide step
    assert chat.guesses_beside(0, options) and not chat.guesses_beside(1, options)
    chat.asked = chat.k
    chat.record(checked=chat.k, kept=chat.k, options=options)
    for _ in range(6):
        chat.asked = chat.k
        chat.record(checked=chat.k, kept=chat.k, options=options)
    assert chat.kept >= 0.9 * chat.checked and chat.guesses_beside(3, options)


def test_speculative_options_are_checked_for_llamacpp(starter_gguf):
    for config, words in (
        (SpeculationOptions("ngram", num_tokens=0), r"in \[1, 16\]"),
        (SpeculationOptions("draft"), "needs --draft"),
        (SpeculationOptions("ngram", draft="x.gguf"), "--draft needs --speculative draft"),
        (SpeculationOptions("medium"), "must be one of"),
    ):
        with pytest.raises(BadRequest, match=words):
            open_backend(starter_gguf, config)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_cli_run_on_llamacpp_reports_guesses(starter_gguf, method):
    flags = ["--speculative", method] + (["--draft", str(starter_gguf)] if method == "draft" else [])
    done = subprocess.run(
        [sys.executable, "-m", "localllm", "run", str(starter_gguf), COPY, "--raw", "--backend", "llamacpp", *flags,
         "--temperature", "0", "--max-tokens", "40", "--threads", "1", "--stats"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(PARAGRAPH[:40])
    assert "speculative guesses kept" in done.stderr


def test_speculative_serve_on_llamacpp_counts_guesses_in_usage_and_metrics(tmp_path, starter_gguf):
    """`localllm serve --speculative ngram` on llama.cpp: a completion copies with guesses, /metrics counts them."""
    import httpx

    from server_harness import make_store, start_server

    make_store(tmp_path, {"starter": starter_gguf})
    server = start_server(tmp_path, "starter", "--ctx", "1024", "--threads", str(THREADS), "--backend", "llamacpp",
                          "--speculative", "ngram")
    try:
        body = {"model": "starter", "prompt": COPY, "max_tokens": 60, "temperature": 0, "stop": ["\n\n"]}
        reply = httpx.post(f"{server.v1}/completions", json=body, timeout=120).json()
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    assert reply["choices"][0]["text"].startswith(PARAGRAPH[:60])
    drafted = [line for line in metrics.splitlines() if line.startswith("localllm_speculative_draft_tokens_total")]
    kept = [line for line in metrics.splitlines() if line.startswith("localllm_speculative_accepted_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) >= 30
    assert kept and float(kept[0].split()[-1]) >= 0.9 * float(drafted[0].split()[-1])
    assert "localllm_speculative_acceptance_ratio_count 1.0" in metrics
