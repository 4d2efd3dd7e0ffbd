"""The KV block pool: allocation, reference counts, prefix caching and sliding windows.

Blocks are numbered 0..num_blocks-1; the model runner owns the tensors, this
file only decides who uses which block. A block filled completely is given a
hash chained from its parent's: hash(parent hash, its token ids). Two requests
whose prompts share the first k full blocks therefore share those k hashes,
and the second one reuses the first one's blocks (the reference count goes up)
instead of computing them again.

A block whose last user is gone keeps its contents and its hash: it joins the
free list of cached blocks, in least-recently-used order, and can still be
found by a later prompt. New blocks come from never-hashed free blocks first,
then from the least recently used cached block, whose hash is then forgotten.

KV groups. When contexts can outgrow a model's sliding window, the sliding
layers keep their own pool (localllm/core/kv_sizing.py says when): one `Pool` per
group, and every sequence one block table per group (`seq.block_tables`), each
indexed by position // block_size. In a group with a window, the blocks wholly
before the window of the next token to compute are given back (`slide`) and
their table entries become RELEASED; they form a prefix of the table. A given
back block keeps its hash, so it stays findable until it is evicted.

Prefix hits across groups: a hit of k blocks means the sequence goes on from
position k * block_size. A group without a window must hold blocks 0..k-1; a
sliding group only the ones its window still reaches from there. The hit is
the longest k that every group can serve, so a prompt never starts from a
state that a cold run would not have (when a sliding group has already given
back the blocks a longer hit would need, the hit is shorter).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Sequence as Listing
from dataclasses import dataclass, field

import numpy as np

from .sequence import Sequence

RELEASED = -1  # a table entry whose block left the sliding window and went back to the pool


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...] | list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class Pool:
    """One KV group's blocks: reference counts, the two free lists and the index of cached contents."""

    def __init__(self, num_blocks: int, window: int | None = None) -> None:
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_fresh: deque[int] = deque(range(num_blocks))  # no hash: nothing worth keeping
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # hashed, unused; oldest first
        self.by_hash: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_fresh) + len(self.free_cached)

    def first_needed(self, position: int, block_size: int) -> int:
        """Index of the first block that queries at `position` and after can still read."""
        if self.window is None:
            return 0
        return max(0, position - self.window + 1) // block_size

    def find(self, h: bytes, token_ids: list[int]) -> int | None:
        block_id = self.by_hash.get(h)
        if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def take(self) -> int:
        if self.free_fresh:
            block_id = self.free_fresh.popleft()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently used
            block = self.blocks[block_id]
            if self.by_hash.get(block.hash) == block_id:
                del self.by_hash[block.hash]
        block = self.blocks[block_id]
        block.ref_count, block.hash, block.token_ids = 1, None, ()
        return block_id

    def hold(self, block_id: int) -> None:
        """One more user of a cached block (taken off the free list if it was there)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_cached[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None and self.by_hash.get(block.hash) == block_id:
                self.free_cached[block_id] = None
            else:
                block.hash, block.token_ids = None, ()
                self.free_fresh.append(block_id)

    def register(self, block_id: int, h: bytes, token_ids: list[int]) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            return  # registered already (by this sequence or by whoever computed it)
        if h in self.by_hash:
            return  # the same content is cached in another block; that one stays the cached copy
        block.hash, block.token_ids = h, tuple(token_ids)
        self.by_hash[h] = block_id


class BlockManager:
    """Blocks of every KV group for every sequence.

    `num_blocks` is one count (one group, no window: every layer keeps every
    token) or one count per group, with `windows` giving each group's window.
    """

    def __init__(
        self,
        num_blocks: int | Listing[int],
        block_size: int,
        *,
        prefix_caching: bool = True,
        windows: Listing[int | None] | None = None,
    ) -> None:
        counts = [num_blocks] if isinstance(num_blocks, int) else list(num_blocks)
        windows = list(windows) if windows is not None else [None] * len(counts)
        if len(windows) != len(counts):
            raise ValueError("one window (or None) per group")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.pools = [Pool(n, w) for n, w in zip(counts, windows)]
        self.prompt_tokens_seen = 0  # for the prefix-cache hit rate
        self.prompt_tokens_hit = 0

    # -- questions ---------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return sum(p.num_blocks for p in self.pools)

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.pools)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def used_per_group(self) -> list[int]:
        return [p.num_blocks - p.num_free for p in self.pools]

    # The first group's pool, for callers that know a single pool.
    @property
    def blocks(self) -> list[Block]:
        return self.pools[0].blocks

    @property
    def free_fresh(self) -> deque[int]:
        return self.pools[0].free_fresh

    @property
    def free_cached(self) -> OrderedDict[int, None]:
        return self.pools[0].free_cached

    @property
    def by_hash(self) -> dict[bytes, int]:
        return self.pools[0].by_hash

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def hit_rate(self) -> float:
        return self.prompt_tokens_hit / self.prompt_tokens_seen if self.prompt_tokens_seen else 0.0

    # -- admission -----------------------------------------------------------------
    def _hashes(self, seq: Sequence, n_blocks: int) -> list[bytes]:
        """Chained content hashes of the sequence's first `n_blocks` full blocks (memoised on it)."""
        bs = self.block_size
        while len(seq.block_hashes) < n_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return seq.block_hashes[:n_blocks]

    def _prefix_hit(self, seq: Sequence) -> int:
        """How many leading blocks of the sequence every group can serve from its cache.

        The last token is never taken from the cache: it must run to give the
        logits of the next sample.
        """
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        hashes = self._hashes(seq, (seq.num_tokens - 1) // bs)
        runs_per_pool = []  # runs[i]: cached blocks in a row ending at block i
        for pool in self.pools:
            runs, run = [], 0
            for i, h in enumerate(hashes):
                run = run + 1 if pool.find(h, seq.token_ids[i * bs : (i + 1) * bs]) is not None else 0
                runs.append(run)
            runs_per_pool.append(runs)
        best = len(hashes)
        while True:  # shorten until every group serves it (a sliding group's answer is not monotone)
            k = best
            for pool, runs in zip(self.pools, runs_per_pool):
                while k > 0 and runs[k - 1] < k - pool.first_needed(k * bs, bs):
                    k -= 1
            if k == best:
                return k
            best = k

    def watermark(self, share: float, n_running: int) -> list[int]:
        """Blocks per pool an admission leaves free: `share` of the pool and one per running
        sequence; none when nothing runs (a prompt that fits an idle pool must run)."""
        if not n_running or share <= 0:
            return [0] * len(self.pools)
        return [max(math.ceil(share * pool.num_blocks), n_running) for pool in self.pools]

    def allocate(self, seq: Sequence, max_new_tokens: int | None = None, *, keep_free: Listing[int] | None = None) -> bool:
        """Give a waiting sequence blocks, reusing cached ones. False if a pool is short.

        Groups without a window get blocks for all its tokens, so a prompt never
        runs short halfway; sliding groups only for the first `max_new_tokens`
        to compute (the first prompt chunk; None: all), and grow chunk by chunk.
        `keep_free`: blocks per pool that must stay free after it (the scheduler's watermark).
        """
        assert not any(seq.block_tables), "the sequence holds blocks already"
        seq.block_tables = [[] for _ in self.pools]
        seq.committed_blocks = [0] * len(self.pools)
        bs = self.block_size
        k = self._prefix_hit(seq)
        computed = k * bs
        end = seq.num_tokens if max_new_tokens is None else min(seq.num_tokens, computed + max_new_tokens)
        hashes = self._hashes(seq, k)
        plans = []
        for g, pool in enumerate(self.pools):
            first = pool.first_needed(computed, bs)
            cached = [pool.find(hashes[i], seq.token_ids[i * bs : (i + 1) * bs]) for i in range(first, k)]
            new = self.blocks_for(seq.num_tokens if pool.window is None else end) - k
            revived = sum(1 for b in cached if pool.blocks[b].ref_count == 0)  # taken from the free list
            if new + revived + (keep_free[g] if keep_free else 0) > pool.num_free:
                return False
            plans.append((first, cached, new))
        for pool, table, (first, cached, new) in zip(self.pools, seq.block_tables, plans):
            table.extend([RELEASED] * first)
            for block_id in cached:
                pool.hold(block_id)
                table.append(block_id)
            table.extend(pool.take() for _ in range(new))
        seq.num_computed = computed
        seq.committed_blocks = [k] * len(self.pools)
        if seq.num_cached_prompt < 0:  # first admission: this is what the user's prompt found
            seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt_tokens)
            self.prompt_tokens_seen += seq.num_prompt_tokens
            self.prompt_tokens_hit += seq.num_cached_prompt
        return True

    def can_grow(self, seq: Sequence, n_tokens: int) -> bool:
        need = self.blocks_for(n_tokens)
        return all(need - len(table) <= pool.num_free for pool, table in zip(self.pools, seq.block_tables))

    def grow(self, seq: Sequence, n_tokens: int) -> None:
        """Make room for `n_tokens` tokens in total (call can_grow first)."""
        need = self.blocks_for(n_tokens)
        for pool, table in zip(self.pools, seq.block_tables):
            while len(table) < need:
                table.append(pool.take())

    def shrink(self, seq: Sequence, n_tokens: int) -> None:
        """Give back the trailing blocks that `n_tokens` tokens do not reach.

        Speculative decoding grows a sequence for its guesses; blocks that held
        only rejected guesses were never hashed or shared, so they go straight
        back to the fresh list.
        """
        keep = self.blocks_for(n_tokens)
        for pool, table in zip(self.pools, seq.block_tables):
            while len(table) > keep:
                block = pool.blocks[table.pop()]
                assert block.ref_count == 1 and block.hash is None, "a shrunk block must hold only unverified tokens"
                block.ref_count, block.token_ids = 0, ()
                pool.free_fresh.append(block.block_id)

    def slide(self, seq: Sequence) -> int:
        """Give back the blocks that the next tokens' windows no longer reach. Returns how many.

        Call it between steps, once `seq.num_computed` is final for the step
        (after speculative guesses were settled): positions from
        num_computed - window + 1 on must stay.
        """
        released = 0
        for pool, table in zip(self.pools, seq.block_tables):
            i = min(pool.first_needed(seq.num_computed, self.block_size), len(table)) - 1
            while i >= 0 and table[i] != RELEASED:  # released entries form a prefix of the table
                pool.release(table[i])
                table[i] = RELEASED
                released += 1
                i -= 1
        return released

    # -- release and caching ---------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; its last blocks are freed first, so they are evicted first."""
        for pool, table in zip(self.pools, seq.block_tables):
            for block_id in reversed(table):
                if block_id != RELEASED:
                    pool.release(block_id)
            table.clear()
        seq.num_computed = 0
        seq.committed_blocks = [0] * len(seq.block_tables)

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full now, so later prompts can find them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        n_full = seq.num_computed // bs
        hashes = self._hashes(seq, n_full)
        for g, (pool, table) in enumerate(zip(self.pools, seq.block_tables)):
            for i in range(seq.committed_blocks[g], n_full):
                if table[i] != RELEASED:
                    pool.register(table[i], hashes[i], seq.token_ids[i * bs : (i + 1) * bs])
            seq.committed_blocks[g] = n_full
