"""The native engine's block pool and scheduler, without a model: allocation, prefix caching, batching, preemption."""

from __future__ import annotations

import pytest

from localllm.core.requests import SamplingParams
from native.block_manager import BlockManager
from native.scheduler import Scheduler
from native.sequence import Sequence, Status

BS = 4


def seq(tokens: list[int], name: str = "s", max_tokens: int = 100) -> Sequence:
    return Sequence(name, tokens, SamplingParams(temperature=0), max_tokens)


def run_step(sched: Scheduler, blocks: BlockManager, next_token: int = 7) -> list[tuple[Sequence, int, bool]]:
    """What the engine does after the model ran: advance, hash full blocks, append sampled tokens.

    Returns (sequence, tokens run, whether it sampled) per scheduled sequence.
    """
    done = []
    for item in sched.schedule():
        samples = item.samples
        item.seq.num_computed += item.n_tokens
        blocks.commit(item.seq)
        if samples:
            item.seq.token_ids.append(next_token)
        done.append((item.seq, item.n_tokens, samples))
    return done


# -- block manager --------------------------------------------------------------------


def test_allocation_covers_every_token_and_free_returns_all():
    blocks = BlockManager(10, BS)
    s = seq(list(range(9)))
    assert blocks.allocate(s)
    assert len(s.block_table) == 3 and blocks.num_free == 7
    blocks.free(s)
    assert blocks.num_free == 10 and s.block_table == [] and s.num_computed == 0


def test_allocation_refused_when_the_pool_is_short():
    blocks = BlockManager(2, BS)
    assert not blocks.allocate(seq(list(range(9))))
    assert blocks.num_free == 2


def test_prefix_hit_shares_full_blocks_but_never_the_last_token():
    blocks = BlockManager(10, BS)
    first = seq(list(range(12)), "a")
    blocks.allocate(first)
    first.num_computed = 12
    blocks.commit(first)
    second = seq(list(range(12)), "b")  # identical prompt: 3 full blocks, but the last token must run
    assert blocks.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed == 8 and second.num_cached_prompt == 8
    assert blocks.blocks[first.block_table[0]].ref_count == 2
    longer = seq(list(range(8)) + [99, 98, 97], "c")  # shares two blocks, then differs
    assert blocks.allocate(longer)
    assert longer.num_computed == 8 and longer.block_table[:2] == first.block_table[:2]
    assert blocks.hit_rate == pytest.approx((8 + 8) / (12 + 12 + 11))


def test_hash_is_chained_so_equal_blocks_after_different_prefixes_do_not_match():
    blocks = BlockManager(10, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    blocks.allocate(a)
    a.num_computed = 9
    blocks.commit(a)
    b = seq([0, 0, 0, 0, 5, 6, 7, 8, 9], "b")  # same second block, different first
    blocks.allocate(b)
    assert b.num_computed == 0


def test_freed_cached_blocks_stay_findable_until_evicted_least_recently_used_first():
    blocks = BlockManager(4, BS)
    a = seq(list(range(9)), "a")  # 2 full blocks + 1
    blocks.allocate(a)
    a.num_computed = 9
    blocks.commit(a)
    cached = a.block_table[:2]
    blocks.free(a)
    assert blocks.num_free == 4 and len(blocks.free_cached) == 2
    again = seq(list(range(9)), "again")
    assert blocks.allocate(again) and again.block_table[:2] == cached
    blocks.free(again)
    # a prompt needing all four blocks must evict: fresh blocks go first, then the LRU cached one
    big = seq([50 + i for i in range(16)], "big")
    assert blocks.allocate(big)
    assert blocks.num_free == 0 and not blocks.by_hash
    blocks.free(big)
    assert blocks.num_free == 4


def test_duplicate_content_is_cached_once():
    blocks = BlockManager(10, BS)
    a, b = seq(list(range(9)), "a"), seq(list(range(9)), "b")
    blocks.allocate(a)
    blocks.allocate(b)  # both admitted before either computed anything: separate blocks
    for s in (a, b):
        s.num_computed = 9
        blocks.commit(s)
    assert len(blocks.by_hash) == 2
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free == 10 and len(blocks.free_cached) == 2


# -- scheduler ---------------------------------------------------------------------------


def test_long_prompt_is_chunked_and_decodes_are_never_starved():
    blocks = BlockManager(100, BS)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=8)
    short = seq([1, 2, 3], "short")
    sched.add(short)
    step = run_step(sched, blocks)
    assert [(s.request_id, n) for s, n, _ in step] == [("short", 3)]
    long = seq(list(range(20)), "long")
    sched.add(long)
    for _ in range(3):  # 20 prompt tokens at 7 per step (budget 8 minus short's decode token)
        step = run_step(sched, blocks)
        assert step[0][:2] == (short, 1)
        assert step[1][0] is long and step[1][1] <= 7
    assert long.num_computed == 20 and long.num_completion == 1


def test_samples_only_when_the_chunk_reaches_the_end():
    blocks = BlockManager(100, BS)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=5)
    s = seq(list(range(12)), "s")
    sched.add(s)
    flags = [run_step(sched, blocks)[0][2] for _ in range(3)]
    assert flags == [False, False, True]


def test_max_num_seqs_limits_admission():
    blocks = BlockManager(100, BS)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        sched.add(seq([1, 2, 3], f"s{i}"))
    run_step(sched, blocks)
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_preemption_takes_the_newest_and_recomputes_it_without_losing_tokens():
    blocks = BlockManager(4, BS)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=16)
    old, new = seq([1, 2, 3], "old"), seq([4, 5, 6], "new")
    sched.add(old)
    sched.add(new)
    run_step(sched, blocks)  # both prefilled, one block each, each sampled a token
    for step_no in range(12):
        run_step(sched, blocks, next_token=100 + step_no)
    assert sched.num_preemptions >= 1 and new.num_preemptions >= 1 and old.num_preemptions == 0
    # every token the newer sequence owns is a token it sampled; its recompute covered them all
    assert new.token_ids[:3] == [4, 5, 6]
    assert new.num_computed <= new.num_tokens
    assert blocks.num_used == sum(len(s.block_table) for s in sched.running)


def test_remove_returns_blocks_wherever_the_sequence_is():
    blocks = BlockManager(10, BS)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = seq([1] * 5, "a"), seq([2] * 5, "b"), seq([3] * 5, "c")
    for s in (a, b, c):
        sched.add(s)
    run_step(sched, blocks)
    sched.remove(a)  # running
    sched.remove(c)  # waiting
    sched.remove(b)
    assert blocks.num_free == 10 and not sched.has_work()
    assert a.status is Status.RUNNING  # the engine marks it finished; the scheduler only lets go
