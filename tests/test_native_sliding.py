"""Sliding-window layers give back the blocks their window has left (localllm/core/kv_sizing.py, native/block_manager.py).

Unit level: which layers get their own pool, how a budget is split, what a
sequence holds while it slides, and prefix hits that must fall back when the
sliding group no longer has the blocks a longer hit would need. Model level:
tiny random Gemma 3 (global and sliding layers: two pools) and Mistral (every
layer slides: one sliding pool) with prompts many windows long, whose logits
and greedy tokens must equal transformers' while blocks are released, and
whose pools are full again after requests finish or are aborted.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

from pathlib import Path

import pytest
import torch

from localllm.core.requests import SamplingParams
from localllm.core.errors import DoesNotFit
from native.block_manager import RELEASED, BlockManager
from localllm.core.model_config import ModelConfig, RopeSpec
from native.engine import EngineOptions, LLMEngine
from localllm.core.kv_sizing import group_block_bytes, kv_groups, split_budget, window_blocks
from native.scheduler import Scheduler
from native.sequence import Sequence
from builders import TINY_VOCAB, save_tiny, tiny_config

BS = 4
WINDOW = 8


def _seq(tokens: list[int], name: str = "s", max_tokens: int = 100) -> Sequence:
    return Sequence(name, tokens, SamplingParams(temperature=0), max_tokens)


def _starter_shape(**overrides) -> ModelConfig:
    """Gemma 3 270M's attention shape: 18 layers, every 6th global, window 512, 1 KV head of 256."""
    fields = dict(
        architecture="gemma3", family="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, rms_norm_eps=1e-6, max_position=32768,
        rope=RopeSpec(1e6), sliding_window=512, sliding_layers=[(i + 1) % 6 != 0 for i in range(18)],
    )
    return ModelConfig(**{**fields, **overrides})


# -- layout and sizing ---------------------------------------------------------------------


def test_sliding_layers_get_their_own_pool_only_when_contexts_outgrow_the_window():
    starter = _starter_shape()
    full, sliding = kv_groups(starter, 32768, 16)
    assert full.layers == [5, 11, 17] and full.window is None
    assert len(sliding.layers) == 15 and sliding.window == 512
    assert [g.window for g in kv_groups(starter, 512, 16)] == [None]  # nothing can leave the window
    mistral = _starter_shape(sliding_layers=[True] * 18)
    assert [(len(g.layers), g.window) for g in kv_groups(mistral, 4096, 16)] == [(18, 512)]
    llama = _starter_shape(sliding_window=None, sliding_layers=[False] * 18)
    assert [(len(g.layers), g.window) for g in kv_groups(llama, 4096, 16)] == [(18, None)]


def test_window_bound_is_the_window_plus_the_step_rounded_out_to_blocks():
    assert window_blocks(512, 16, 1) == 33  # decoding: 511 earlier positions and the new one: 528 tokens of blocks
    assert window_blocks(512, 16, 256) == 49  # a 256-token prompt chunk: 784 tokens, i.e. window + 256 + 16
    assert window_blocks(8, 4, 1) == 3


def test_budget_split_gives_the_sliding_pool_its_demand_and_the_rest_to_the_global_layers():
    starter = _starter_shape()
    groups = kv_groups(starter, 32768, 16)
    sizes = [group_block_bytes(g, starter, 16, 4) for g in groups]
    shape = dict(block_size=16, n_ctx=32768, max_num_seqs=4, max_num_batched_tokens=256)
    counts = split_budget(groups, 2**30, sizes, **shape)
    assert counts[1] == 4 * (33 + 1) + 16  # four decoding windows, a block each for alignment, one chunk
    assert counts[0] == (2**30 - counts[1] * sizes[1]) // sizes[0]
    with pytest.raises(DoesNotFit, match="cannot hold one context of 32768"):
        split_budget(groups, 2**24, sizes, **shape)


# -- the block manager with a sliding group -------------------------------------------------


def _two_groups(full: int = 64, sliding: int = 64) -> BlockManager:
    return BlockManager([full, sliding], BS, windows=[None, WINDOW])


def _run(blocks: BlockManager, seq: Sequence, upto: int, chunk: int) -> None:
    """Compute a sequence's tokens up to `upto` in chunks, as the scheduler and engine would."""
    while seq.num_computed < upto:
        blocks.slide(seq)
        n = min(chunk, upto - seq.num_computed)
        assert blocks.can_grow(seq, seq.num_computed + n)
        blocks.grow(seq, seq.num_computed + n)
        held = sum(b != RELEASED for b in seq.block_tables[1])
        assert held <= window_blocks(WINDOW, BS, n)
        seq.num_computed += n
        blocks.commit(seq)


