"""Which sequences run in the next step, and how many of their tokens.

Continuous batching: sequences join and leave at every step. Each step has a
token budget. Decoding sequences come first, one token each, so a stream
never waits; what is left of the budget goes to prompt chunks, first of
sequences already admitted, then of newly admitted ones (first come, first
served). A long prompt is therefore cut into chunks across steps and never
stalls the streams already running.

Admission gives a sequence blocks for all the tokens it has (prefix-cache
hits included), so a prefill never runs out of blocks halfway. Decoding needs
a new block every block_size tokens; when the pool is empty, the newest
running sequence is preempted: its blocks go back to the pool and it waits at
the front of the queue to be recomputed (prompt plus what it generated so far,
so no token is lost or repeated; its own cached blocks usually make that cheap).

An admission watermark keeps that from looping: while others run, a waiting
sequence is admitted only if its blocks fit with a few blocks still free
(WATERMARK of the pool, and at least one per running sequence, so each can
cross a block boundary), and nobody is admitted in a step that had to
preempt. Without it a burst of long prompts fills the pool to the last
block, the next decode preempts the newest, which is admitted again at once,
and so on. With nothing running the watermark is waived: a prompt that fits
the pool always runs, so no request starves.

Sliding-window groups (block_manager.py) are the exception to "all blocks at
admission": they take blocks for each prompt chunk as it is scheduled (making
room like a decode does), and before every step each running sequence gives
back the blocks its window has left.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status

WATERMARK = 0.01  # share of each pool kept free when admitting beside running sequences (vLLM keeps 1% too)


@dataclass
class Scheduled:
    seq: Sequence
    n_tokens: int  # tokens it runs this step
    n_draft: int = 0  # of those, speculative guesses at the end, to be verified (speculative.py)

    @property
    def samples(self) -> bool:
        """Whether this step reaches its last token, so it produces the next one."""
        return self.seq.num_computed + self.n_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int, watermark: float = WATERMARK
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("the token budget must cover one token of every running sequence")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark = watermark  # 0: admit whenever the blocks fit (tests compare)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; preemption takes from the end
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        step: list[Scheduled] = []
        chosen: set[int] = set()
        preemptions = self.num_preemptions
        for seq in self.running:  # blocks that left a sliding window go back first
            self.blocks.slide(seq)

        # 1. one token for every decoding sequence, oldest first
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_remaining != 1:
                continue
            if not self._make_room(seq, seq.num_computed + 1, chosen):
                continue  # it was preempted itself
            step.append(Scheduled(seq, 1))
            chosen.add(id(seq))
            budget -= 1

        # 2. the next chunk of every admitted prompt (sliding groups take blocks chunk by chunk)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or id(seq) in chosen or seq.num_remaining <= 1:
                continue
            n = min(seq.num_remaining, budget)
            if not self._make_room(seq, seq.num_computed + n, chosen):
                continue  # it was preempted itself
            step.append(Scheduled(seq, n))
            chosen.add(id(seq))
            budget -= n

        # 3. admit waiting sequences while there is budget, room in the batch and blocks above the watermark
        if self.watermark and self.num_preemptions > preemptions:
            return step  # the pool is short now: admitting would only preempt again
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            keep_free = self.blocks.watermark(self.watermark, len(self.running))
            if not self.blocks.allocate(seq, budget, keep_free=keep_free):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_remaining, budget)
            step.append(Scheduled(seq, n))
            chosen.add(id(seq))
            budget -= n
        return step

    def _make_room(self, seq: Sequence, n_tokens: int, chosen: set[int]) -> bool:
        """Blocks for `n_tokens` tokens of `seq`, preempting the newest others if need be.

        False when `seq` itself had to go.
        """
        while not self.blocks.can_grow(seq, n_tokens):
            victim = next((s for s in reversed(self.running) if id(s) not in chosen), None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, n_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Ahead of everyone who never ran; behind those preempted earlier in this step.
        index = 0
        while index < len(self.waiting) and self.waiting[index].num_preemptions and self.waiting[index].arrival < seq.arrival:
            index += 1
        self.waiting.insert(index, seq)
