"""Fixes of issue 19's bugs found by reading: each test failed before its fix.

- an admission watermark (native/scheduler.py, native/block_manager.py);
- an explicit --parallel reaches the native engine's sequence limit (localllm/backends/select.py);
- closing a native backend lets go of the model and its KV cache (localllm/backends/native.py, native/engine.py);
- the CUDA memory profile runs the worst prefill step and plans a draft model's share with the target's
  (native/model_runner.py): the planning is tested as arithmetic here, the CUDA calls cannot run on this CPU.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import pytest

from localllm.core.requests import SamplingParams
from native.block_manager import BlockManager
from native.scheduler import Scheduler
from native.sequence import Sequence

# -- the admission watermark -------------------------------------------------------------------


def _burst(n_prompts: int, prompt_len: int, max_tokens: int) -> list[Sequence]:
    """Distinct long prompts (no prefix shared between them), arriving at once."""
    return [
        Sequence(f"r{i}", [(i * 131 + j) % 97 + 1 for j in range(prompt_len)], SamplingParams(temperature=0), max_tokens)
        for i in range(n_prompts)
    ]


def _serve(sched: Scheduler, seqs: list[Sequence]) -> int:
    """Run the scheduler as the engine does, without a model, until every sequence finished; the steps taken."""
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 10_000, "the scheduler stopped making progress"
        for item in sched.schedule():
            s, samples = item.seq, item.samples
            s.num_computed += item.n_tokens
            sched.blocks.commit(s)
            if samples:
                s.token_ids.append(5)
                if s.num_completion >= s.max_tokens:
                    sched.remove(s)
    return steps


@pytest.mark.parametrize(
    "pool, block_size, n_prompts, prompt_len, max_tokens, max_num_seqs, step_tokens",
    [(64, 4, 16, 30, 40, 8, 64), (100, 4, 20, 60, 30, 16, 64), (128, 16, 32, 200, 64, 16, 256)],
)
def test_a_burst_of_long_prompts_preempts_less_with_the_watermark_and_all_finish(
    pool, block_size, n_prompts, prompt_len, max_tokens, max_num_seqs, step_tokens
):
    preemptions = {}
    for watermark in (0.0, None):  # 0: admit whenever the blocks fit (the old rule); None: the default
        blocks = BlockManager(pool, block_size)
        extra = {} if watermark is None else {"watermark": watermark}
        sched = Scheduler(blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=step_tokens, **extra)
        seqs = _burst(n_prompts, prompt_len, max_tokens)
        _serve(sched, seqs)
        assert all(s.num_completion == max_tokens for s in seqs), "a request starved"
        assert blocks.num_free == pool
        preemptions[watermark] = sched.num_preemptions
    assert preemptions[0.0] > 0, "the burst must overfill the pool for the comparison to mean anything"
    assert preemptions[None] < preemptions[0.0]


def test_the_watermark_is_waived_when_nothing_runs():
    """A prompt that needs the whole pool still runs: nobody could ever free blocks for it."""
    blocks = BlockManager(8, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    (whole,) = _burst(1, 31, 1)  # 8 blocks: the whole pool, the generated token included
    _serve(sched, [whole])
    assert whole.num_completion == 1 and sched.num_preemptions == 0


def test_admission_beside_running_sequences_leaves_the_watermark_free():
    blocks = BlockManager(100, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=512)
    first, second = _burst(2, 4 * 90, 5)[0], _burst(2, 4 * 10, 5)[1]
    sched.add(first)
    sched.schedule()  # first holds the 90 blocks of its prompt
    assert blocks.num_free == 10
    assert blocks.watermark(sched.watermark, 1) == [1]
    sched.add(second)  # its 10 blocks fit, but would leave none for first's next token: it waits
    assert [item.seq for item in sched.schedule()] == [first]
    assert sched.waiting[0] is second
    assert not blocks.allocate(second, keep_free=[1]) and blocks.allocate(second)


# -- --parallel reaches the native engine's sequence limit ---------------------------------------


def _served(starter_gguf, *flags: str):
    """The backend `localllm serve starter FLAGS` opens, through the server's registry (cmd_serve's settings)."""
    from localllm.cli.loading import load_options
    from localllm.cli.parser import build_parser
    from localllm.server.registry import ModelRegistry
    from localllm.server.settings import DEFAULT_PARALLEL, ServerSettings
    from localllm.store.store import ResolvedModel

    args = build_parser().parse_args(["serve", "--threads", "1", *flags])
    settings = ServerSettings(parallel=DEFAULT_PARALLEL if args.parallel is None else args.parallel, load=load_options(args))
    return ModelRegistry(settings)._open_backend(ResolvedModel("starter", starter_gguf), None)


@pytest.mark.parametrize("flags, expected", [(["--parallel", "32"], 32), ([], 16)])
def test_native_engine_runs_as_many_sequences_as_parallel_says_and_its_own_default_otherwise(starter_gguf, flags, expected):
    backend = _served(starter_gguf, "--backend", "native", "--ctx", "256", *flags)
    try:
        assert backend.name == "native"
        assert backend._engine.scheduler.max_num_seqs == expected
    finally:
        backend.close()


@pytest.mark.parametrize("flags, expected", [(["--parallel", "8"], 8), ([], 4)])
def test_llamacpp_slots_still_follow_parallel(starter_gguf, flags, expected):
    backend = _served(starter_gguf, "--backend", "llamacpp", "--ctx", "1024", *flags)
    try:
        assert backend.name == "llamacpp" and backend.n_parallel == expected
    finally:
        backend.close()


# -- closing a native backend lets go of the model and its cache ---------------------------------


def _device_refs(backend) -> list:
    """Weak references to what holds device memory: the embedding table and every KV pool."""
    import weakref

    runner = backend._engine.runner
    return [weakref.ref(runner.model.embed_tokens.weight), *(weakref.ref(c) for c in runner.kv_caches)]


def _all_dead(refs: list) -> bool:
    import gc

    gc.collect()
    return all(r() is None for r in refs)


def test_closing_a_native_backend_frees_its_weights_and_cache_while_the_backend_object_lives(starter_gguf):
    from localllm.backends.native import NativeBackend, NativeOptions
    from localllm.core.modelinfo import read_model_info

    backend = NativeBackend("starter", read_model_info(starter_gguf), NativeOptions(n_ctx=256, n_threads=1, max_num_seqs=2))
    refs = _device_refs(backend)
    assert not _all_dead(refs)
    backend.close()
    assert _all_dead(refs)  # `backend` is still referenced here, as a server's stale lease may keep it


def test_unloading_from_the_server_registry_frees_the_model(starter_gguf):
    """The server's way: a front end holds the model, lets go, and the registry unloads it."""
    import asyncio

    from localllm.backends.select import LoadOptions
    from localllm.server.registry import ModelRegistry
    from localllm.server.settings import ServerSettings
    from localllm.store.store import ResolvedModel

    registry = ModelRegistry(ServerSettings(load=LoadOptions(backend="native", n_ctx=256, n_threads=1)))

    async def hold_and_let_go():
        lease = await registry.hold(ResolvedModel("starter", starter_gguf))
        refs = _device_refs(lease.backend)
        assert lease.backend.name == "native" and not _all_dead(refs)
        await registry.let_go(lease)
        assert registry.loaded() == []
        return lease, refs

    lease, refs = asyncio.run(hold_and_let_go())
    assert _all_dead(refs)  # the lease (and through it the backend) is still alive
    assert lease.backend._closed


