"""Speculative decoding on the CPU: the native engine with prompt lookup (n-gram) against itself without.

    .venv/bin/python benchmarks/speculative_cpu.py [--threads N] [--rounds R] [--tokens T] [-k K]

Prompts on the starter model (Gemma 3 270M, a base model, so plain text):
- copy-heavy: a paragraph, then an invitation to write it out again; the
  model copies it, and prompt lookup finds every next token in the prompt;
- open-ended: two prompts whose continuation is the model's own (greedy with
  llama.cpp's usual repetition penalty, see OPEN), and a sampled story
  (temperature 0.8, seeded: prompt lookup's guesses are checked against the
  draw plain sampling makes, so its text is the same too).

Each request runs alone, alternately on two engines loaded from the same
file, one plain and one with n-gram speculation (k guesses per step), for R
rounds. Printed per prompt: decode tokens/s (tokens after the first over the
time after the first; prompts are cached after round one and are not what
this measures), medians over rounds, the speed-up, whether the greedy texts
are identical, the share of guesses accepted, tokens per engine step, and
whether speculation turned itself off for the request.

Goals (issue 9): >= 1.5x on the copy-heavy prompt with identical text, and
>= 0.95x on the open-ended one.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import argparse
import dataclasses
import statistics
import sys
import time

from native.engine import EngineOptions, LLMEngine
from localllm.core.speculation import NativeGuessing, SpeculationOptions

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from native_cpu import starter_path  # noqa: E402  (the starter, assembled once into a temp folder)

from speculative_prompts import CASES  # noqa: E402  (shared with speculative_llamacpp.py)


def run_once(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, int]:
    """One request alone: its tokens, decode tokens/s, and the engine steps it took."""
    engine.add_request("bench", prompt, params)
    out: list[int] = []
    first_at = last_at = 0.0
    steps = 0
    while engine.has_work():
        produced = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in produced:
            if not out:
                first_at = now
            out.append(o.token)
            last_at = now
    rate = (len(out) - 1) / (last_at - first_at) if len(out) > 1 and last_at > first_at else 0.0
    return out, rate, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=NativeGuessing.num_tokens, help="guesses per step")
    args = ap.parse_args()

    path = starter_path()
    base = dict(device="cpu", weights="float32", threads=args.threads, n_ctx=1024, max_num_seqs=4)
    plain = LLMEngine(path, EngineOptions(**base))
    spec = LLMEngine(path, EngineOptions(**base, speculation=SpeculationOptions("ngram", num_tokens=args.k)))
    print(f"starter model, float32, {args.threads} threads, {args.tokens} tokens, k={args.k}, {args.rounds} rounds")
    print(f"{'prompt':<15} {'plain tok/s':>11} {'ngram tok/s':>11} {'speed-up':>8} {'same text':>9} "
          f"{'accepted':>8} {'tok/step':>8} {'auto-off':>8}")
    failed = False
    samples: dict[str, str] = {}
    for name, text, params in CASES:
        params = dataclasses.replace(params, max_tokens=args.tokens)
        prompt = plain.tokenizer.encode(text, add_bos=True, special=False)
        rates: dict[str, list[float]] = {"plain": [], "ngram": []}
        same, proposed, accepted, tokens, steps, turned_off = True, 0, 0, 0, 0, False
        for _ in range(args.rounds):
            ref, rate, _ = run_once(plain, prompt, params)
            rates["plain"].append(rate)
            c = spec.speculator.counters
            before = (c.proposed, c.accepted, c.requests_turned_off)
            got, rate, n_steps = run_once(spec, prompt, params)
            rates["ngram"].append(rate)
            same &= got == ref
            proposed += c.proposed - before[0]
            accepted += c.accepted - before[1]
            turned_off |= c.requests_turned_off > before[2]
            tokens += len(got)
            steps += n_steps
        p, s = statistics.median(rates["plain"]), statistics.median(rates["ngram"])
        share = f"{accepted / proposed:.0%}" if proposed else "-"
        print(f"{name:<15} {p:>11.1f} {s:>11.1f} {s / p:>7.2f}x {str(same):>9} {share:>8} "
              f"{tokens / steps:>8.2f} {str(turned_off):>8}")
        failed |= params.temperature == 0 and not same
        samples[name] = plain.tokenizer.decode(ref)
    for name, text in samples.items():
        print(f"\n{name}: {text[:200]!r}")
    plain.close()
    spec.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
