"""The native engine on the real starter model (Gemma 3 270M Q4_K_M GGUF).

The reference is transformers' own GGUF load in float32. That load takes a
minute or more, so its answers (logits and greedy tokens for a short prompt
and for one longer than the 512-token sliding window) are computed once and
kept in pytest's cache directory (or the system's temporary directory when
the cache plugin is off), keyed by the model file, the transformers and torch
versions and the prompts; later sessions read them in milliseconds.

The engine-level properties run on the same model: batching does not change
what a request generates, a prefix-cache hit gives what a cold run gives, a
pool too small for everyone still finishes everyone (preemption), and aborts
give every block back.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import hashlib
from pathlib import Path

import pytest
import torch

from localllm.core.requests import SamplingParams
from native.engine import EngineOptions, LLMEngine
from builders import cached_reference, transformers_gguf_model

FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]
PARAGRAPH = (
    "The river runs past the old mill, under the stone bridge and through the village, where the "
    "baker opens his shop before dawn and the children walk to school along the water. "
)
REFERENCE_VERSION = 1  # bump when what the fixture computes changes
GREEDY = SamplingParams(temperature=0, max_tokens=32)


def _long_prompt(tokenizer) -> list[int]:
    """About 600 tokens: longer than the 512-token window of the sliding layers."""
    ids = tokenizer.encode(PARAGRAPH * 20, add_bos=True, special=False)
    return ids[:600]


def _file_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def starter_reference(starter_gguf, request) -> dict:
    """transformers' answers on the starter, computed once and cached across sessions."""
    pytest.importorskip("transformers")
    from native.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(starter_gguf)
    long_ids = _long_prompt(tokenizer)
    tokenizer.close()

    def compute() -> dict:
        model = transformers_gguf_model(starter_gguf)
        with torch.inference_mode():
            short = model(torch.tensor([FRANCE_IDS])).logits[0]
            short_greedy = model.generate(torch.tensor([FRANCE_IDS]), max_new_tokens=32, do_sample=False)
            long = model(torch.tensor([long_ids])).logits[0, -8:]
            long_greedy = model.generate(torch.tensor([long_ids]), max_new_tokens=16, do_sample=False)
        return {
            "short_logits": short.clone(),
            "short_greedy": short_greedy[0, len(FRANCE_IDS) :].tolist(),
            "long_ids": long_ids,
            "long_logits": long.clone(),
            "long_greedy": long_greedy[0, len(long_ids) :].tolist(),
        }

    return cached_reference(request, "starter", f"{_file_key(starter_gguf)}|{REFERENCE_VERSION}|{long_ids}", compute)


# One thread: these machines are shared, and torch's OpenMP threads slow down many
# times over when another process holds a core; one thread stays predictable.
THREADS = 1


@pytest.fixture(scope="module")
def engine(starter_gguf):
    e = LLMEngine(starter_gguf, EngineOptions(device="cpu", threads=THREADS, n_ctx=1024, max_num_seqs=8, weights="float32"))
    yield e
    e.close()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max(float((a[i] - b[i]).norm() / b[i].norm()) for i in range(b.shape[0]))


def test_gguf_config_carries_gemma3_facts_the_file_lacks(engine):
    c = engine.config
    assert c.family == "gemma3" and c.n_layers == 18 and c.n_kv_heads == 1 and c.head_dim == 256
    assert [i for i, s in enumerate(c.sliding_layers) if not s] == [5, 11, 17]
    assert c.sliding_window == 512 and c.rope.theta == 1_000_000.0 and c.rope_local.theta == 10_000.0
    assert c.attn_scale == pytest.approx(256**-0.5) and c.embed_scale == pytest.approx(640**0.5)
    assert c.tie_embeddings and c.qk_norm


def test_prompt_logits_match_transformers_gguf_load(engine, starter_reference):
    logits = engine.prompt_logits(FRANCE_IDS)
    assert _rel(logits, starter_reference["short_logits"]) < 1e-3
    assert not logits.isnan().any()


def test_greedy_tokens_match_transformers(engine, starter_reference):
    assert engine.generate([FRANCE_IDS], GREEDY)[0] == starter_reference["short_greedy"]


