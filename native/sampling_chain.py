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

from .sampling_rng import Stream, gumbels, row_key


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
    max_k: int  # the largest top-k of the rows that draw (host-known: it fixes the shapes)
    rows: list[Row]

    @classmethod
    def of(cls, rows: list[Row], vocab: int, device: torch.device) -> Settings:
        ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        floats = to_device(
            [[r.params.temperature if r.params.temperature > 0 else 1.0, r.params.top_p, r.params.min_p] for r in rows],
            torch.float32,
            device,
        )
        drawing = [k for k, r in zip(ks, rows) if r.params.temperature > 0]
        temperature, top_p, min_p = floats.unbind(1)
        return cls(temperature, to_device(ks, torch.int64, device), top_p, min_p, max(drawing, default=1), rows)

    def keys(self, stream: Stream) -> torch.Tensor:
        """Each row's random key for `stream` (sampling_rng.row_key): (R,) int64 on the settings' device."""
        return to_device([row_key(r.seed, r.position, stream) for r in self.rows], torch.int64, self.top_k.device)


@dataclass
class Penalised:
    """The tokens each penalised row's window holds, with their logits after the penalties."""

    rows: torch.Tensor  # (P,) int64: which rows of the batch
    ids: torch.Tensor  # (P, W) int64: the window (padding repeats the row's first token)
    values: torch.Tensor  # (P, W) float32: the penalised logit of each id (equal for repeats of one id)
    first: torch.Tensor  # (P, W) bool: the first occurrence of its id in the window (never padding)
    ordered: torch.Tensor  # (P, W) int64: the window sorted, padding (= vocab) last


def penalise(logits: torch.Tensor, rows: list[Row]) -> Penalised | None:
    """Repetition (divide positive logits, multiply negative ones), presence and frequency penalties.

    Only the window's tokens change, so only they are computed; None when no
    row has penalties. Counts come from the sorted window (binary search for
    each id's run; padding sorts last and counts nothing).
    """
    chosen = [i for i, r in enumerate(rows) if has_penalties(r.params) and len(r.window) > 0]
    if not chosen:
        return None
    vocab, width = logits.shape[-1], max(len(rows[i].window) for i in chosen)
    device = logits.device
    ids = to_device([list(rows[i].window) + [vocab] * (width - len(rows[i].window)) for i in chosen], torch.int64, device)
    knobs = to_device([[rows[i].params.repeat_penalty, rows[i].params.presence_penalty, rows[i].params.frequency_penalty] for i in chosen], torch.float32, device)
    which = to_device(chosen, torch.int64, device)
    repeat, presence, frequency = (k.unsqueeze(1) for k in knobs.unbind(1))

    ordered, order = ids.sort(dim=1, stable=True)
    start = torch.searchsorted(ordered, ids)
    counts = torch.searchsorted(ordered, ids, right=True) - start
    padding = ids == vocab
    first = (order.gather(1, start) == torch.arange(width, device=device)) & ~padding  # the earliest of its run
    ids = torch.where(padding, ids[:, :1], ids)
    counts = torch.where(padding, counts[:, :1], counts)
    picked = logits[which.unsqueeze(1), ids].float()  # (P, W): only the window's logits are read
    picked = torch.where(picked > 0, picked / repeat, picked * repeat)
    picked = picked - counts.to(picked.dtype) * frequency - presence
    return Penalised(which, ids, picked, first, ordered)


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The logits after penalties, as a new (R, vocab) tensor (`logits` itself when no row has any)."""
    pen = penalise(logits, rows)
    if pen is None:
        return logits
    out = logits.clone(memory_format=torch.contiguous_format)
    flat = (pen.rows.unsqueeze(1) * logits.shape[-1] + pen.ids).flatten()
    out.view(-1)[flat] = pen.values.to(out.dtype).flatten()  # repeats of an id write the same value
    return out


def top_logits(logits: torch.Tensor, rows: list[Row], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best logits after penalties, best first: values (R, k) float32 and ids (R, k) int64.

    Penalties change at most W (the longest window) tokens of a row, so its
    best k after them are among its best k + W before them and the window's
    own tokens: take those, drop the window's ids from the first set and add
    them back with their new values, then take the best k. No copy of the
    logits is made unless k + W reaches the vocabulary.
    """
    pen = penalise(logits, rows)
    vocab = logits.shape[-1]
    if pen is None:
        values, ids = torch.topk(logits, k, dim=-1)
        return values.float(), ids
    width = pen.ids.shape[1]
    if k + width >= vocab:
        values, ids = torch.topk(apply_penalties(logits, rows), k, dim=-1)
        return values.float(), ids
    values, ids = torch.topk(logits, k + width, dim=-1)
    values = values.float()
    old_values, old_ids = values.index_select(0, pen.rows), ids.index_select(0, pen.rows)
    at = torch.searchsorted(pen.ordered, old_ids).clamp(max=width - 1)
    in_window = pen.ordered.gather(1, at) == old_ids
    merged_values = torch.cat([old_values.masked_fill(in_window, float("-inf")), pen.values.masked_fill(~pen.first, float("-inf"))], dim=1)
    merged_ids = torch.cat([old_ids, pen.ids], dim=1)  # repeated ids only where the value is -inf
    best = torch.topk(merged_values, k, dim=-1)
    values = values[:, :k].index_copy(0, pen.rows, best.values)
    ids = ids[:, :k].index_copy(0, pen.rows, merged_ids.gather(1, best.indices))
    return values, ids


@dataclass
class Candidates:
    """What survives top-k, top-p and min-p in each row: the batch's best max_k, best first, and a mask."""

    values: torch.Tensor  # (R, max_k) float32 logits after penalties, sorted descending
    ids: torch.Tensor  # (R, max_k) int64 token ids
    keep: torch.Tensor  # (R, max_k) bool; a prefix of each row, never empty


def candidates(logits: torch.Tensor, rows: list[Row], s: Settings) -> Candidates:
    """Penalties, then top-k, top-p and min-p, per row (each renormalising what the one before kept)."""
    values, ids = top_logits(logits, rows, s.max_k)
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
    noise = gumbels(s.keys(stream), c.ids)
    pick = (tempered_logits(c, s) + noise).argmax(dim=-1, keepdim=True)
    return c.ids.gather(1, pick).squeeze(1)


def candidate_probs(c: Candidates, s: Settings) -> torch.Tensor:
    """The sampling distribution over each row's candidates: (R, max_k) float32, 0 where filtered out."""
    return torch.softmax(tempered_logits(c, s), dim=-1).float()


def dense_probs(c: Candidates, s: Settings, vocab: int) -> torch.Tensor:
    """The sampling distribution over the whole vocabulary: (R, vocab) float32."""
    probs = torch.zeros(c.ids.shape[0], vocab, dtype=torch.float32, device=c.ids.device)
    return probs.scatter_add_(1, c.ids, candidate_probs(c, s))  # an id repeats only with probability 0


def choose(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The whole chain for every row: (R, vocab) logits -> (R,) int64 tokens, on the logits' device."""
    greedy = [r.params.temperature == 0 for r in rows]
    if all(greedy) and not any(has_penalties(r.params) for r in rows):
        return logits.argmax(dim=-1)
    s = Settings.of(rows, logits.shape[-1], logits.device)
    c = candidates(logits, rows, s)
    if all(greedy):
        return c.ids[:, 0]
    tokens = draw(c, s)
    if any(greedy):  # the best after penalties
        tokens = torch.where(to_device(greedy, torch.bool, logits.device), c.ids[:, 0], tokens)
    return tokens
