"""Speculative decoding in the native engine: exactness, rollback, the target distribution, auto-off.

Tiny random-weight models (built with transformers, as in test_native_models)
stand in for the target and the draft; the starter checks the same on a real
model. Greedy speculation must give plain decoding's tokens exactly, whatever
the proposer guesses. Sampled speculation must give plain sampling's
distribution: a chi-square test compares the empirical distribution of the
first three sampled tokens (with top-k, top-p, min-p, temperature and a
repetition penalty) with the exact one computed from the target's logits.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from localllm.core.requests import SamplingParams
from localllm.core.errors import BadRequest
from localllm.core.speculation import NativeGuessing, SpeculationOptions
from native.engine import EngineOptions, LLMEngine
from localllm.engine_kit.ngram import find_continuation, lookup
from native.speculative import Draft, Speculator, distribution
from builders import TINY_VOCAB, random_model, tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A target (Llama), a sliding-window target (Mistral), drafts, and a draft with another vocabulary.

    Random models are chaotic: another random model, or the target with 10%
    noise on its weights, agrees with it on a few percent of tokens. The
    target with 2.5% noise ("draft") agrees on about half: guesses are kept
    and rejected in every run.
    """
    configs = {
        "llama": (tiny_config("llama"), 0),
        "mistral": (tiny_config("mistral", num_hidden_layers=2, sliding_window=8), 0),
        "other-vocab": (tiny_config("llama", vocab_size=96, num_hidden_layers=1), 2),
    }
    root = tmp_path_factory.mktemp("tiny-spec")
    for name, (config, seed) in configs.items():
        model = random_model(config, seed=seed)
        model.save_pretrained(root / name)
        if name == "llama":
            noise = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=noise) * 0.005)
            model.save_pretrained(root / "draft")
    return {name: root / name for name in [*configs, "draft"]}


def engine(path: Path, spec: SpeculationOptions | None = None, **kw) -> LLMEngine:
    options = dict(device="cpu", load_tokenizer=False, block_size=4, max_num_seqs=8, threads=1, speculation=spec,
                   weights="float32")
    return LLMEngine(path, EngineOptions(**{**options, **kw}))


def ngram(k: int = 4, **kw) -> SpeculationOptions:
    """Prompt lookup that guesses at every 1-token match: many guesses, many of them wrong."""
    return SpeculationOptions("ngram", num_tokens=k, ngram_min=1, ngram_max=3, native=NativeGuessing(**{"min_acceptance": 0.0, **kw}))