def test_slide_releases_what_the_window_left_and_free_returns_the_rest():
    blocks = _two_groups()
    s = _seq(list(range(40)))
    assert blocks.allocate(s, 5)
    assert len(s.block_tables[0]) == 10 and len(s.block_tables[1]) == 2  # all tokens vs the first chunk
    _run(blocks, s, 40, 5)
    blocks.slide(s)  # the next token is position 40: it reads 33..40
    assert s.block_tables[1][:8] == [RELEASED] * 8 and RELEASED not in s.block_tables[1][8:]
    assert blocks.used_per_group() == [10, 2]
    blocks.free(s)
    assert blocks.num_free == blocks.num_blocks and not any(s.block_tables)


def test_prefix_hit_uses_released_window_blocks_while_they_are_cached():
    blocks = _two_groups()
    first = _seq(list(range(40)), "first")
    blocks.allocate(first, 5)
    _run(blocks, first, 40, 5)
    blocks.free(first)
    again = _seq(list(range(40)) + [99, 98, 97], "again")
    assert blocks.allocate(again, 16)
    assert again.num_computed == 40  # every full block: global blocks 0..9, sliding blocks 8..9
    assert again.block_tables[1][:8] == [RELEASED] * 8
    assert blocks.used_per_group() == [11, 3]


def test_prefix_hit_falls_back_to_what_both_groups_can_serve():
    blocks = _two_groups(full=64, sliding=6)
    first = _seq(list(range(48)), "first")
    blocks.allocate(first, 4)
    _run(blocks, first, 48, 4)  # the small sliding pool evicts its early blocks to make room for later ones
    blocks.free(first)
    # a prompt sharing only the first 24 tokens: the global group has blocks 0..5 cached, but the
    # window's blocks for position 24 (blocks 4..5) were evicted, so no hit can start there
    branch = _seq(list(range(24)) + [90 + i for i in range(10)], "branch")
    assert blocks.allocate(branch, 4)
    assert branch.num_computed == 0
    blocks.free(branch)
    # the same prompt as before: the last blocks are still cached in both groups
    again = _seq(list(range(48)) + [7], "again")
    assert blocks.allocate(again, 4)
    assert again.num_computed == 48


def test_scheduler_chunks_a_long_prompt_through_a_small_sliding_pool():
    blocks = BlockManager([40, 8], BS, windows=[None, WINDOW])  # 8 sliding blocks for a 120-token prompt
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=12)
    long = _seq(list(range(120)), "long")
    sched.add(long)
    while long.num_completion < 5:
        step = sched.schedule()
        assert step
        for item in step:
            samples = item.samples
            item.seq.num_computed += item.n_tokens
            blocks.commit(item.seq)
            if samples:
                item.seq.token_ids.append(1)
        assert blocks.used_per_group()[1] <= window_blocks(WINDOW, BS, 12)
    assert sched.num_preemptions == 0
    sched.remove(long)
    assert blocks.num_free == blocks.num_blocks


# -- tiny models against transformers ------------------------------------------------------

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 100  # twelve windows and more


