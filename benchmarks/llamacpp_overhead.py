"""What our llama.cpp backend costs over a bare llama-cpp-python generate loop.

Same model file, same prompt, same threads, greedy; runs interleaved (bare, ours,
bare, ours, ...) so machine noise hits both alike; medians reported. Ours is
timed from the client's side of the event stream, as a front end sees it.

    python benchmarks/llamacpp_overhead.py [--model PATH] [--tokens 128] [--rounds 7] [--threads 2]

Goal (foundation issue): decode >= 0.95x bare, TTFT within +10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localllm.backends.base import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions  # noqa: E402
from localllm.modelinfo import read_model_info  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def starter_path() -> Path:
    from localllm.store.store import ModelStore

    return ModelStore().resolve("starter").path


def bare_run(llm, prompt: str, n_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, decode tok/s, tokens) for llama-cpp-python's own generate loop."""
    llm.reset()  # no prompt reuse: both sides process the whole prompt
    start = time.perf_counter()
    tokens = llm.tokenize(prompt.encode())
    stamps = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        if len(stamps) == n_tokens or llm.token_eos() == token:
            break
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def ours_run(backend: LlamaCppBackend, prompt: str, n_tokens: int, rid: str) -> tuple[float, float, int]:
    async def go():
        start = time.perf_counter()
        stamps = []
        req = GenerationRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=n_tokens))
        async for event in backend.generate(req):
            if isinstance(event, TokenEvent):
                stamps.append(time.perf_counter())
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)

    return asyncio.run(go())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import llama_cpp

    path = args.model or starter_path()
    bare = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=args.threads,
                           n_threads_batch=args.threads, verbose=False)
    ours = LlamaCppBackend("bench", read_model_info(path), LlamaCppOptions(n_ctx=1024, n_threads=args.threads))
    results: dict[str, list[tuple[float, float, int]]] = {"bare": [], "ours": []}
    bare_run(bare, PROMPT, 8)  # warm-up both
    ours_run(ours, "Warm up " + PROMPT, 8, "warm")
    for i in range(args.rounds):
        prompt = f"{i + 1}. {PROMPT}"  # a new first token each round: neither side can reuse the KV
        results["bare"].append(bare_run(bare, prompt, args.tokens))
        results["ours"].append(ours_run(ours, prompt, args.tokens, f"r{i}"))
    ours.close()

    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    summary = {
        "model": str(path.name),
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "bare_decode_tok_s": round(med["bare"][1], 2),
        "ours_decode_tok_s": round(med["ours"][1], 2),
        "decode_ratio": round(med["ours"][1] / med["bare"][1], 3),
        "bare_ttft_ms": round(med["bare"][0] * 1000, 2),
        "ours_ttft_ms": round(med["ours"][0] * 1000, 2),
        "ttft_ratio": round(med["ours"][0] / med["bare"][0], 3),
        "tokens_generated": {k: [r[2] for r in v] for k, v in results.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model {summary['model']}, {args.threads} threads, {args.tokens} tokens, {args.rounds} interleaved rounds, medians")
        print(f"{'':8}{'decode tok/s':>14}{'TTFT ms':>10}")
        print(f"{'bare':8}{summary['bare_decode_tok_s']:>14}{summary['bare_ttft_ms']:>10}")
        print(f"{'ours':8}{summary['ours_decode_tok_s']:>14}{summary['ours_ttft_ms']:>10}")
        print(f"ratio   decode {summary['decode_ratio']}x (goal >= 0.95), TTFT {summary['ttft_ratio']}x (goal <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