def prompts(n: int = 3) -> list[list[int]]:
    """Prompts that repeat themselves (prompt lookup finds guesses) and one that does not."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        base = torch.randint(3, TINY_VOCAB, (9 + 4 * i,), generator=g).tolist()
        out.append(base + base + base[:3] if i < n - 1 else torch.randint(3, TINY_VOCAB, (30,), generator=g).tolist())
    return out


def assert_pool_idle(e: LLMEngine) -> None:
    assert e.blocks.num_free == e.blocks.num_blocks
    assert not e.has_work()


# -- the n-gram search ------------------------------------------------------------------


def test_speculative_ngram_lookup_takes_the_longest_then_the_latest_match():
    tokens = [5, 6, 7, 1, 2, 9, 9, 6, 7, 3, 4, 5, 6, 7]
    # last 3 tokens (5 6 7) occur at 0: continuation 1 2 9; a 2-token match (6 7) is more recent but shorter
    assert lookup(tokens, 3, 2, 3) == [1, 2, 9]
    assert lookup(tokens, 3, 1, 2) == [3, 4, 5]  # (6 7) most recently at 7 -> continues 3 4 5
    assert lookup(tokens, 10, 1, 1) == [3, 4, 5, 6, 7]  # runs up to the end of the text
    assert lookup([1, 2, 3, 4], 4, 1, 3) == []  # nothing repeats
    assert lookup([8, 8, 8], 4, 1, 2) == [8]  # overlapping occurrence: 8 8 at 0 continues with 8
    import numpy as np

    assert find_continuation(np.array([1], dtype=np.int64), 1, 3, 4) == (0, 0)


# -- greedy: exactly plain decoding --------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_speculative_ngram_greedy_equals_plain_decoding(tiny, arch):
    params = [
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=0, max_tokens=33, repeat_penalty=1.3, repeat_last_n=16),  # penalties see the guesses
        SamplingParams(temperature=0, max_tokens=25),
    ]
    expected = engine(tiny[arch]).generate(prompts(), params)
    spec = engine(tiny[arch], ngram())
    assert spec.generate(prompts(), params) == expected
    assert spec.speculator.counters.proposed > 20  # (a random model seldom repeats its prompt: most are rejected)
    assert_pool_idle(spec)


def test_speculative_draft_model_greedy_equals_plain_decoding(tiny):
    params = SamplingParams(temperature=0, max_tokens=30)
    expected = engine(tiny["llama"]).generate(prompts(), params)
    spec = engine(tiny["llama"], SpeculationOptions("draft", num_tokens=3, draft=tiny["draft"], native=NativeGuessing(min_acceptance=0.0)))
    assert spec.generate(prompts(), params) == expected
    c = spec.speculator.counters
    assert c.proposed > 20 and 0.2 < c.acceptance_rate < 0.9  # guesses kept and rejected
    assert_pool_idle(spec)
    draft = spec.speculator.proposer.engine
    assert not spec.speculator.proposer.mirrors and draft.blocks.num_free == draft.blocks.num_blocks


def test_speculative_memory_profile_counts_the_checked_rows(tiny):
    """On CUDA the pool is what the largest step leaves: with guesses a step has logits for k + 1 rows a sequence."""
    assert engine(tiny["llama"]).runner.options.max_logit_rows == 0  # max_num_seqs
    assert engine(tiny["llama"], ngram(k=4)).runner.options.max_logit_rows == 8 * 5


def test_speculative_target_as_its_own_draft_accepts_every_guess(tiny):
    params = SamplingParams(temperature=0, max_tokens=30)
    expected = engine(tiny["llama"]).generate(prompts(), params)
    spec = engine(tiny["llama"], SpeculationOptions("draft", num_tokens=4, draft=tiny["llama"]))
    assert spec.generate(prompts(), params) == expected
    c = spec.speculator.counters
    assert c.proposed > 0 and c.accepted == c.proposed and c.acceptance_rate == 1.0


def test_speculative_draft_with_another_vocabulary_is_refused(tiny):
    with pytest.raises(BadRequest, match="does not share the target's vocabulary"):
        engine(tiny["llama"], SpeculationOptions("draft", draft=tiny["other-vocab"]))


def test_speculative_options_are_checked():
    with pytest.raises(BadRequest, match="needs --draft"):
        SpeculationOptions("draft").validate()
    with pytest.raises(BadRequest, match="--speculative draft"):
        SpeculationOptions("ngram", draft="x").validate()
    with pytest.raises(BadRequest, match=r"\[1, 16\]"):
        SpeculationOptions("ngram", num_tokens=0).validate()


# -- rollback -----------------------------------------------------------------------------------


class ScriptedProposer:
    """Guesses the tokens plain decoding will give, with a wrong one at a place that moves every step.

    Runs keep 0, 1, ... k guesses in turn, so every way a step can end (and
    every rollback length) comes up, across block boundaries.
    """

    def __init__(self, expected: dict[str, list[int]], prompt_lens: dict[str, int]) -> None:
        self.expected, self.prompt_lens, self.calls = expected, prompt_lens, 0

    def propose(self, seqs, ks):
        drafts = []
        for seq, k in zip(seqs, ks):
            self.calls += 1
            done = seq.num_tokens - self.prompt_lens[seq.request_id]
            guess = self.expected[seq.request_id][done : done + k]
            wrong_at = self.calls % (k + 1)
            if wrong_at < len(guess):
                guess[wrong_at] = (guess[wrong_at] + 1) % TINY_VOCAB
            drafts.append(Draft(guess))
        return drafts

    def release(self, seq) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_speculative_rollback_keeps_blocks_and_prefix_cache_consistent(tiny, arch):
    """After every step: blocks cover exactly the verified tokens, and no cached block holds a rejected guess."""
    params = SamplingParams(temperature=0, max_tokens=40)
    expected = engine(tiny[arch]).generate(prompts(), params)
    e = engine(tiny[arch])
    ids = [f"r{i}" for i in range(3)]
    proposer = ScriptedProposer(dict(zip(ids, expected)), {rid: len(p) for rid, p in zip(ids, prompts())})
    e.speculator = Speculator(SpeculationOptions("ngram", num_tokens=6, native=NativeGuessing(min_acceptance=0.0)), proposer, e.blocks)
    seqs = {rid: e.add_request(rid, prompt, params) for rid, prompt in zip(ids, prompts())}
    bs = e.blocks.block_size
    while e.has_work():
        e.step()
        for seq in e.scheduler.running:
            if seq.num_completion:  # decoding: blocks for the verified tokens, none left over from guesses
                assert all(len(table) <= e.blocks.blocks_for(seq.num_tokens) for table in seq.block_tables)
                assert seq.num_computed == seq.num_tokens - 1
    assert [s.completion_ids for s in seqs.values()] == expected
    c = e.speculator.counters
    assert 0.3 < c.acceptance_rate < 0.8 and c.steps > 20
    assert_pool_idle(e)
    texts = [tuple(s.token_ids) for s in seqs.values()]
    for pool in e.blocks.pools:
        for block in pool.blocks:
            if block.hash is not None:  # every cached block is an aligned slice of some verified text
                assert any(t[i : i + bs] == block.token_ids for t in texts for i in range(0, len(t) - bs + 1, bs)), block
    # a prompt that runs through those cached blocks gives the logits a cold engine gives
    follow_up = list(seqs["r0"].token_ids[:-1])
    hits = e.blocks.prompt_tokens_hit
    warm = e.prompt_logits(follow_up, last=1)
    assert e.blocks.prompt_tokens_hit > hits
    cold = engine(tiny[arch], prefix_caching=False).prompt_logits(follow_up, last=1)
    assert torch.allclose(warm, cold, rtol=1e-4, atol=1e-4)


def test_speculative_guesses_never_preempt_and_fit_a_small_pool(tiny):
    """A pool with room for little more than the sequences themselves: guesses are skipped, not forced."""
    block = 4 * 2 * 3 * 2 * 16 * 4  # tokens per block x K,V x layers x kv heads x head dim x float32
    params = SamplingParams(temperature=0, max_tokens=30)
    small = dict(n_ctx=64, kv_cache_bytes=40 * block)
    expected = engine(tiny["llama"], **small).generate(prompts(), params)
    spec = engine(tiny["llama"], ngram(k=8), **small)
    assert spec.generate(prompts(), params) == expected
    assert_pool_idle(spec)


# -- sampling: the target's distribution ----------------------------------------------------------

SAMPLED = SamplingParams(temperature=1.0, top_k=4, top_p=0.95, min_p=0.02, repeat_penalty=1.2, repeat_last_n=8, max_tokens=4)
N_SAMPLES = 2000


def chi_square_threshold(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at upper tail 1e-4 (z = 3.719), by the Wilson-Hilferty approximation.

    Good to about 1% for df >= 3. The draws are seeded, so the test is
    deterministic; the threshold says how unlikely a pass by luck would be if
    the sampler were right and this seed happened to be bad (1 in 10,000).
    """
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def exact_distribution(e: LLMEngine, prompt: list[int], params: SamplingParams, depth: int = 3) -> dict[tuple, float]:
    """P(first `depth` tokens) under plain sampling, enumerated over every path the filters allow."""
    out: dict[tuple, float] = {}

    def walk(path: tuple, prob: float) -> None:
        if len(path) == depth:
            out[path] = prob
            return
        logits = e.prompt_logits(prompt + list(path), last=1)[-1]
        p = distribution(logits, params, list(path))
        for token in torch.nonzero(p).flatten().tolist():
            walk(path + (token,), prob * float(p[token]))

    walk((), 1.0)
    return out