def _configs():
    return {
        "gemma3": tiny_config("gemma3", sliding_window=WINDOW, final_logit_softcapping=30.0),
        "mistral": tiny_config("mistral", sliding_window=WINDOW),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sliding")
    return {name: save_tiny(config, root / name) for name, config in _configs().items()}


def _prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: Path, **options) -> LLMEngine:
    defaults = dict(device="cpu", load_tokenizer=False, block_size=BS, max_num_seqs=4, max_num_batched_tokens=16, threads=2,
                    weights="float32")
    return LLMEngine(path, EngineOptions(**{**defaults, **options}))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max(float((a[i] - b[i]).norm() / b[i].norm()) for i in range(b.shape[0]))


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_long_prompt_releases_blocks_and_matches_transformers(tiny, arch):
    from transformers import AutoModelForCausalLM

    prompt = _prompt(0)
    model = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32).eval()
    with torch.inference_mode():
        ref_logits = model(torch.tensor([prompt])).logits[0]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    ref_tokens = out.sequences[0, PROMPT_LEN:].tolist()
    ref_top = [torch.log_softmax(scores[0].float(), -1).topk(3).values.tolist() for scores in out.scores]
    engine = _engine(tiny[arch])
    groups = engine.runner.kv_groups
    assert [g.window for g in groups] == ([None, WINDOW] if arch == "gemma3" else [WINDOW])
    sliding = len(groups) - 1
    assert _rel(engine.prompt_logits(prompt, chunk=7), ref_logits) < 1e-4

    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=24, logprobs=3))
    tokens, top, most = [], [], 0
    while engine.has_work():
        for o in engine.step():
            tokens.append(o.token)
            top.append([lp for _, lp in o.logprobs.top])
        held = engine.blocks.used_per_group()[sliding]
        most = max(most, held)
        if engine.sequences and engine.sequences["long"].num_computed >= PROMPT_LEN:  # decoding
            assert held <= window_blocks(WINDOW, BS, 1)
    assert tokens == ref_tokens
    for got, want in zip(top, ref_top):  # every decode step's distribution, with blocks released behind it
        assert got == pytest.approx(want, abs=1e-4)
    assert most <= window_blocks(WINDOW, BS, 16) < PROMPT_LEN // BS  # a window and a chunk, never the prompt
    if arch == "gemma3":
        assert engine.blocks.pools[0].num_blocks >= engine.blocks.blocks_for(PROMPT_LEN)  # global layers keep all
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats()["kv_bytes_used"] == 0


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_prefix_cache_hits_with_released_blocks_give_the_cold_logits(tiny, arch):
    prompt = _prompt(1)
    follow = prompt + _prompt(2, 9)
    cold = _engine(tiny[arch], prefix_caching=False)
    expected = cold.prompt_logits(follow, chunk=16)[-4:]
    warm = _engine(tiny[arch])
    warm.prompt_logits(prompt, chunk=16)  # caches its blocks; the sliding ones left the window long ago
    hits = warm.blocks.prompt_tokens_hit
    got = warm.prompt_logits(follow, chunk=16)
    assert warm.blocks.prompt_tokens_hit - hits == PROMPT_LEN  # whole prompt: all blocks still cached
    assert _rel(got[-4:], expected) < 1e-5
    assert warm.blocks.num_free == warm.blocks.num_blocks


def test_batched_preempted_and_aborted_requests_with_a_tiny_sliding_pool(tiny):
    prompts = [_prompt(10 + i, 30 + 17 * i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12)
    roomy = _engine(tiny["gemma3"])
    alone = [roomy.generate([p], params)[0] for p in prompts]
    per_token = 2 * 3 * 2 * 32 * 4  # K and V x layers x kv heads x head_dim x float32
    small = _engine(tiny["gemma3"], kv_cache_bytes=60 * BS * per_token)  # well under four contexts of ~90 tokens
    small.scheduler.watermark = 0  # admit up to the last block, so decoding must preempt
    assert small.generate(prompts, params) == alone
    assert small.scheduler.num_preemptions > 0
    assert small.blocks.num_free == small.blocks.num_blocks
    for i, p in enumerate(prompts):
        small.add_request(f"abort-{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=50))
    for _ in range(12):
        small.step()
    assert small.blocks.num_used > 0
    for i in range(len(prompts)):
        small.abort(f"abort-{i}")
    assert small.blocks.num_free == small.blocks.num_blocks


def test_prefix_hit_falls_back_when_the_window_blocks_were_evicted(tiny):
    """One sequence, a sliding pool of 8 blocks: after a long prompt only its last window stays cached."""
    prompt = _prompt(3)
    branch = prompt[:60] + _prompt(4, 20)  # shares 15 global blocks, but the window at 60 was evicted
    cold = _engine(tiny["gemma3"], prefix_caching=False, max_num_seqs=1)
    expected = cold.prompt_logits(branch, chunk=16)[-4:]
    warm = _engine(tiny["gemma3"], max_num_seqs=1)
    assert warm.blocks.pools[1].num_blocks == 8
    warm.prompt_logits(prompt, chunk=16)
    again = warm.prompt_logits(prompt + [5, 6, 7], chunk=16)  # the whole prompt: its last window is cached
    assert warm.blocks.prompt_tokens_hit == PROMPT_LEN and again[:PROMPT_LEN].isnan().all()
    got = warm.prompt_logits(branch, chunk=16)
    assert warm.blocks.prompt_tokens_hit == PROMPT_LEN  # no hit, though the global group alone could serve 60 tokens
    assert _rel(got[-4:], expected) < 1e-5