# -- the CUDA memory plan: the worst prefill step, and a draft's share planned with the target's -----

GiB, MiB = 2**30, 2**20


def _budget_case():
    """A 24 GiB card, an 8B target (bf16) and a 1B draft, both for 16 sequences of 8192 tokens."""
    token_bytes = {"target": 2 * 32 * 8 * 128 * 2, "draft": 2 * 16 * 8 * 64 * 2}  # K and V x layers x kv heads x dim x bf16
    return dict(
        total=24 * GiB,
        utilization=0.90,
        used_elsewhere=600 * MiB,  # the CUDA context and the desktop
        weights=[15 * GiB, 2 * GiB + 500 * MiB],
        activation_peaks=[1 * GiB, 300 * MiB],
        fixed=[130 * MiB, 20 * MiB],
        demands=[16 * 8192 * token_bytes["target"], 16 * 8192 * token_bytes["draft"]],
    )


def test_a_draft_sized_after_its_target_is_left_nothing():
    """The bug, in the planner's own arithmetic: sized one after the other, the draft finds the target's
    weights and its whole pool already in the share, so its budget was negative (now 0: a clear refusal)."""
    from native.model_runner import shared_kv_budgets

    c = _budget_case()
    target_alone = shared_kv_budgets(
        c["total"], c["utilization"], c["used_elsewhere"], weights=c["weights"][:1],
        activation_peaks=c["activation_peaks"][:1], fixed=c["fixed"][:1], demands=c["demands"][:1],
    )[0]
    assert target_alone > 0
    draft_after = shared_kv_budgets(
        c["total"], c["utilization"], c["used_elsewhere"], weights=[c["weights"][0] + target_alone + c["fixed"][0] + c["weights"][1]],
        activation_peaks=c["activation_peaks"][1:], fixed=c["fixed"][1:], demands=c["demands"][1:],
    )[0]
    assert draft_after == 0