def chi_square(counts: Counter, expected: dict[tuple, float], n: int) -> tuple[float, int]:
    """Pearson's statistic over the cells, cells expecting fewer than 5 draws pooled into one."""
    stat, df, small_obs, small_exp = 0.0, -1, 0, 0.0
    for cell, p in expected.items():
        if n * p < 5:
            small_obs += counts.get(cell, 0)
            small_exp += n * p
            continue
        stat += (counts.get(cell, 0) - n * p) ** 2 / (n * p)
        df += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        df += 1
    assert sum(counts.values()) == n and all(cell in expected for cell in counts)  # nothing outside the support
    return stat, df


@pytest.fixture(scope="module")
def sampling_case(tiny):
    """A prompt that repeats a text the target itself sampled (so guesses are often plausible), and the exact answer."""
    plain = engine(tiny["llama"], max_num_seqs=32)
    start = torch.randint(3, TINY_VOCAB, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    text = start + plain.generate([start], SamplingParams(temperature=1.0, top_k=8, seed=11, max_tokens=14))[0]
    prompt = text + text[:8]
    return prompt, exact_distribution(plain, prompt, SAMPLED)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_sampling_keeps_the_target_distribution(tiny, sampling_case, proposer):
    prompt, expected = sampling_case
    if proposer == "ngram":
        spec = ngram(k=3)
    else:
        spec = SpeculationOptions("draft", num_tokens=3, draft=tiny["draft"], native=NativeGuessing(min_acceptance=0.0))
    e = engine(tiny["llama"], spec, max_num_seqs=32)
    params = [SamplingParams(**{**vars(SAMPLED), "seed": seed}) for seed in range(N_SAMPLES)]
    outputs = e.generate([prompt] * N_SAMPLES, params)
    counts = Counter(tuple(out[:3]) for out in outputs)
    stat, df = chi_square(counts, expected, N_SAMPLES)
    assert stat < chi_square_threshold(df), (stat, df)
    c = e.speculator.counters
    assert c.proposed > 1000 and (proposer == "ngram" or 0.2 < c.acceptance_rate < 0.9), c  # kept and rejected guesses
    # the test has power: the same draws fail it against a nearby wrong answer (no repetition penalty)
    wrong = exact_distribution(engine(tiny["llama"]), prompt, SamplingParams(**{**vars(SAMPLED), "repeat_penalty": 1.0}))
    stat, df = chi_square(counts, {**{cell: 0.0 for cell in expected}, **wrong}, N_SAMPLES)
    assert stat > chi_square_threshold(df)


def test_speculative_ngram_sampling_gives_plain_samplings_tokens(tiny, sampling_case):
    """Prompt lookup's guesses are checked against the draw plain decoding makes: same seed, same tokens."""
    batch = [sampling_case[0]] * 6 + prompts()
    params = [SamplingParams(**{**vars(SAMPLED), "seed": s, "max_tokens": 30}) for s in range(len(batch))]
    expected = engine(tiny["llama"]).generate(batch, params)
    spec = engine(tiny["llama"], ngram())
    assert spec.generate(batch, params) == expected
    assert 0 < spec.speculator.counters.accepted < spec.speculator.counters.proposed


def test_speculative_sampling_is_seeded_per_request(tiny):
    """A draft model's rejection sampling draws from the request's own generator: the batch does not matter."""
    prompt = prompts()[0]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12) for s in (1, 2, 3)]
    e = engine(tiny["llama"], SpeculationOptions("draft", num_tokens=3, draft=tiny["draft"], native=NativeGuessing(min_acceptance=0.0)))
    alone = [e.generate([prompt], p)[0] for p in params]
    together = e.generate([prompt] * 3, params)
    assert together == alone


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_logprobs_are_the_targets_log_softmax(tiny, sampling_case, proposer):
    """Kept guesses, replacements and bonus tokens each carry the target's log-softmax at their position."""
    if proposer == "ngram":
        spec = ngram()
    else:
        spec = SpeculationOptions("draft", num_tokens=3, draft=tiny["draft"], native=NativeGuessing(min_acceptance=0.0))
    e = engine(tiny["llama"], spec)
    batch = [sampling_case[0]] * 6 + prompts()
    outputs: dict[str, list] = {}
    for i, prompt in enumerate(batch):
        e.add_request(f"r{i}", prompt, SamplingParams(**{**vars(SAMPLED), "seed": i, "max_tokens": 30, "logprobs": 3}))
        outputs[f"r{i}"] = []
    while e.has_work():
        for out in e.step():
            outputs[out.request_id].append(out)
    c = e.speculator.counters
    assert 0 < c.accepted < c.proposed
    plain = engine(tiny["llama"], prefix_caching=False)
    for prompt, outs in zip(batch, outputs.values()):
        tokens = [o.token for o in outs]
        exact = torch.log_softmax(plain.prompt_logits(prompt + tokens[:-1], last=len(tokens)).double(), dim=-1)
        for i, o in enumerate(outs):
            assert o.logprobs.token == o.token
            assert o.logprobs.logprob == pytest.approx(float(exact[i, o.token]), abs=1e-4)
            assert [t for t, _ in o.logprobs.top] == exact[i].topk(3).indices.tolist()


