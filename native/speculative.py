"""Speculative decoding: guess a few tokens cheaply, let the model check them all in one pass.

Decoding one token reads every weight of the model; on a CPU (and for small
batches on a GPU) much of the time goes into reading weights rather than
arithmetic, so running k + 1 tokens of a sequence in one pass costs much less
than k + 1 passes. A *proposer* guesses the next k tokens (d1..dk); the step
runs the sequence's last token and the k guesses and gives logits at all k + 1
positions. Position i holds the model's view of the token after d(i), so the
guesses are checked left to right and the first disagreement ends the run;
the model's own token there (or after the last guess, a bonus token) is kept
too. Two ways to check:

- Certain guesses (prompt lookup's; and any guess for a greedy request): at
  each position the model draws its token exactly as plain decoding would
  (sampler.draw: penalties over the tokens before it, top-k, top-p, min-p,
  temperature, one draw from the request's generator) and the guess is kept
  if it is that token. The output is plain decoding's, token for token, for
  greedy and for seeded sampled requests alike (up to rounding: the checking
  pass adds up the same logits in another order). For sampling this is
  rejection sampling with a one-hot draft: d is kept with probability p(d),
  and a rejection leaves a draw from p without d.
- A draft model's guesses for a sampled request: rejection sampling (Leviathan
  et al. 2023; Chen et al. 2023). With p the target's distribution after
  every filter the sampler applies and q the draft's (drawn with the same
  filters), d is kept with probability min(1, p(d) / q(d)); a rejected guess
  is replaced by a draw from max(0, p - q), renormalised. Every token is
  distributed as plain sampling's, though not the same draw for a seed.

Rejected guesses roll back: the sequence's tokens and cache count shrink to
what was verified (their K/V slots are overwritten by the next step's tokens),
and blocks that held only rejected guesses go back to the pool. Prefix caching
hashes a block only once every token in it is verified, so no cached block
ever holds a guess. Guesses use the step's spare token budget and free blocks
only: they never preempt anyone, and where they do not fit they are skipped.

A guess costs a row in the step; guesses the model rejects only slow a
request down. Each request keeps an acceptance average (an exponential moving
average of kept / guessed over its verification steps); once it has had
`native.min_steps` of them and the average is below `native.min_acceptance`,
speculation is off for the rest of that request. High-temperature chat is the usual case:
the model rarely repeats earlier text word for word.

Proposers (`Proposer`): prompt lookup (engine_kit/ngram.py) and a small draft
model that shares the target's tokenizer (draft.py). The engine picks one
(engine.make_speculator); this module knows neither engines nor drafts, so
engine -> speculative <- draft has no circle. The settings are the shared
`SpeculationOptions` (localllm/core/speculation.py), its `native` part here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from localllm.core.requests import SamplingParams
from localllm.core.speculation import SpeculationOptions

from localllm.engine_kit.ngram import lookup
from .sampler import (
    Sampler,
    TokenLogprobs,
    _has_penalties,
    _logprobs,
    apply_penalties,
    draw,
    filter_candidates,
    request_generator,
)
from .scheduler import Scheduled
from .sequence import Sequence

@dataclass
class Draft:
    """A proposer's guesses for one sequence, and the distributions they were drawn from."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # (len(tokens), vocab) q per guess; None: certain guesses (one-hot q)


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Up to ks[i] guesses for seqs[i] (fewer, or none, is fine)."""
        ...

    def release(self, seq: Sequence) -> None:
        """The sequence is gone: drop what was kept for it."""
        ...

    def close(self) -> None: ...


class NgramProposer:
    """Prompt lookup over each request's own tokens (see ngram.py)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft(lookup(seq.token_ids, k, self.min_n, self.max_n)) for seq, k in zip(seqs, ks)]

    def release(self, seq: Sequence) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class SpecState:
    """One request's speculation record (kept on its Sequence as `seq.spec`)."""

    enabled: bool = True
    steps: int = 0  # verification steps
    proposed: int = 0  # guesses verified
    accepted: int = 0  # guesses kept
    average: float = 1.0  # moving average of accepted / proposed per step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class SpecCounters:
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    requests_turned_off: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Speculator:
    """Adds guesses to a scheduled step, then turns the step's logits into verified tokens."""

    def __init__(self, options: SpeculationOptions, proposer: Proposer, blocks) -> None:
        self.options = options
        self.num_tokens = options.native_num_tokens
        self.proposer = proposer
        self.blocks = blocks
        self.counters = SpecCounters()
        self._pending: dict[int, Draft] = {}  # id(seq) -> this step's guesses

    # -- before the forward pass ------------------------------------------------------
    def propose(self, step: list[Scheduled], spare_tokens: int) -> None:
        """Give decoding sequences guesses to verify, within the step's spare token budget.

        Guesses go at the end of the sequence's tokens and into `n_tokens` /
        `n_draft` of its Scheduled item, so the runner computes them like any
        other tokens. Each request asks for k guesses whatever else runs (so
        what it generates does not depend on the batch); one that does not
        fit the budget or the free blocks gets none this step.
        """
        self._pending.clear()
        chosen: list[tuple[Scheduled, int]] = []
        for item in step:
            seq = item.seq
            k = min(self.num_tokens, seq.max_tokens - seq.num_completion - 1)
            if k > 0 and k <= spare_tokens and self._wants_guesses(item):
                chosen.append((item, k))
                spare_tokens -= k
        if not chosen:
            return
        drafts = self.proposer.propose([item.seq for item, _ in chosen], [k for _, k in chosen])
        for (item, k), draft in zip(chosen, drafts):
            n = min(len(draft.tokens), k)
            seq = item.seq
            if n == 0 or not self.blocks.can_grow(seq, seq.num_tokens + n):
                continue
            if n < len(draft.tokens):
                draft = Draft(draft.tokens[:n], None if draft.probs is None else draft.probs[:n])
            self.blocks.grow(seq, seq.num_tokens + n)
            seq.token_ids.extend(draft.tokens)
            item.n_tokens += n
            item.n_draft = n
            self._pending[id(seq)] = draft

    def _wants_guesses(self, item: Scheduled) -> bool:
        seq = item.seq
        if not (item.samples and item.n_tokens == 1 and seq.num_completion > 0):
            return False  # only sequences that are decoding
        if seq.spec is None:
            seq.spec = SpecState()
        return seq.spec.enabled

    # -- after the forward pass -------------------------------------------------------
    def verify(self, logits: torch.Tensor, samplers: list[Scheduled], sampler: Sampler):
        """Logits of every sampling item (1 + n_draft rows each, in order) -> (tokens, logprobs) per item.

        Items without guesses are sampled as in plain decoding. For the others,
        the tokens are the kept guesses plus one more (laid out by verify_rows).
        """
        results: list[tuple[list[int], list[TokenLogprobs | None]] | None] = [None] * len(samplers)
        plain: list[int] = []
        plain_rows: list[int] = []
        offset = 0
        for i, item in enumerate(samplers):
            n = 1 + item.n_draft
            if item.n_draft:
                results[i] = self._verify_one(logits[offset : offset + n], item)
            else:
                plain.append(i)
                plain_rows.append(offset)
            offset += n
        if plain:
            tokens, logprobs = sampler(logits[plain_rows], [samplers[i].seq for i in plain])
            for i, token, lp in zip(plain, tokens, logprobs):
                results[i] = ([token], [lp])
        self._pending.clear()
        return results

    def _verify_one(self, rows: torch.Tensor, item: Scheduled) -> tuple[list[int], list[TokenLogprobs | None]]:
        seq = item.seq
        draft = self._pending[id(seq)]
        history = seq.token_ids[seq.num_prompt_tokens : seq.num_tokens - item.n_draft]  # generated and verified
        if draft.probs is None or seq.params.temperature == 0:
            tokens = _check_certain(rows, seq, draft.tokens, history)
        else:
            tokens = _check_sampled(rows, seq, draft, history)
        n = seq.params.logprobs
        logprobs = [_logprobs(rows[i], t, n) if n is not None else None for i, t in enumerate(tokens)]
        self._record(seq, proposed=len(draft.tokens), accepted=len(tokens) - 1)
        return tokens, logprobs

    def _record(self, seq: Sequence, *, proposed: int, accepted: int) -> None:
        s, o = seq.spec, self.options.native
        s.steps += 1
        s.proposed += proposed
        s.accepted += accepted
        s.average += o.ema_weight * (accepted / proposed - s.average)
        c = self.counters
        c.steps += 1
        c.proposed += proposed
        c.accepted += accepted
        if s.steps >= o.min_steps and s.average < o.min_acceptance:
            s.enabled = False
            c.requests_turned_off += 1

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def stats(self) -> dict:
        c = self.counters
        return {
            "spec_draft_tokens": c.proposed,
            "spec_accepted_tokens": c.accepted,
            "spec_acceptance_rate": c.acceptance_rate,
            "spec_requests_turned_off": c.requests_turned_off,
        }

    def close(self) -> None:
        self.proposer.close()


