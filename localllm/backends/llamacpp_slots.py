"""Slot bookkeeping for the batched llama.cpp engine: which sequence holds which tokens.

llama.cpp keeps one KV cache for the whole context; each *slot* is a sequence
id in it. A slot remembers the tokens whose keys and values its sequence holds,
in position order, even after its request has finished: that is the prompt
cache. A new request takes an idle slot and starts from the longest prefix it
shares with any slot, busy or idle. The KV cache is unified (one pool of cells
for all sequences), so copying a prefix to another sequence only tags the same
cells with a second sequence id: nothing is recomputed and nothing is copied.

`SlotTable` plans and never calls llama.cpp (the tests drive it alone);
`SlotCache` applies the plans to llama.cpp's memory. Every change to a
sequence's cells goes through `SlotCache`, together with the slot's token
list, so `slot.cached` always says what the sequence holds (and a draft
guesser's context, which mirrors the slots, follows along).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection on slice equality (C speed on long lists)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:  # invariant: a[:low] == b[:low] and a[:high+1] != b[:high+1]
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in this sequence's KV, positions 0..n-1
    todo: list[int] = field(default_factory=list)  # tokens still to run through the model
    guesses: list[int] = field(default_factory=list)  # speculative tokens after todo, this step only
    job: Any = None  # the request it serves (the engine's Job), None when idle
    admitted_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def busy(self) -> bool:
        return self.job is not None


@dataclass
class Admission:
    """How a request enters a slot: start from `reuse` tokens of `source`'s cache.

    source is None (nothing reused), the slot itself (keep its first `reuse`
    tokens, drop the rest), or another slot (copy its first `reuse` tokens).
    """

    slot: Slot
    source: Slot | None
    reuse: int


class SlotTable:
    def __init__(self, n_slots: int) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.busy]

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if not s.busy]

    def plan(self, tokens: list[int]) -> Admission | None:
        """Where a request with prompt `tokens` should go; None when every slot is busy.

        The last prompt token always runs (its logits give the first output
        token), so at most len(tokens) - 1 tokens are reused.
        """
        idle = self.idle()
        if not idle:
            return None
        best, best_len = None, 0
        for slot in self.slots:
            n = common_prefix(slot.cached, tokens)
            # prefer an idle match (no copy) over an equally long busy one
            if n > best_len or (n == best_len and n > 0 and best is not None and best.busy and not slot.busy):
                best, best_len = slot, n
        reuse = min(best_len, len(tokens) - 1)
        empty = [s for s in idle if not s.cached]
        if best is not None and reuse > 0 and not best.busy:
            # Continue in place (a chat's next turn) unless that would throw away most
            # of a longer cache while an empty slot could take a copy instead.
            if not empty or len(best.cached) - reuse <= reuse:
                return Admission(best, best, reuse)
        # an empty idle slot loses nothing; otherwise the least recently used cache goes
        target = empty[0] if empty else min(idle, key=lambda s: s.last_used)
        if reuse <= 0:
            return Admission(target, None, 0)
        return Admission(target, best, reuse)

    def eviction_order(self) -> list[Slot]:
        """Idle slots holding a cache, least recently used first: what to drop when the KV cache is full."""
        return sorted((s for s in self.idle() if s.cached), key=lambda s: s.last_used)

    def cells_in_use(self) -> int:
        """KV cells the slots' caches occupy, counting a shared prefix once.

        Prefixes copied between sequences share cells, so this is the number
        of distinct prefixes among all caches (adjacent caches in sorted order
        share exactly their common prefix).
        """
        caches = sorted(s.cached for s in self.slots if s.cached)
        total = sum(len(c) for c in caches)
        for prev, cur in zip(caches, caches[1:]):
            total -= common_prefix(prev, cur)
        return total


class SlotCache:
    """The slots' sequences in llama.cpp's KV memory, kept equal to each `slot.cached`."""

    def __init__(self, lc, mem, n_swa: int, table: SlotTable, mirror=None) -> None:
        self.lc, self.mem = lc, mem
        self.n_swa = n_swa  # the model's sliding window (0: none)
        self.table = table
        self.mirror = mirror  # a draft guesser's context (copy_prefix, forget, clear), or None

    def take_prefix(self, slot: Slot, source: Slot | None, reuse: int) -> int:
        """Make `slot`'s sequence hold the first `reuse` tokens of `source`'s; the number it holds."""
        lc, mem = self.lc, self.mem
        if source is not None and reuse > 0 and not self._prefix_intact(source, reuse):
            reuse = 0
        if source is slot and reuse > 0 and lc.llama_memory_seq_rm(mem, slot.seq_id, reuse, -1):
            slot.cached = slot.cached[:reuse]
            return reuse  # the draft, if any, trims its own copy when it next guesses
        self.drop(slot)
        if source is None or source is slot or reuse <= 0:
            return 0
        lc.llama_memory_seq_cp(mem, source.seq_id, slot.seq_id, 0, reuse)
        slot.cached = source.cached[:reuse]
        if self.mirror is not None:
            self.mirror.copy_prefix(source.seq_id, slot.seq_id, reuse)
        return reuse

    def _prefix_intact(self, source: Slot, reuse: int) -> bool:
        """Whether the sliding-window layers still hold what a continuation after `reuse` tokens attends to.

        llama.cpp may overwrite window cells that slid out of every sequence's
        window; the positions it keeps for a sequence are always one run from
        its smallest position (`llama_memory_seq_pos_min`) to its largest.
        """
        pos_min = self.lc.llama_memory_seq_pos_min(self.mem, source.seq_id)
        if pos_min <= 0:
            return True
        return self.n_swa > 0 and pos_min <= reuse - self.n_swa

    def drop(self, slot: Slot) -> None:
        """Forget the slot's whole cache."""
        self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.cached = []
        if self.mirror is not None:
            self.mirror.forget(slot.seq_id)

    def trim(self, slot: Slot, keep: int) -> None:
        """Keep the first `keep` cached tokens (after a check: the cells of rejected guesses go)."""
        if keep < len(slot.cached):
            self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1)
            del slot.cached[keep:]

    def drop_guesses(self, slot: Slot) -> None:
        """A failed decode: remove whatever cells the slot's guesses took; the next step makes new ones."""
        self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.cached) + len(slot.todo), -1)
        slot.guesses = []

    def resync(self, slots: list[Slot]) -> None:
        """After an aborted decode, believe llama.cpp about what each sequence now holds."""
        for slot in slots:
            have = self.lc.llama_memory_seq_pos_max(self.mem, slot.seq_id) + 1
            if have > len(slot.cached):
                n = have - len(slot.cached)
                slot.cached, slot.todo = slot.cached + slot.todo[:n], slot.todo[n:]
            elif have < len(slot.cached):
                slot.todo = slot.cached[have:] + slot.todo
                slot.cached = slot.cached[:have]
            if not slot.todo and slot.cached:  # its logits are gone: run its last token again
                self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.cached) - 1, -1)
                slot.todo = [slot.cached.pop()]

    def clear(self) -> None:
        """Start from an empty cache (after an unexpected failure)."""
        self.lc.llama_memory_clear(self.mem, True)
        for slot in self.table.slots:
            slot.cached, slot.todo, slot.guesses = [], [], []
        if self.mirror is not None:
            self.mirror.clear()
