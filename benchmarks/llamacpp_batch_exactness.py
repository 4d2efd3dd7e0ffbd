"""How much llama.cpp's arithmetic changes with batch shape, and what that does to greedy output.

llama.cpp's CPU kernels take different paths for different batch shapes: Q4_K
weights repacked for 4-row matrix-matrix products against matrix-vector
products for the remainder, tiled attention once a step has 8 or more query
rows, matrix-multiply libraries above some sizes. The model also quantizes its
activations to 8 bits between layers, so a difference in the last bit can
move a value to the next quantization step. A token computed alone, beside
other sequences, or inside a longer prompt chunk therefore gets slightly
different logits, and greedy outputs agree until the first near-tie.

This script measures it on the real engine (LlamaCppBackend), greedy, with
logprobs of the chosen tokens:
  batch:  each prompt alone vs. the same prompts 8 at a time in one batch
  reuse:  a prompt whose first part is reused from an earlier request vs. the same prompt cold
For each pair it reports whether the outputs are identical, where they first
part, the solo/cold run's margin between its choice and the other run's
choice at that point, and how far the logprobs of identical tokens moved.

    python benchmarks/llamacpp_batch_exactness.py [--model PATH] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localllm.core.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions  # noqa: E402
from localllm.core.modelinfo import read_model_info  # noqa: E402
from starter import starter_path  # noqa: E402  (benchmarks/ is the script's folder)

PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "The quick brown fox",
    "In 1492, Columbus", "Water boils at", "My favourite colour is", "import numpy as np\n",
    "The history of the city of Paris begins", "To make bread, you need", "The three laws of motion are",
    "Dear Sir or Madam,", "The best way to learn a language is", "SELECT name FROM users WHERE",
    "The mitochondria is", "Once there was a king who",
]
SHARED = "Here is a short note about the following subject, written for a school newsletter. Subject: "


async def one(backend, rid: str, prompt: str, tokens: int) -> list[tuple[int, dict]]:
    out = []
    params = SamplingParams(temperature=0, max_tokens=tokens, logprobs=5)
    async for event in backend.generate(GenerationRequest(rid, prompt, params)):
        if isinstance(event, TokenEvent) and event.token_ids:
            out.append((event.token_ids[0], event.logprobs[0]))
    return out


def compare(reference: list[tuple[int, dict]], other: list[tuple[int, dict]]) -> dict:
    """Where `other` parts from `reference`, the reference's margin there, and logprob drift before it."""
    drift = []
    for i, ((ref_token, ref_lp), (token, lp)) in enumerate(zip(reference, other)):
        if token != ref_token:
            top = {t["token"]: t["logprob"] for t in ref_lp["top"]}
            margin = ref_lp["logprob"] - top[token] if token in top else float("inf")
            return {"identical": False, "parted_at": i, "margin": margin, "drift": max(drift, default=0.0)}
        drift.append(abs(ref_lp["logprob"] - lp["logprob"]))
    return {"identical": True, "parted_at": None, "margin": None, "drift": max(drift, default=0.0)}


def summarize(name: str, pairs: list[dict], tokens: int) -> None:
    same = sum(p["identical"] for p in pairs)
    parted = [p for p in pairs if not p["identical"]]
    drift = [p["drift"] for p in pairs]
    print(f"{name}: {same}/{len(pairs)} outputs identical over {tokens} tokens; "
          f"logprob drift of identical tokens: median {statistics.median(drift):.4f}, max {max(drift):.4f} nats")
    if parted:
        where = sorted(p["parted_at"] for p in parted)
        margins = sorted(p["margin"] for p in parted)
        print(f"  parted at token {where}; the reference's margin there (nats): "
              f"{', '.join(f'{m:.3f}' for m in margins)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    info = read_model_info(args.model or starter_path())
    engine = LlamaCppBackend("exactness", info, LlamaCppOptions(n_ctx=8192, n_threads=args.threads, n_parallel=8))
    try:
        solo = [asyncio.run(one(engine, f"solo{i}", p, args.tokens)) for i, p in enumerate(PROMPTS)]

        async def batches():
            results = []
            for start in range(0, len(PROMPTS), 8):
                group = PROMPTS[start : start + 8]
                results += await asyncio.gather(*(one(engine, f"b{start + i}", p, args.tokens) for i, p in enumerate(group)))
            return results

        batched = asyncio.run(batches())
        warm = []
        for i, p in enumerate(PROMPTS):
            asyncio.run(one(engine, f"prime{i}", SHARED + "the weather", 1))  # caches the shared part
            warm.append(asyncio.run(one(engine, f"warm{i}", SHARED + p, args.tokens)))
    finally:
        engine.close()
    cold = []
    for i, p in enumerate(PROMPTS):  # a fresh engine each time: nothing cached
        fresh = LlamaCppBackend("cold", info, LlamaCppOptions(n_ctx=1024, n_threads=args.threads, n_parallel=1))
        try:
            cold.append(asyncio.run(one(fresh, f"cold{i}", SHARED + p, args.tokens)))
        finally:
            fresh.close()
    print(f"model {info.path.name}, greedy, {len(PROMPTS)} prompts")
    summarize("batch of 8 vs alone", [compare(s, b) for s, b in zip(solo, batched)], args.tokens)
    summarize("reused prefix vs cold", [compare(c, w) for c, w in zip(cold, warm)], args.tokens)


if __name__ == "__main__":
    main()
