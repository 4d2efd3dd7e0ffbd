"""KV-cache sizing, torch-free: which layers share a pool, what a sliding sequence holds, how a budget is split.

The one home of these formulas: the native engine sizes its pools with them
(native/model_runner.py) and the fit planner predicts that memory with them
(localllm/fit/native_memory.py), so a plan and the engine cannot drift apart.

A layer with a sliding window of w tokens only ever reads the last w
positions, so its blocks before the window can go back to the pool. With one
block table for all layers that is impossible (the global layers still need
those positions), so when contexts can outgrow the window the sliding layers
get a pool and a block table of their own: a KV group. Gemma 3 has two groups
(1 global layer in 6, and the rest); Mistral, whose every layer slides, has
one group that slides; Llama and Qwen have one group that keeps everything.

How much a sliding sequence holds: while a step runs n new tokens from
position c, its queries read positions c - w + 1 .. c + n - 1, that is w - 1 + n
positions, which touch at most ceil((w + n - 2) / block_size) + 1 blocks
(`window_blocks`). Blocks wholly before c - w + 1 are released before the step
(block_manager.py). Decoding (n = 1) that is ceil((w - 1) / block_size) + 1
blocks; a prompt chunk of n tokens adds its own. A sequence never holds more
blocks than its context needs.

Sizing: the pools together get one budget (bytes). Their demand is what
max_num_seqs sequences at the full context can hold at once: each group's
full context for the global group, and for the sliding group one decoding
window per sequence plus one block, plus the step's token budget
(max_num_batched_tokens) for prompt chunks, never more than full contexts. A
budget above the demand leaves the sliding group at its demand and gives the
rest to the first group (longer contexts, more prefix cache); a smaller one is
shared in proportion to the demands, but never below what one sequence needs
to make progress alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from localllm.core.errors import DoesNotFit


class KVShape(Protocol):
    """The attention facts sizing needs: a native ModelConfig, or the planner's NativeShape."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    sliding_window: int | None
    sliding_layers: Sequence[bool]  # per layer: does it slide


@dataclass
class KVGroup:
    """Layers whose K and V live in one pool, addressed through one block table per sequence."""

    layers: list[int]  # model layer indices, in order; layer layers[j] is slice j of the pool
    window: int | None  # blocks leave the group once this window has passed them; None: they stay
    num_blocks: int = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def window_blocks(window: int, block_size: int, n_tokens: int) -> int:
    """Most blocks a sliding sequence holds while a step runs `n_tokens` new tokens."""
    return cdiv(window + n_tokens - 2, block_size) + 1


def kv_groups(shape: KVShape, n_ctx: int, block_size: int) -> list[KVGroup]:
    """The groups for this model and context: sliding layers apart only when that can save memory."""
    every = list(range(shape.n_layers))
    window = shape.sliding_window
    sliding = [i for i in every if window and shape.sliding_layers[i]]
    if not sliding or window_blocks(window, block_size, 1) >= cdiv(n_ctx, block_size):
        return [KVGroup(every, None)]  # no window, or none shorter than the context: nothing ever leaves
    full = [i for i in every if not shape.sliding_layers[i]]
    if not full:
        return [KVGroup(sliding, window)]
    return [KVGroup(full, None), KVGroup(sliding, window)]


def group_block_bytes(group: KVGroup, shape: KVShape, block_size: int, dtype_bytes: int) -> int:
    """K and V of one block: 2 x layers x block_size x kv_heads x head_dim x bytes."""
    return 2 * len(group.layers) * block_size * shape.n_kv_heads * shape.head_dim * dtype_bytes


def demand(group: KVGroup, *, block_size: int, n_ctx: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks the group can hold at once when max_num_seqs sequences run at the full context."""
    full = max_num_seqs * cdiv(n_ctx, block_size)
    if group.window is None:
        return full
    windows = max_num_seqs * (window_blocks(group.window, block_size, 1) + 1) + cdiv(max_num_batched_tokens, block_size)
    return min(full, windows)


def minimum(group: KVGroup, *, block_size: int, n_ctx: int, max_num_batched_tokens: int) -> int:
    """Blocks one sequence at the full context needs to progress alone (a whole prompt chunk included)."""
    full = cdiv(n_ctx, block_size)
    if group.window is None:
        return full
    return min(full, window_blocks(group.window, block_size, min(max_num_batched_tokens, n_ctx)))


def split_budget(
    groups: list[KVGroup],
    budget: int,
    block_bytes: list[int],
    *,
    block_size: int,
    n_ctx: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> list[int]:
    """Blocks per group from a byte budget (see the module docstring). Raises DoesNotFit."""
    shape = dict(block_size=block_size, n_ctx=n_ctx, max_num_batched_tokens=max_num_batched_tokens)
    needs = [demand(g, max_num_seqs=max_num_seqs, **shape) for g in groups]
    floors = [minimum(g, **shape) for g in groups]
    total = sum(n * b for n, b in zip(needs, block_bytes))
    counts = [0] * len(groups)
    for i in range(1, len(groups)):  # the first group takes what the others leave
        share = needs[i] if budget >= total else int(needs[i] * budget / total)
        counts[i] = max(floors[i], share)
    counts[0] = max(0, budget - sum(c * b for c, b in zip(counts, block_bytes))) // block_bytes[0]
    if any(c < f for c, f in zip(counts, floors)):
        need = sum(f * b for f, b in zip(floors, block_bytes))
        if len(groups) == 1 and groups[0].window is None:
            held = f"holds {counts[0] * block_size} tokens, fewer than one context of {n_ctx}"
        else:
            held = f"cannot hold one context of {n_ctx} tokens ({need / 2**20:.0f} MiB with sliding windows)"
        raise DoesNotFit(
            f"the KV cache budget ({budget / 2**20:.0f} MiB) {held}; give it more memory or lower the context"
        )
    return counts


def demand_bytes(groups: list[KVGroup], block_bytes: list[int], **shape: int) -> int:
    """Bytes of the whole demand: the default CPU budget when memory allows it."""
    return sum(demand(g, **shape) * b for g, b in zip(groups, block_bytes))
