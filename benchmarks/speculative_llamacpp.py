"""Speculative decoding on the llama.cpp backend: the batched engine with prompt lookup (or a draft) against itself without.

    .venv/bin/python benchmarks/speculative_llamacpp.py [--threads N] [--rounds R] [--tokens T] [-k K]
        [--draft PATH | --draft-self]

The prompts of speculative_cpu.py (speculative_prompts.py) on the starter
model (Gemma 3 270M Q4_K_M). Each request runs alone, R rounds, once plain
and once speculating (which goes first alternates), on ONE backend whose
guesser is switched off for the plain runs: two backends loaded side by side
differed by a few percent with identical settings (memory placement), which
is as much as the open-ended prompts' effect. The copy-heavy request stops at the
blank line after its copy: past it the model's two best next tokens are within
0.05 nats, where llama.cpp's rounding (see greedy_check in the tests) may pick
either in any run, with or without speculation.

Printed per prompt: decode tokens/s (tokens after the first over the time
after the first; prompts are reused from the cache after round one, so this
is not what is measured), medians over rounds, the speed-up (the median of
each round's ratio: the two runs of a round see the same machine load; the
interquartile range of those ratios shows how noisy the machine was),
whether the greedy texts are identical in every round, and the share of
guesses kept.

With --draft the guesses come from a draft GGUF instead of prompt lookup;
--draft-self uses the starter as its own draft (a check that the path works
and keeps nearly every guess, not a speed-up: the draft costs what the model does).
With --concurrency N, N copies of each request run at once and tok/s is all
their tokens over the wall time (speculation stays on while at most 4
generate).

Goals (issue 9): >= 1.5x on the copy-heavy prompt with identical text, and
>= 0.95x on the open-ended ones.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from speculative_prompts import CASES  # noqa: E402
from starter import starter_path  # noqa: E402

from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions  # noqa: E402
from localllm.core.speculation import LlamaCppGuessing, SpeculationOptions  # noqa: E402
from localllm.core.modelinfo import read_model_info  # noqa: E402


@dataclasses.dataclass
class Outcome:
    tokens: list[int]
    rate: float  # decode tokens/s
    checked: int  # guesses checked
    kept: int


async def _generate(backend: LlamaCppBackend, prompt: str, params: SamplingParams, rid: str) -> Outcome:
    tokens: list[int] = []
    async for event in backend.generate(GenerationRequest(rid, prompt, params)):
        if isinstance(event, TokenEvent):
            tokens += event.token_ids
        elif isinstance(event, FinishEvent):
            u = event.usage
            rate = event.timings.decode_tokens_per_s(u.completion_tokens)
            return Outcome(tokens, rate, u.draft_tokens, u.accepted_draft_tokens)
    raise RuntimeError("no finish event")


def run_once(backend: LlamaCppBackend, prompt: str, params: SamplingParams, rid: str, concurrency: int = 1) -> Outcome:
    """One request alone (its decode tokens/s), or `concurrency` copies at once (all their tokens over the wall time)."""
    if concurrency == 1:
        return asyncio.run(_generate(backend, prompt, params, rid))

    async def together() -> list[Outcome]:
        return await asyncio.gather(*(_generate(backend, prompt, params, f"{rid}-{i}") for i in range(concurrency)))

    started = time.perf_counter()
    outcomes = asyncio.run(together())
    wall = time.perf_counter() - started
    total = sum(len(o.tokens) for o in outcomes)
    return Outcome(outcomes[0].tokens, total / wall, sum(o.checked for o in outcomes), sum(o.kept for o in outcomes))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=LlamaCppGuessing.most_tokens, help="the most guesses per step")
    ap.add_argument("--only", help="run only the prompts whose name contains this")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="copies of each request at once; tok/s is then all their tokens over the wall time")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--draft", type=Path, help="a draft GGUF sharing the starter's vocabulary")
    group.add_argument("--draft-self", action="store_true", help="the starter as its own draft")
    args = ap.parse_args()

    path = starter_path()
    info = read_model_info(path)
    draft = str(path) if args.draft_self else (str(args.draft) if args.draft else None)
    spec_config = SpeculationOptions("draft" if draft else "ngram", num_tokens=args.k, draft=draft)
    backend = LlamaCppBackend("starter", info, LlamaCppOptions(
        n_threads=args.threads, n_parallel=max(1, args.concurrency), speculation=spec_config))
    speculation = backend._engine.speculation  # switched off and on between requests, while the engine is idle
    method = f"draft {Path(draft).name}" if draft else "ngram"
    print(f"starter model (Q4_K_M) on llama.cpp, {args.threads} threads, {args.tokens} tokens, {method}, "
          f"k={args.k}, {args.rounds} rounds, {args.concurrency} at once")
    print(f"{'prompt':<15} {'plain tok/s':>11} {'spec tok/s':>11} {'speed-up':>8} {'IQR':^11} {'same text':>9} "
          f"{'kept':>6} {'checked':>8}")
    failed = False
    samples: dict[str, str] = {}
    for name, text, params in CASES:
        if args.only and args.only not in name:
            continue
        params = dataclasses.replace(params, max_tokens=args.tokens)
        if name == "copy-heavy":
            params = dataclasses.replace(params, stop=["\n\n"])
        rates: dict[str, list[float]] = {"plain": [], "spec": []}
        same, checked, kept = True, 0, 0
        for r in range(args.rounds):
            order = ["plain", "spec"] if r % 2 == 0 else ["spec", "plain"]
            got: dict[str, Outcome] = {}
            for label in order:
                backend._engine.speculation = speculation if label == "spec" else None
                got[label] = run_once(backend, text, params, f"{name}-{r}-{label}", args.concurrency)
                rates[label].append(got[label].rate)
            same &= got["spec"].tokens == got["plain"].tokens
            checked += got["spec"].checked
            kept += got["spec"].kept
        p, s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
        ratios = [b / a for a, b in zip(rates["plain"], rates["spec"])]
        q1, ratio, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        share = f"{kept / checked:.0%}" if checked else "-"
        print(f"{name:<15} {p:>11.1f} {s:>11.1f} {ratio:>7.2f}x {q1:>5.2f}-{q3:<5.2f} {str(same):>9} {share:>6} "
              f"{checked:>8}", flush=True)
        failed |= params.temperature == 0 and not same
        samples[name] = backend.detokenize(got["plain"].tokens)
    for name, text in samples.items():
        print(f"\n{name}: {text[:200]!r}")
    backend._engine.speculation = speculation  # closed with the engine
    backend.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
