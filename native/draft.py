"""A draft model as a proposer: a small model with the target's tokenizer guesses k tokens.

The draft is a second engine (its own weights, runner and paged KV pool; the
target builds it, engine.make_speculator, so this module imports no engine;
on a GPU before the target's pool is sized, so that one budget covers both
pools: model_runner.share_gpu),
driven directly here rather than through its scheduler: for every target
sequence that speculates it keeps a mirror sequence with the same tokens.
Before guessing, the mirror catches up with what the target verified since
last time (tokens it had guessed and the target rejected are cut off, and
the cache count with them), then runs k - 1 one-token steps, all mirrors in
one batch per step, drawing each guess as the target's sampler would
(greedy, or from the same filtered distribution, with the request's seed on
a stream of its own, so the draft's draws are independent of the target's).

The draft must share the target's vocabulary: a token id has to mean the same
text to both. Checked at load (vocabulary size, special tokens, and a sample
of token texts); refused with a message otherwise. Embedding tables padded to
different sizes are allowed when the tokenizers agree.
"""

from __future__ import annotations

import torch

from localllm.core.errors import BadRequest

from .sampling_rng import Stream
from .scheduler import Scheduled
from .sequence import Sequence
from .speculative import Draft, distribution, draw_from, greedy_token


class DraftModelProposer:
    """Guesses from `engine`, a draft LLMEngine the target built beside itself (engine.make_speculator)."""

    def __init__(self, engine, target) -> None:
        self.engine = engine
        self.vocab_size = target.config.vocab_size
        _check_vocabulary(target, self.engine)
        self.mirrors: dict[str, Sequence] = {}
        self._synced: dict[str, int] = {}  # request id -> target tokens the mirror is known to agree with

    # -- the Proposer interface ----------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in seqs]
        active: list[tuple[int, Sequence, int]] = []  # (index, mirror, k)
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            mirror = self._sync(seq)
            blocks = self.engine.blocks
            if mirror is not None:
                blocks.slide(mirror)  # sliding-window layers give back what their window has left
            if mirror is not None and blocks.can_grow(mirror, mirror.num_tokens + k - 1):
                blocks.grow(mirror, mirror.num_tokens + k - 1)
                self._catch_up(mirror)
                active.append((i, mirror, k))
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in active}
        while active:
            step = [Scheduled(mirror, mirror.num_remaining) for _, mirror, _ in active]
            logits = self.engine.runner.run(step)
            still = []
            for (i, mirror, k), item, row in zip(active, step, logits):
                mirror.num_computed += item.n_tokens
                token, q = self._draw(self._target_vocab(row), mirror)
                mirror.token_ids.append(token)
                drafts[i].tokens.append(token)
                if q is not None:
                    probs[i].append(q)
                if len(drafts[i].tokens) < k:
                    still.append((i, mirror, k))
            active = still
        for i, rows in probs.items():
            if rows:
                drafts[i].probs = torch.stack(rows)
        return drafts

    def release(self, seq: Sequence) -> None:
        mirror = self.mirrors.pop(seq.request_id, None)
        self._synced.pop(seq.request_id, None)
        if mirror is not None:
            self.engine.blocks.free(mirror)

    def close(self) -> None:
        for mirror in self.mirrors.values():
            self.engine.blocks.free(mirror)
        self.mirrors.clear()
        self.engine.close()

    # -- mirrors -------------------------------------------------------------------------------
    def _sync(self, seq: Sequence) -> Sequence | None:
        """The mirror of `seq`, holding exactly its tokens (guesses the target rejected cut off)."""
        rid = seq.request_id
        mirror = self.mirrors.get(rid)
        if mirror is None:
            mirror = Sequence(rid, seq.token_ids[: seq.num_prompt_tokens], seq.params, max_tokens=seq.max_tokens)
            mirror.token_ids.extend(seq.token_ids[seq.num_prompt_tokens :])
            if not self.engine.blocks.allocate(mirror):
                return None  # the draft's pool is full: no guesses for this one now
            self.mirrors[rid] = mirror
        else:
            same = self._synced[rid]
            end = min(mirror.num_tokens, seq.num_tokens)
            while same < end and mirror.token_ids[same] == seq.token_ids[same]:
                same += 1
            del mirror.token_ids[same:]
            mirror.token_ids.extend(seq.token_ids[same:])
            mirror.num_computed = min(mirror.num_computed, same)
            self.engine.blocks.shrink(mirror, mirror.num_tokens)
        self._synced[rid] = seq.num_tokens
        return mirror

    def _catch_up(self, mirror: Sequence) -> None:
        """Run a long backlog (a new mirror's whole prompt) in chunks, leaving its last token for the batch."""
        budget = self.engine.scheduler.max_num_batched_tokens
        while mirror.num_remaining > budget:
            n = min(budget, mirror.num_remaining - 1)
            self.engine.runner.run([Scheduled(mirror, n)], logit_rows=[])
            mirror.num_computed += n

    def _draw(self, logits: torch.Tensor, mirror: Sequence) -> tuple[int, torch.Tensor | None]:
        """A guess as the target's sampler would draw it, and the distribution it came from (None if greedy)."""
        params = mirror.params
        history = mirror.completion_ids
        if params.temperature == 0:
            return greedy_token(logits, params, history), None
        q = distribution(logits, params, history)
        return draw_from(q, mirror.seed, len(history), Stream.DRAFT), q  # its own stream: independent of the target's draws

    def _target_vocab(self, row: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the target's ids: padding rows beyond either table never win."""
        if row.shape[-1] == self.vocab_size:
            return row
        if row.shape[-1] > self.vocab_size:
            return row[: self.vocab_size]
        pad = torch.full((self.vocab_size - row.shape[-1],), float("-inf"), dtype=row.dtype, device=row.device)
        return torch.cat([row, pad])


def _check_vocabulary(target, draft) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    a, b = target.tokenizer, draft.tokenizer
    if a is None or b is None:  # engines without tokenizers (tests): the tables must agree
        same = target.config.vocab_size == draft.config.vocab_size
        detail = f"{draft.config.vocab_size} tokens, the target has {target.config.vocab_size}"
    else:
        ids = sorted(set(range(min(a.vocab_size, 1000))) | set(range(0, min(a.vocab_size, b.vocab_size), 257)))
        same = (
            a.vocab_size == b.vocab_size
            and a.bos_id == b.bos_id
            and a.eog_ids == b.eog_ids
            and all(a.piece(i) == b.piece(i) for i in ids)
        )
        detail = f"{b.vocab_size} tokens, the target has {a.vocab_size}" if a.vocab_size != b.vocab_size else "token texts differ"
    if not same:
        draft.close()
        raise BadRequest(f"the draft model does not share the target's vocabulary ({detail}); pick a draft from the same family")

