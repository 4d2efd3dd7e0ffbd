"""Choosing every sequence's next token from its logits, for the whole batch at once.

The chain (penalties, greedy or top-k, top-p, min-p, temperature and a draw)
is sampling_chain.py; its random numbers are sampling_rng.py, keyed by the
request's seed and the token's position, so a request's tokens do not depend
on what else is in the batch. The Sampler returns tensors on the logits'
device; the engine brings a step's tokens and logprobs to the host with one
copy (`SampleOutput.to_host`), the step's only wait for the device.

Log-probabilities are those of the model (log-softmax of the raw logits, before
penalties and temperature), as the llama.cpp backend reports them: one
log-softmax and one top-k over the rows that asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_chain import Row, choose, make_row, to_device
from .sequence import Sequence


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


@dataclass
class Logprobs:
    """The model's log-probabilities for the rows that asked, still on the device."""

    rows: list[int]  # which rows of the batch asked (host-known)
    counts: list[int]  # how many alternatives each of them asked for
    chosen: torch.Tensor  # (len(rows),) float32: the log-probability of the row's token
    top_values: torch.Tensor  # (len(rows), max(counts)) float32, best first
    top_ids: torch.Tensor  # (len(rows), max(counts)) int64


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, rows: list[Row]) -> Logprobs | None:
    """Log-softmax of the raw logits of the rows that asked, at their tokens, and their top alternatives."""
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not asked:
        return None
    counts = [rows[i].params.logprobs for i in asked]
    index = to_device(asked, torch.int64, logits.device) if len(asked) < len(rows) else None
    picked = logits if index is None else logits.index_select(0, index)
    logp = torch.log_softmax(picked.float(), dim=-1)
    chosen = logp.gather(1, (tokens if index is None else tokens.index_select(0, index)).unsqueeze(1)).squeeze(1)
    top = torch.topk(logp, max(counts), dim=-1)
    return Logprobs(asked, counts, chosen, top.values, top.indices)


@dataclass
class SampleOutput:
    """A step's choices, on the logits' device until `to_host`."""

    tokens: torch.Tensor  # (R,) int64
    logprobs: Logprobs | None

    def to_host(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Tokens and logprobs as Python values, in one device-to-host copy.

        Everything travels as float64 (token ids are far below 2^53, float32
        log-probabilities widen exactly).
        """
        lp = self.logprobs
        parts = [self.tokens.double()]
        if lp is not None:
            parts += [lp.chosen.double(), lp.top_values.double().flatten(), lp.top_ids.double().flatten()]
        host = torch.cat(parts).tolist()  # the one wait for the device
        n = len(self.tokens)
        tokens = [int(t) for t in host[:n]]
        out: list[TokenLogprobs | None] = [None] * n
        if lp is not None:
            width = lp.top_values.shape[1]
            chosen = host[n : n + len(lp.rows)]
            values = host[n + len(lp.rows) : n + len(lp.rows) * (1 + width)]
            ids = host[n + len(lp.rows) * (1 + width) :]
            for j, (row, count) in enumerate(zip(lp.rows, lp.counts)):
                top = [(int(ids[j * width + a]), values[j * width + a]) for a in range(count)]
                out[row] = TokenLogprobs(tokens[row], chosen[j], top)
        return tokens, out


def sample(logits: torch.Tensor, rows: list[Row]) -> SampleOutput:
    """logits: (len(rows), vocab) -> each row's token and, where asked, logprobs; nothing leaves the device."""
    tokens = choose(logits, rows)
    return SampleOutput(tokens, logprobs_of(logits, tokens, rows))


def row_of(seq: Sequence) -> Row:
    """The row for a sequence's next token."""
    return make_row(seq.params, seq.seed, seq.completion_ids)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        """logits: (len(seqs), vocab) -> one token per sequence, and logprobs where asked (tensors; see to_host)."""
        return self.sample_rows(logits, [row_of(seq) for seq in seqs])

    def sample_rows(self, logits: torch.Tensor, rows: list[Row]) -> SampleOutput:
        """Rows described directly (speculative checks draw at several positions of one sequence)."""
        return sample(logits, rows)