def test_speculative_verification_reads_the_device_once_per_step(tiny, sampling_case, monkeypatch):
    """Every position of every sequence (guesses or not, greedy or sampled) is drawn in one batched call."""
    from test_native_sampler import ReadCounter

    e = engine(tiny["llama"], ngram())
    reads = ReadCounter(monkeypatch)
    per_step: list[int] = []
    verify = Speculator.verify

    def counted(self, logits, samplers, sampler):
        before = reads.count
        result = verify(self, logits, samplers, sampler)
        per_step.append(reads.count - before)
        return result

    monkeypatch.setattr(Speculator, "verify", counted)
    batch = [sampling_case[0]] * 3 + prompts()
    params = [SamplingParams(**{**vars(SAMPLED), "seed": i, "max_tokens": 20, "logprobs": 2}) for i in range(3)]
    params += [SamplingParams(temperature=0, max_tokens=20, repeat_penalty=1.3)] * 3
    e.generate(batch, params)
    assert len(per_step) > 5 and set(per_step) == {1}
    assert e.speculator.counters.proposed > 20  # steps with guesses among them


# -- auto-off ------------------------------------------------------------------------------------


def test_speculative_turns_itself_off_when_guesses_keep_failing(tiny):
    """Random text: 1-token matches guess badly; after min_steps the request stops speculating."""
    spec = SpeculationOptions("ngram", num_tokens=4, ngram_min=1, ngram_max=2, native=NativeGuessing(min_acceptance=0.5, min_steps=4))
    e = engine(tiny["llama"], spec)
    random_prompt = torch.randint(3, TINY_VOCAB, (60,), generator=torch.Generator().manual_seed(9)).tolist()
    # seed 1: its 60 draws hold no end-of-text token (the tiny vocabulary has 128), so the request runs to the end
    seq = e.add_request("r", random_prompt, SamplingParams(temperature=1.0, seed=1, max_tokens=60))
    steps_when_off = None
    while e.has_work():
        e.step()
        if steps_when_off is None and seq.spec is not None and not seq.spec.enabled:
            steps_when_off = seq.spec.steps
            proposed_when_off = seq.spec.proposed
    assert seq.num_completion == 60  # it ran on, without speculating
    assert steps_when_off is not None and steps_when_off >= 4
    assert seq.spec.average < 0.5 and seq.spec.proposed == proposed_when_off  # no guesses after it went off
    assert e.speculator.counters.requests_turned_off == 1
    assert e.stats()["spec_requests_turned_off"] == 1


