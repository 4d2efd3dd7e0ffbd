"""One request as the engine tracks it: its tokens, how many are in the cache, its blocks."""

from __future__ import annotations

import itertools
import secrets
from enum import Enum

from localllm.core.requests import SamplingParams

_arrivals = itertools.count()


class Status(Enum):
    WAITING = "waiting"  # no blocks: not yet admitted, or preempted
    RUNNING = "running"  # has blocks; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens. The cache holds the first `num_computed` of them.

    Every running sequence has at least one token not yet in the cache: the
    rest of its prompt while prefilling, or the token it sampled last while
    decoding. A step runs some of those; when it reaches the end, the
    sequence samples its next token.
    """

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, max_tokens: int) -> None:
        self.request_id = request_id
        self.arrival = next(_arrivals)
        self.token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.params = params
        self.max_tokens = max_tokens  # completion tokens allowed (max_tokens and the context both bound it)
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose K/V are in the cache
        # One block table per KV group (block_manager.py; a second one when sliding layers have their
        # own pool), indexed by position // block_size; -1 where a block has left the sliding window.
        self.block_tables: list[list[int]] = [[]]
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks, filled by the block manager
        self.committed_blocks: list[int] = [0]  # per group: leading blocks registered for prefix caching
        self.num_cached_prompt = -1  # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        # The key of the request's random numbers (sampling_rng.py): its own seed, or a random one for the request.
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.spec = None  # speculative decoding's record of this request (speculative.SpecState), made on first use

    @property
    def block_table(self) -> list[int]:
        """The first KV group's table: the only one unless sliding layers keep their own pool."""
        return self.block_tables[0]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def __repr__(self) -> str:
        return f"Sequence({self.request_id!r}, {self.status.value}, {self.num_computed}/{self.num_tokens})"