def verify_rows(step: list[Scheduled]) -> list[int]:
    """Rows of the flat batch whose logits a speculative step needs: each sampler's last 1 + n_draft."""
    rows: list[int] = []
    end = 0
    for item in step:
        end += item.n_tokens
        if item.samples:
            rows.extend(range(end - 1 - item.n_draft, end))
    return rows


def distribution(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """The sampler's distribution over the whole vocabulary: penalties, top-k, top-p, min-p, temperature."""
    if _has_penalties(params):
        logits = apply_penalties(logits, history, params)
    values, ids = filter_candidates(logits, params)
    probs = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
    probs[ids] = torch.softmax(values.float() / params.temperature, dim=-1)
    return probs


def greedy_token(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> int:
    if _has_penalties(params):
        logits = apply_penalties(logits, history, params)
    return int(logits.argmax())


def _check_certain(rows: torch.Tensor, seq: Sequence, guesses: list[int], history: list[int]) -> list[int]:
    """Keep guesses while each is the token plain decoding draws there; then that token."""
    if seq.params.temperature == 0 and not _has_penalties(seq.params):
        choices = rows.argmax(dim=-1).tolist()  # one call for every position
        tokens = []
        for i, guess in enumerate(guesses):
            tokens.append(choices[i])
            if choices[i] != guess:
                return tokens
        return tokens + [choices[len(guesses)]]
    tokens = []
    for i in range(len(guesses) + 1):
        token = draw(rows[i], seq, history + guesses[:i])  # penalties see the kept guesses before it
        tokens.append(token)
        if i == len(guesses) or token != guesses[i]:
            return tokens
    return tokens


def _check_sampled(rows: torch.Tensor, seq: Sequence, draft: Draft, history: list[int]) -> list[int]:
    """Rejection sampling against the draft's distributions: each token is distributed as the target's."""
    gen = request_generator(seq, rows.device)
    params, guesses, q = seq.params, draft.tokens, draft.probs
    tokens: list[int] = []
    for i, guess in enumerate(guesses):
        p = distribution(rows[i], params, history + guesses[:i])
        q_i = q[i].to(p.device)
        u = float(torch.rand(1, generator=gen, device=rows.device))
        if u * float(q_i[guess]) < float(p[guess]):  # kept with probability min(1, p / q)
            tokens.append(guess)
            continue
        residual = torch.clamp(p - q_i, min=0.0)
        if float(residual.sum()) <= 0.0:  # only by rounding, where p and q agree
            residual = p
        tokens.append(int(torch.multinomial(residual, 1, generator=gen)))
        return tokens
    p = distribution(rows[len(guesses)], params, history + guesses)
    tokens.append(int(torch.multinomial(p, 1, generator=gen)))  # every guess kept: a bonus token
    return tokens
