"""The KV block pool: allocation, reference counts and prefix caching.

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
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from .sequence import Sequence


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


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_fresh: deque[int] = deque(range(num_blocks))  # no hash: nothing worth keeping
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # hashed, unused; oldest first
        self.by_hash: dict[bytes, int] = {}
        self.prompt_tokens_seen = 0  # for the prefix-cache hit rate
        self.prompt_tokens_hit = 0

    # -- questions ---------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_fresh) + len(self.free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

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

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks.

        The last token is never taken from the cache: it must run to give the
        logits of the next sample.
        """
        found: list[int] = []
        if not self.prefix_caching:
            return found
        bs = self.block_size
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // bs)):
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached ones. False if the pool is short."""
        assert not seq.block_table
        cached = self._cached_prefix(seq)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # taken from the free list
        needed = self.blocks_for(seq.num_tokens) - len(cached)
        if needed + revived > self.num_free:
            return False
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_cached[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(needed):
            seq.block_table.append(self._take())
        seq.num_computed = len(cached) * self.block_size
        seq.num_committed_blocks = len(cached)
        if seq.num_cached_prompt < 0:  # first admission: this is what the user's prompt found
            seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt_tokens)
            self.prompt_tokens_seen += seq.num_prompt_tokens
            self.prompt_tokens_hit += seq.num_cached_prompt
        return True

    def can_grow(self, seq: Sequence, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, n_tokens: int) -> None:
        """Make room for `n_tokens` tokens in total (call can_grow first)."""
        while len(seq.block_table) < self.blocks_for(n_tokens):
            seq.block_table.append(self._take())

    def _take(self) -> int:
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

    # -- release and caching ---------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; its last blocks are freed first, so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None and self.by_hash.get(block.hash) == block_id:
                    self.free_cached[block_id] = None
                else:
                    block.hash, block.token_ids = None, ()
                    self.free_fresh.append(block_id)
        seq.block_table.clear()
        seq.num_computed = 0
        seq.num_committed_blocks = 0

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full now, so later prompts can find them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        n_full = seq.num_computed // bs
        hashes = self._hashes(seq, n_full)
        for i in range(seq.num_committed_blocks, n_full):
            h, block = hashes[i], self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue  # registered already (by this sequence or by whoever computed it)
            if h in self.by_hash:
                continue  # the same content is cached in another block; that one stays the cached copy
            block.hash, block.token_ids = h, tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.by_hash[h] = block.block_id
        seq.num_committed_blocks = n_full