def test_speculative_stays_on_while_guesses_hold(tiny):
    """The target as its own draft is always right: speculation never turns off."""
    spec = SpeculationOptions("draft", num_tokens=3, draft=tiny["llama"], native=NativeGuessing(min_acceptance=0.9, min_steps=2))
    e = engine(tiny["llama"], spec)
    seq = e.add_request("r", prompts()[0], SamplingParams(temperature=0, max_tokens=40))
    while e.has_work():
        e.step()
    assert seq.spec.enabled and seq.spec.steps >= 5 and e.speculator.counters.requests_turned_off == 0


# -- the starter model ----------------------------------------------------------------------------

PARAGRAPH = (
    "The lighthouse at the end of the harbour was built in 1871 from granite quarried on the island. "
    "Its lamp, first fed with whale oil and later with paraffin, could be seen twenty miles out to sea."
)
COPY_PROMPT = f"Original text:\n\n{PARAGRAPH}\n\nThe same text, copied word for word:\n\n"


@pytest.fixture(scope="module")
def starter(starter_gguf):
    e = LLMEngine(starter_gguf, EngineOptions(device="cpu", threads=1, n_ctx=512, max_num_seqs=4, weights="float32"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def starter_copy(starter) -> tuple[list[int], list[int]]:
    """The copy prompt and its plain greedy continuation."""
    prompt = starter.tokenizer.encode(COPY_PROMPT, add_bos=True, special=False)
    return prompt, starter.generate([prompt], SamplingParams(temperature=0, max_tokens=40))[0]


def with_speculation(e: LLMEngine, options: SpeculationOptions, prompt: list[int], max_tokens: int):
    """Greedy tokens from the shared starter engine with a speculator for this run, and its counters."""
    from native.engine import make_speculator

    e.speculator = make_speculator(options, e)
    try:
        return e.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0], e.speculator.counters
    finally:
        e.speculator.close()
        e.speculator = None


def test_speculative_ngram_on_the_starter_gives_plain_greedy_text(starter, starter_copy):
    prompt, expected = starter_copy
    assert starter.tokenizer.decode(expected).startswith("The lighthouse at the end of the harbour")  # it copies
    got, c = with_speculation(starter, SpeculationOptions("ngram"), prompt, len(expected))
    assert got == expected
    assert c.proposed >= 20 and c.acceptance_rate > 0.7 and c.steps < len(expected) // 2
    assert starter.blocks.num_free == starter.blocks.num_blocks


def test_speculative_starter_as_its_own_draft_gives_plain_greedy_text(starter, starter_gguf, starter_copy):
    prompt, expected = starter_copy
    got, c = with_speculation(starter, SpeculationOptions("draft", num_tokens=3, draft=starter_gguf), prompt, 16)
    assert got == expected[:16]
    assert c.proposed > 0 and c.acceptance_rate > 0.9


# -- the backend, the API's metrics and the command line -------------------------------------------


def test_speculative_backend_streams_plain_tokens_and_reports_acceptance(starter_gguf, starter_copy):
    import asyncio

    from localllm.core.requests import GenerationRequest, TokenEvent
    from localllm.backends.native import NativeBackend, NativeOptions
    from localllm.core.modelinfo import read_model_info
    from localllm.server.metrics import Metrics

    prompt, expected = starter_copy
    backend = NativeBackend(
        "starter", read_model_info(starter_gguf), NativeOptions(n_ctx=512, n_threads=1, max_num_seqs=4, speculation=SpeculationOptions("ngram"), weights="float32")
    )

    async def run():
        tokens, finish = [], None
        async for event in backend.generate(GenerationRequest("s", prompt, SamplingParams(temperature=0, max_tokens=40))):
            if isinstance(event, TokenEvent):
                tokens += event.token_ids
            else:
                finish = event
        return tokens, finish

    try:
        tokens, finish = asyncio.run(run())
        stats = backend.stats()
    finally:
        backend.close()
    assert tokens == expected and finish.reason == "length" and finish.usage.completion_tokens == 40
    u = finish.usage
    assert u.draft_tokens >= 20 and 0 < u.accepted_draft_tokens <= u.draft_tokens
    assert (stats.spec_draft_tokens, stats.spec_accepted_tokens) == (u.draft_tokens, u.accepted_draft_tokens)
    assert stats.last_spec_acceptance_rate == pytest.approx(u.accepted_draft_tokens / u.draft_tokens)
    metrics = Metrics(lambda: [stats])
    metrics.speculative_acceptance.observe(u.accepted_draft_tokens / u.draft_tokens)
    text = metrics.render().decode()
    assert f"localllm_speculative_draft_tokens_total {float(u.draft_tokens)}" in text
    assert f"localllm_speculative_accepted_tokens_total {float(u.accepted_draft_tokens)}" in text
    assert "localllm_speculative_acceptance_ratio_count 1.0" in text


def test_speculative_flags_parse_and_a_bad_combination_is_one_line(starter_gguf):
    import subprocess
    import sys

    from localllm.cli.parser import build_parser

    args = build_parser().parse_args(["run", "m", "hi", "--speculative", "draft", "--draft", "d", "--num-speculative-tokens", "6"])
    assert (args.speculative, args.draft, args.num_speculative_tokens) == ("draft", "d", 6)
    for verb in ("chat", "serve"):
        assert build_parser().parse_args([verb, "m", "--speculative", "ngram"]).speculative == "ngram"
    done = subprocess.run(
        [sys.executable, "-m", "localllm", "run", str(starter_gguf), "hi", "--speculative", "draft", "--backend", "llamacpp"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: speculative decoding with a draft model needs --draft MODEL"