def test_prompt_longer_than_the_sliding_window_matches_transformers(engine, starter_reference):
    ids = starter_reference["long_ids"]
    logits = engine.prompt_logits(ids, chunk=256, last=8)  # chunks of 256 cross the window's edge
    assert _rel(logits, starter_reference["long_logits"]) < 1e-3
    assert engine.generate([ids], SamplingParams(temperature=0, max_tokens=16))[0] == starter_reference["long_greedy"]


# -- engine properties on the real model ---------------------------------------------------


@pytest.fixture(scope="module")
def eight_prompts(engine) -> list[list[int]]:
    ids = engine.tokenizer.encode(PARAGRAPH * 2, add_bos=True, special=False)
    return [ids[: 4 + 7 * i] for i in range(8)]  # 4 to 53 tokens


@pytest.fixture(scope="module")
def alone(engine, eight_prompts) -> list[list[int]]:
    """Each prompt's greedy tokens when it runs by itself."""
    return [engine.generate([p], SamplingParams(temperature=0, max_tokens=16))[0] for p in eight_prompts]


def test_batching_does_not_change_what_a_request_generates(engine, eight_prompts, alone):
    together = engine.generate(eight_prompts, SamplingParams(temperature=0, max_tokens=16))
    assert together == alone


def test_prefix_cache_hit_gives_the_cold_logits(starter_gguf, engine):
    system = engine.tokenizer.encode(PARAGRAPH * 3, add_bos=True, special=False)
    question = system + engine.tokenizer.encode(" Where does the baker work?", add_bos=False, special=False)
    cold = LLMEngine(starter_gguf, EngineOptions(device="cpu", threads=THREADS, n_ctx=512, prefix_caching=False, weights="float32"))
    short = SamplingParams(temperature=0, max_tokens=8)
    try:
        expected = cold.prompt_logits(question, last=1)[-1]
        expected_tokens = cold.generate([question], short)[0]
    finally:
        cold.close()
    engine.prompt_logits(system + [236761], last=1)  # caches the blocks of the shared part
    hits_before = engine.blocks.prompt_tokens_hit
    got = engine.prompt_logits(question)
    cached = len(system) // 16 * 16
    assert engine.blocks.prompt_tokens_hit - hits_before == cached
    assert got[:cached].isnan().all() and not got[cached:].isnan().any()  # the cached part was not computed
    assert float((got[-1] - expected).norm() / expected.norm()) < 1e-5
    assert engine.generate([question], short)[0] == expected_tokens


def test_pool_too_small_preempts_and_still_gives_every_request_its_tokens(starter_gguf, eight_prompts, alone):
    block = 16 * 2 * 18 * 256 * 4  # tokens per block x K and V x layers x kv heads x head_dim x float32
    small = LLMEngine(
        starter_gguf,
        EngineOptions(device="cpu", threads=THREADS, n_ctx=128, max_num_seqs=8, kv_cache_bytes=10 * block, weights="float32"),
    )
    try:
        assert small.blocks.num_blocks == 10  # 160 tokens for eight requests of 20 to 69 tokens
        small.scheduler.watermark = 0  # admit up to the last block, so decoding must preempt
        got = small.generate(eight_prompts, SamplingParams(temperature=0, max_tokens=16))
        assert small.scheduler.num_preemptions > 0
        assert got == alone
        assert small.blocks.num_free == small.blocks.num_blocks
    finally:
        small.close()


def test_aborts_give_every_block_back(engine, eight_prompts):
    for i, p in enumerate(eight_prompts):
        engine.add_request(f"abort-{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=200))
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_used > 0
    for i in range(len(eight_prompts)):
        assert engine.abort(f"abort-{i}")
    assert not engine.has_work()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.abort("abort-0")  # already gone


def test_seeded_sampling_does_not_depend_on_the_batch(engine, eight_prompts):
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=100 + i, max_tokens=8) for i in range(4)]
    alone = [engine.generate([p], q)[0] for p, q in zip(eight_prompts[:4], params)]
    together = engine.generate(eight_prompts[:4], params)
    assert together == alone
