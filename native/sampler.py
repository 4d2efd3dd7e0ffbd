"""Choosing each sequence's next token from its logits.

The order of operations is llama.cpp's sampler chain, so both backends treat
the same SamplingParams alike: penalties (over the last `repeat_last_n`
generated tokens), then greedy if the temperature is 0, else top-k, top-p,
min-p, temperature, and a draw. Each request draws from its own generator,
seeded from its seed, so its tokens do not depend on what else is in the batch.

Log-probabilities are those of the model (log-softmax of the raw logits, before
penalties and temperature), as the llama.cpp backend reports them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from localllm.core.requests import SamplingParams

from .sequence import Sequence


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


def _plain_greedy(p: SamplingParams) -> bool:
    return p.temperature == 0 and not _has_penalties(p)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: (len(seqs), vocab) float32 -> one token per sequence, and logprobs where asked."""
        if all(_plain_greedy(s.params) for s in seqs):
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [self._sample_one(logits[i], seq) for i, seq in enumerate(seqs)]
        logprobs = [
            _logprobs(logits[i], tokens[i], seq.params.logprobs) if seq.params.logprobs is not None else None
            for i, seq in enumerate(seqs)
        ]
        return tokens, logprobs

    def _sample_one(self, logits: torch.Tensor, seq: Sequence) -> int:
        return draw(logits, seq, seq.completion_ids)


def draw(logits: torch.Tensor, seq: Sequence, history: list[int]) -> int:
    """The token that follows `history` (the sequence's generated tokens): penalties, filters, one draw.

    Speculative decoding checks guesses with this same draw, from the same
    generator, so a request's sampled tokens are the ones plain decoding gives.
    """
    p = seq.params
    if _has_penalties(p):
        logits = apply_penalties(logits, history, p)
    if p.temperature == 0:
        return int(logits.argmax())
    values, ids = filter_candidates(logits, p)
    probs = torch.softmax(values / p.temperature, dim=-1)
    pick = torch.multinomial(probs, 1, generator=request_generator(seq, logits.device))
    return int(ids[pick])


def request_generator(seq: Sequence, device: torch.device) -> torch.Generator:
    """The request's own random generator, made on first use from its seed."""
    if seq.generator is None:
        seq.generator = torch.Generator(device=device)
        seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else secrets.randbits(63))
    return seq.generator


def apply_penalties(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """Repetition (divide positive logits, multiply negative ones), presence and frequency penalties."""
    window = history if p.repeat_last_n < 0 else history[len(history) - p.repeat_last_n :]
    if not window:
        return logits
    ids, counts = torch.tensor(window, device=logits.device).unique(return_counts=True)
    logits = logits.clone()
    picked = logits[ids]
    if p.repeat_penalty != 1.0:
        picked = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
    picked = picked - counts.to(picked.dtype) * p.frequency_penalty - p.presence_penalty
    logits[ids] = picked
    return logits


def filter_candidates(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, then min-p: the surviving logits (best first) and their token ids."""
    k = p.top_k if 0 < p.top_k < logits.numel() else logits.numel()
    values, ids = torch.topk(logits, k)  # sorted, best first
    if p.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better candidates
        keep = int((before < p.top_p).sum())  # the smallest prefix whose mass reaches top_p
        values, ids = values[: max(keep, 1)], ids[: max(keep, 1)]
    if p.min_p > 0:
        probs = torch.softmax(values, dim=-1)
        keep = int((probs >= p.min_p * probs[0]).sum())
        values, ids = values[: max(keep, 1)], ids[: max(keep, 1)]
    return values, ids


def _logprobs(logits: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, n) if n else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprobs(token, float(logp[token]), pairs)
