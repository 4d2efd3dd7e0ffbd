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
  (the sampler's chain: penalties over the tokens before it, top-k, top-p,
  min-p, temperature, and a draw keyed by the request's seed and the token's
  position, sampling_rng.py) and the guess is kept
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
  distributed as plain sampling's, though not the same draw for a seed
  (the bonus token after all guesses are kept is plain decoding's draw).

Every position of every sequence in the step is checked in one batched
sampler call, and the host reads the results once (once more when a draft
model's sampled guesses need their acceptance tests).

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
from .sampler import Sampler, TokenLogprobs
from .sampling_chain import (
    Row,
    Settings,
    apply_penalties,
    candidate_probs,
    candidates,
    dense_probs,
    make_row,
    to_device,
)
from .sampling_rng import Stream, gumbels, row_key, uniforms
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

        Each row is drawn as plain decoding would draw there, had the guesses
        before it been kept (items without guesses are plain decoding). The
        tokens are the kept guesses plus one more (laid out by verify_rows).
        """
        rows: list[Row] = []
        starts: list[int] = []
        for item in samplers:
            seq = item.seq
            history = seq.token_ids[seq.num_prompt_tokens : seq.num_tokens - item.n_draft]  # generated and verified
            guesses = self._pending[id(seq)].tokens if item.n_draft else []
            starts.append(len(rows))
            rows += [make_row(seq.params, seq.seed, history + guesses[:i]) for i in range(len(guesses) + 1)]
        tokens, logprobs = sampler.sample_rows(logits, rows).to_host()
        sampled = [(item, start) for item, start in zip(samplers, starts) if self._is_sampled_check(item)]
        checks = _rejection_checks(logits, rows, sampled, self._pending) if sampled else {}
        results = []
        for item, start in zip(samplers, starts):
            n = item.n_draft
            if not n:
                results.append(([tokens[start]], [logprobs[start]]))
                continue
            seq, draft = item.seq, self._pending[id(item.seq)]
            if id(seq) in checks:
                kept = _resolve_sampled(draft.tokens, checks[id(seq)], tokens[start + n], logprobs[start : start + n + 1])
            else:
                kept = _resolve_certain(draft.tokens, tokens[start : start + n + 1], logprobs[start : start + n + 1])
            self._record(seq, proposed=len(draft.tokens), accepted=len(kept[0]) - 1)
            results.append(kept)
        self._pending.clear()
        return results

    def _is_sampled_check(self, item: Scheduled) -> bool:
        """A draft model's guesses for a sampled request: rejection sampling, not equality."""
        return bool(item.n_draft) and self._pending[id(item.seq)].probs is not None and item.seq.params.temperature > 0

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
    rows = [make_row(params, 0, history)]
    s = Settings.of(rows, logits.shape[-1], logits.device)
    return dense_probs(candidates(logits.unsqueeze(0), rows, s), s, logits.shape[-1])[0]


def greedy_token(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> int:
    return int(apply_penalties(logits.unsqueeze(0), [make_row(params, 0, history)]).argmax())


def draw_from(probs: torch.Tensor, seed: int, position: int, stream: Stream) -> int:
    """One token from a dense distribution (V,), keyed like the sampler's draws (a draft model's guesses)."""
    ids = torch.nonzero(probs).flatten().unsqueeze(0)
    noise = gumbels(torch.tensor([row_key(seed, position, stream)], device=ids.device), ids)
    return int(ids[0, (probs[ids[0]].double().log() + noise[0]).argmax()])


def _resolve_certain(guesses: list[int], draws: list[int], logprobs: list) -> tuple[list[int], list]:
    """Keep guesses while each is the token plain decoding draws there; then that token."""
    for i, guess in enumerate(guesses):
        if draws[i] != guess:
            return draws[: i + 1], logprobs[: i + 1]
    return draws, logprobs


@dataclass
class _Checked:
    """A sampled item's rejection tests, on the host: per guess, kept?, the replacement, and logprobs."""

    kept: list[bool]
    replacements: list[int]
    guess_logprobs: list[float] | None
    replacement_logprobs: list[float] | None


def _rejection_checks(logits: torch.Tensor, rows: list[Row], sampled: list[tuple[Scheduled, int]], pending: dict) -> dict[int, _Checked]:
    """Rejection sampling against the draft's distributions, all guesses of all items at once.

    With p the target's filtered distribution at a guess and q the draft's, the
    guess is kept when u * q(d) < p(d) (probability min(1, p / q)); the
    replacement is a draw from max(0, p - q), renormalised (p itself where
    rounding leaves nothing). The host reads the results once.
    """
    index, guesses, qs = [], [], []
    for item, start in sampled:
        draft = pending[id(item.seq)]
        index += range(start, start + item.n_draft)
        guesses += draft.tokens
        qs.append(draft.probs.to(logits.device))
    device = logits.device
    picked = logits.index_select(0, to_device(index, torch.int64, device))
    picked_rows = [rows[i] for i in index]
    s = Settings.of(picked_rows, logits.shape[-1], device)
    c = candidates(picked, picked_rows, s)
    p = candidate_probs(c, s)
    q = torch.cat(qs).float()
    guess = to_device(guesses, torch.int64, device).unsqueeze(1)
    p_guess = (p * (c.ids == guess)).sum(dim=1)
    u = uniforms(s.keys(Stream.ACCEPT), guess).squeeze(1)
    kept = u * q.gather(1, guess).squeeze(1).double() < p_guess.double()
    residual = torch.clamp(p - q.gather(1, c.ids), min=0.0)
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p)
    noise = gumbels(s.keys(Stream.RESIDUAL), c.ids)
    replacement = c.ids.gather(1, (residual.double().log() + noise).argmax(dim=1, keepdim=True))
    parts = [kept.double(), replacement.squeeze(1).double()]
    with_logprobs = any(r.params.logprobs is not None for r in picked_rows)
    if with_logprobs:
        logp = torch.log_softmax(picked.float(), dim=-1)
        parts += [logp.gather(1, guess).squeeze(1).double(), logp.gather(1, replacement).squeeze(1).double()]
    host = torch.cat(parts).tolist()
    n = len(index)
    out: dict[int, _Checked] = {}
    offset = 0
    for item, _ in sampled:
        k = item.n_draft
        part = [host[j * n + offset : j * n + offset + k] for j in range(len(parts))]
        out[id(item.seq)] = _Checked(
            [bool(x) for x in part[0]], [int(x) for x in part[1]], part[2] if with_logprobs else None, part[3] if with_logprobs else None
        )
        offset += k
    return out


def _resolve_sampled(guesses: list[int], checked: _Checked, bonus: int, logprobs: list) -> tuple[list[int], list]:
    """Kept guesses up to the first rejection and its replacement; all kept: plain decoding's bonus draw."""
    tokens: list[int] = []
    lps: list = []
    for i, guess in enumerate(guesses):
        token = guess if checked.kept[i] else checked.replacements[i]
        tokens.append(token)
        if logprobs[i] is not None:
            value = checked.guess_logprobs[i] if checked.kept[i] else checked.replacement_logprobs[i]
            lps.append(TokenLogprobs(token, value, logprobs[i].top))
        else:
            lps.append(None)
        if not checked.kept[i]:
            return tokens, lps
    return tokens + [bonus], lps + [logprobs[len(guesses)]]
