"""The llama.cpp engine's own cost per step: engine-thread CPU time between one llama_decode and the next.

That time is the step loop (scheduling, filling the batch, sampling, streaming
text, handing events over); llama_decode itself is llama.cpp's. CPU time of the
engine thread, not wall time, so other programs on a busy machine hardly move
it. With --against DIR (another checkout of this project, e.g. `git worktree
add DIR HEAD~1`) both trees run interleaved, each in its own process, and the
ratios say whether a change made the loop slower.

    python benchmarks/llamacpp_step_overhead.py [--against DIR] [--streams 1] [--tokens 64] [--rounds 11] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city of Paris begins"


def worker(tree: str, model: str, threads: int, streams: int, conn) -> None:
    """One tree's backend; answers (decode tok/s, engine CPU µs per step) for each round the parent asks for."""
    sys.path.insert(0, tree)
    import asyncio

    import llama_cpp

    from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
    from localllm.core.modelinfo import read_model_info
    from localllm.core.requests import GenerationRequest, SamplingParams, TokenEvent

    between = {"cpu": 0.0, "steps": 0, "last": None}
    decode = llama_cpp.llama_decode

    def timed_decode(ctx, batch):  # the engine calls llama_cpp.llama_decode on its own thread
        now = time.thread_time()
        if between["last"] is not None:
            between["cpu"] += now - between["last"]
            between["steps"] += 1
        try:
            return decode(ctx, batch)
        finally:
            between["last"] = time.thread_time()

    llama_cpp.llama_decode = timed_decode
    options = LlamaCppOptions(n_ctx=1024 * streams, n_threads=threads, n_parallel=max(streams, 1))
    backend = LlamaCppBackend("bench", read_model_info(Path(model)), options)

    async def one(prompt: str, n: int, rid: str) -> list[float]:
        stamps = []
        async for event in backend.generate(GenerationRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=n))):
            if isinstance(event, TokenEvent):
                stamps.append(time.perf_counter())
        return stamps

    async def round_(prompt: str, n: int, rid: str) -> tuple[float, float]:
        between.update(cpu=0.0, steps=0, last=None)
        runs = await asyncio.gather(*(one(f"{k} {prompt}", n, f"{rid}-{k}") for k in range(streams)))
        first, last = max(s[0] for s in runs), min(s[-1] for s in runs)  # while every stream decodes
        tokens = sum(sum(1 for t in s if first <= t <= last) for s in runs)
        return tokens / (last - first), between["cpu"] / between["steps"] * 1e6

    import localllm

    conn.send(str(Path(localllm.__file__).parents[1]))  # ready: the tree it runs
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(round_(*job)))
    backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout of the project to compare with")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import multiprocessing as mp

    sys.path.insert(0, str(HERE / "benchmarks"))
    from starter import starter_path

    model = str(args.model or starter_path())
    trees = {"this": str(HERE)}
    if args.against:
        trees["against"] = str(args.against.resolve())
    ctx = mp.get_context("spawn")
    sides = {}
    for name, tree in trees.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(tree, model, args.threads, args.streams, child), daemon=True)
        proc.start()
        print(f"{name}: {parent.recv()}", file=sys.stderr)
        sides[name] = (proc, parent)

    def run(name: str, prompt: str, n: int, rid: str):
        time.sleep(0.3)  # let the other process's OpenMP workers stop spinning
        sides[name][1].send((prompt, n, rid))
        return sides[name][1].recv()

    for name in sides:
        run(name, "Warm up. " + PROMPT, 8, "warm")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(args.rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            results[name].append(run(name, f"{i + 1}. {PROMPT}", args.tokens, f"r{i}"))
    for proc, conn in sides.values():
        conn.send(None)
        proc.join(timeout=30)

    summary: dict = {"streams": args.streams, "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads}
    for name, rs in results.items():
        summary[name] = {
            "decode_tok_s": round(statistics.median(r[0] for r in rs), 2),
            "engine_cpu_us_per_step": round(statistics.median(r[1] for r in rs), 1),
        }
    if "against" in results:
        pairs = list(zip(results["this"], results["against"]))
        summary["this_over_against_decode"] = round(statistics.median(a[0] / b[0] for a, b in pairs), 3)
        summary["this_over_against_engine_cpu"] = round(statistics.median(a[1] / b[1] for a, b in pairs), 3)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
