"""llama.cpp's sampler chain for a batch of rows at once, in tensor ops on the logits' device.

The order is llama.cpp's, so both backends treat the same SamplingParams
alike: penalties (over the last `repeat_last_n` generated tokens), then greedy
if the temperature is 0, else top-k, top-p, min-p, temperature and a draw.
Every row has its own settings (tensors of per-row values), so requests with
different parameters share one pass.

Shapes depend only on what the host already knows (rows, the largest top-k of
the batch, the longest penalty window), never on tensor values, and nothing
is read back to the host: the chain could be captured in a CUDA graph per
shape. Top-k takes the batch's largest k once (sorted), and each row masks
its own k, top-p and min-p on those columns; a row with top-k off (0) makes
the batch sort the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from localllm.core.requests import SamplingParams

from .sampling_rng import Stream, gumbels


@dataclass
class Row:
    """One token to choose: its request's settings and seed, its place in the completion, what came before."""

    params: SamplingParams
    seed: int  # the request's seed (a random one when it gave none)
    position: int  # index of this token in the completion: the number of generated tokens before it
    window: Sequence[int]  # the generated tokens the penalties look at (the last repeat_last_n before it)


def make_row(params: SamplingParams, seed: int, history: Sequence[int]) -> Row:
    """The row for the token that follows `history` (the generated tokens before it)."""
    n = params.repeat_last_n
    window = history if n < 0 else history[len(history) - n :] if n > 0 else ()
    return Row(params, seed, len(history), window)


def has_penalties(p: SamplingParams) -> bool:
    return p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host-built tensor on `device`, without waiting for the device's queued work."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Settings:
    """Each row's sampling settings as (R,) tensors on the logits' device."""

    temperature: torch.Tensor  # float32; 1 where the row is greedy (it is never divided by 0)
    top_k: torch.Tensor  # int64, 1..vocab (0 and >= vocab mean the whole vocabulary)
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    seed: torch.Tensor  # int64
    position: torch.Tensor  # int64
    max_k: int  # the largest top-k of the rows that draw (host-known: it fixes the shapes)

    @classmethod
    def of(cls, rows: list[Row], vocab: int, device: torch.device) -> Settings:
        ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        floats = to_device(
            [[r.params.temperature if r.params.temperature > 0 else 1.0, r.params.top_p, r.params.min_p] for r in rows],
            torch.float32,
            device,
        )
        ints = to_device([[k, r.seed, r.position] for k, r in zip(ks, rows)], torch.int64, device)
        drawing = [k for k, r in zip(ks, rows) if r.params.temperature > 0]
        temperature, top_p, min_p = floats.unbind(1)
        top_k, seed, position = ints.unbind(1)
        return cls(temperature, top_k, top_p, min_p, seed, position, max_k=max(drawing, default=1))


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Repetition (divide positive logits, multiply negative ones), presence and frequency penalties.

    Returns `logits` itself when no row has any; otherwise a copy with the
    penalised rows changed. Counts come from sorting each window (padding
    sorts last and counts nothing); every occurrence of a token writes the
    same value, so repeated ids in the scatter agree.
    """
    chosen = [i for i, r in enumerate(rows) if has_penalties(r.params) and len(r.window) > 0]
    if not chosen:
        return logits
    vocab, width = logits.shape[-1], max(len(rows[i].window) for i in chosen)
    device = logits.device
    ids = to_device([list(rows[i].window) + [vocab] * (width - len(rows[i].window)) for i in chosen], torch.int64, device)
    knobs = to_device([[rows[i].params.repeat_penalty, rows[i].params.presence_penalty, rows[i].params.frequency_penalty] for i in chosen], torch.float32, device)
    which = to_device(chosen, torch.int64, device)
    repeat, presence, frequency = (k.unsqueeze(1) for k in knobs.unbind(1))

    ordered = ids.sort(dim=1).values
    counts = torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)
    padding = ids == vocab
    ids = torch.where(padding, ids[:, :1], ids)  # padding repeats the row's first token, and its value below
    flat = (which.unsqueeze(1) * vocab + ids).flatten()
    out = logits.clone(memory_format=torch.contiguous_format)
    picked = out.view(-1)[flat].view(ids.shape).float()
    picked = torch.where(picked > 0, picked / repeat, picked * repeat)
    picked = picked - counts.where(~padding, counts[:, :1]).to(picked.dtype) * frequency - presence
    out.view(-1)[flat] = picked.to(out.dtype).flatten()
    return out


@dataclass
class Candidates:
    """What survives top-k, top-p and min-p in each row: the batch's best max_k, best first, and a mask."""

    values: torch.Tensor  # (R, max_k) float32 logits, sorted descending
    ids: torch.Tensor  # (R, max_k) int64 token ids
    keep: torch.Tensor  # (R, max_k) bool; a prefix of each row, never empty


def filter_candidates(logits: torch.Tensor, s: Settings) -> Candidates:
    """Top-k, then top-p, then min-p, per row (each row's probabilities renormalised after the one before)."""
    values, ids = torch.topk(logits, s.max_k, dim=-1)  # sorted, best first
    values = values.float()
    column = torch.arange(s.max_k, device=logits.device)
    first = column == 0  # at least one candidate always survives
    keep = column < s.top_k.unsqueeze(1)
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better candidates
    keep = keep & ((before < s.top_p.unsqueeze(1)) | (s.top_p >= 1.0).unsqueeze(1) | first)
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    keep = keep & ((probs >= s.min_p.unsqueeze(1) * probs[:, :1]) | (s.min_p <= 0).unsqueeze(1) | first)
    return Candidates(values, ids, keep)


def tempered_logits(c: Candidates, s: Settings) -> torch.Tensor:
    """log p (up to a constant per row) of each kept candidate after temperature; -inf where filtered out."""
    return (c.values.double() / s.temperature.double().unsqueeze(1)).masked_fill(~c.keep, float("-inf"))


def draw(c: Candidates, s: Settings, stream: Stream = Stream.DRAW) -> torch.Tensor:
    """One token per row from softmax(values / temperature) over the kept candidates: (R,) int64.

    Gumbel-max with noise keyed by (seed, position, token id): the token does
    not depend on the row's batch, its place in it, or the batch's max_k.
    """
    noise = gumbels(s.seed, s.position, c.ids, stream)
    pick = (tempered_logits(c, s) + noise).argmax(dim=-1, keepdim=True)
    return c.ids.gather(1, pick).squeeze(1)


def candidate_probs(c: Candidates, s: Settings) -> torch.Tensor:
    """The sampling distribution over each row's candidates: (R, max_k) float32, 0 where filtered out."""
    return torch.softmax(tempered_logits(c, s), dim=-1).float()


def dense_probs(c: Candidates, s: Settings, vocab: int) -> torch.Tensor:
    """The sampling distribution over the whole vocabulary: (R, vocab) float32."""
    probs = torch.zeros(c.ids.shape[0], vocab, dtype=torch.float32, device=c.ids.device)
    return probs.scatter_(1, c.ids, candidate_probs(c, s))


def choose(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The whole chain for every row: (R, vocab) logits -> (R,) int64 tokens, on the logits' device."""
    logits = apply_penalties(logits, rows)
    greedy = [r.params.temperature == 0 for r in rows]
    if all(greedy):
        return logits.argmax(dim=-1)
    s = Settings.of(rows, logits.shape[-1], logits.device)
    tokens = draw(filter_candidates(logits, s), s)
    if any(greedy):
        tokens = torch.where(to_device(greedy, torch.bool, logits.device), logits.argmax(dim=-1), tokens)
    return tokens