def test_a_target_and_its_draft_share_one_budget_within_the_utilization():
    from native.model_runner import shared_kv_budgets

    c = _budget_case()
    target_kv, draft_kv = shared_kv_budgets(
        c["total"], c["utilization"], c["used_elsewhere"], weights=c["weights"], activation_peaks=c["activation_peaks"],
        fixed=c["fixed"], demands=c["demands"],
    )
    assert target_kv > 0 and draft_kv > 0
    used = c["used_elsewhere"] + sum(c["weights"]) + max(c["activation_peaks"]) + sum(c["fixed"]) + target_kv + draft_kv
    assert used <= c["total"] * c["utilization"]
    assert c["total"] * c["utilization"] - used < 2  # nothing of the share is left unplanned but rounding
    # the same share of what each could use, so both pools hold as many tokens
    assert target_kv / c["demands"][0] == pytest.approx(draft_kv / c["demands"][1], rel=1e-9)


def test_a_budget_with_no_room_is_zero_for_every_model_never_negative():
    from native.model_runner import shared_kv_budgets

    assert shared_kv_budgets(8 * GiB, 0.9, 0, weights=[7 * GiB, 1 * GiB], activation_peaks=[GiB, GiB], fixed=[0, 0],
                             demands=[1, 1]) == [0, 0]


def test_the_profile_runs_a_full_prompt_chunk_against_the_longest_context(tmp_path):
    """The profiling pass (what the CUDA budget is measured on) builds the largest prefill mask a step can:
    chunk x context, not the chunk against itself."""
    from builders import save_tiny, tiny_config
    from native.model_runner import ModelRunner, RunnerOptions, profile_shape

    assert profile_shape(4096, 8192) == (4096, 4096)
    assert profile_shape(32768, 8192) == (8192, 32768)
    folder = save_tiny(tiny_config("llama"), tmp_path / "llama")
    runner = ModelRunner(folder, RunnerOptions(device="cpu", n_ctx=256, max_num_batched_tokens=64, kv_cache_bytes=8 * MiB))
    runner._allocate_cache(runner.blocks_for_tokens(64) + 1)  # the profiling pool: the chunk's blocks and one more
    for cache in runner.kv_caches:
        cache.zero_()
    batch = runner._profile_step()
    masks = [mask for _, _, mask in batch._prefill_views.values()]
    assert masks and max(m.numel() for m in masks) == 64 * 256
    ((ids, _, _),) = batch._prefill_views.values()
    assert ids.numel() == runner.blocks_for_tokens(256)  # and it gathered a whole context's keys
    slots = batch.slot_mapping.tolist()
    assert len(set(slots)) == 64 and max(slots) < runner.scratch_block * runner.block_size  # the small pool, no clash
