"""The native sampler on the CPU: one sequence at a time (as it was) against the batched sampler.

    .venv/bin/python benchmarks/sampler_cpu.py [--threads N] [--rounds R] [--vocab V]

Prints, for 1, 16 and 64 rows of a 262,144-token vocabulary (the starter's),
the median time of one step's sampling (logits already computed, tokens on the
host at the end) with the default settings (temperature 0.8, top-k 40, top-p
0.95, min-p 0.05), and the same with a repetition penalty (1.1 over the last
64 of 64 generated tokens), for both samplers in this one run, interleaved.

The per-sequence sampler is kept below as it was before batching (penalties,
top-k, top-p, min-p, temperature, torch.multinomial with a generator per
request, int() per token); its draws differ from the batched sampler's
(different random numbers), its distribution does not.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import argparse
import statistics
import time

import torch

from localllm.core.requests import SamplingParams
from native.sampler import Sampler
from native.sequence import Sequence


# -- the per-sequence sampler, as it was -------------------------------------------------------


def _old_penalties(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
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


def _old_filter(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    k = p.top_k if 0 < p.top_k < logits.numel() else logits.numel()
    values, ids = torch.topk(logits, k)
    if p.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        keep = int((before < p.top_p).sum())
        values, ids = values[: max(keep, 1)], ids[: max(keep, 1)]
    if p.min_p > 0:
        probs = torch.softmax(values, dim=-1)
        keep = int((probs >= p.min_p * probs[0]).sum())
        values, ids = values[: max(keep, 1)], ids[: max(keep, 1)]
    return values, ids


def old_sampler(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator]) -> list[int]:
    tokens = []
    for row, seq, gen in zip(logits, seqs, generators):
        p = seq.params
        if p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            row = _old_penalties(row, seq.completion_ids, p)
        values, ids = _old_filter(row, p)
        probs = torch.softmax(values / p.temperature, dim=-1)
        tokens.append(int(ids[torch.multinomial(probs, 1, generator=gen)]))
    return tokens


# -- the measurement ------------------------------------------------------------------------------


def make_seqs(n: int, params: SamplingParams, vocab: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(1)
    seqs = []
    for i in range(n):
        s = Sequence(f"r{i}", [0], SamplingParams(**{**vars(params), "seed": i}), 1000)
        s.token_ids.extend(torch.randint(0, vocab, (64,), generator=gen).tolist())
        seqs.append(s)
    return seqs


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=262_144)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
    penalised = SamplingParams(**{**vars(default), "repeat_penalty": 1.1, "repeat_last_n": 64})
    print(f"vocab {args.vocab}, {args.threads} threads, median of {args.rounds} steps (ms per step, tokens on the host)")
    print(f"{'settings':<22}{'rows':>5}{'per-sequence':>14}{'batched':>10}{'speed-up':>10}")
    sampler = Sampler()
    for label, params in (("default", default), ("default + penalty", penalised)):
        for rows in (1, 16, 64):
            logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)) * 3
            seqs = make_seqs(rows, params, args.vocab)
            generators = [torch.Generator().manual_seed(i) for i in range(rows)]
            run_old = lambda: old_sampler(logits, seqs, generators)  # noqa: E731
            run_new = lambda: sampler(logits, seqs).to_host()  # noqa: E731
            run_old(), run_new()  # warm up
            old, new = [], []
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
                old.append(timed_ms(run_old))
                new.append(timed_ms(run_new))
            o, n = statistics.median(old), statistics.median(new)
            print(f"{label:<22}{rows:>5}{o:>14.2f}{n:>10.2f}{o / n:>9.1f}x")


if __name__ == "__main__":
    main()
