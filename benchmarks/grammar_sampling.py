"""JSON-constrained decoding: our grammar sampler against llama-cpp-python's.

llama-cpp-python's `Llama` puts the grammar into its sampler chain, so every
step checks the whole vocabulary (262,144 tokens for the starter) against the
grammar. Ours (localllm/backends/grammar.py) samples without it first and asks
the grammar about that one token, as llama.cpp's own tools do. Both sides get
the same model file, prompt, grammar (a JSON Schema through the same converter),
threads and greedy sampling, so their outputs should be identical (the script
says whether they were; past ~50 tokens llama-cpp-python's loop drifts from
greedy on this prompt, so the default stops at 40); runs are interleaved
(bare, ours, ours, bare, ...), one process per side, medians reported.

    python benchmarks/grammar_sampling.py [--model PATH] [--tokens 40] [--rounds 5] [--threads 2]
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

from localllm.core.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions  # noqa: E402
from localllm.core.modelinfo import read_model_info  # noqa: E402
from localllm.server.json_grammar import schema_grammar  # noqa: E402
from starter import starter_path  # noqa: E402  (benchmarks/ is the script's folder)

PROMPT = "A JSON record for a city, with its name, country, population and a list of landmarks:\n"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "country", "population", "landmarks"],
}


def bare_run(llm, grammar, prompt: str, n_tokens: int) -> tuple[float, int, str]:
    """(decode tok/s, tokens, text) for llama-cpp-python's generate loop with its grammar."""
    llm.reset()
    tokens = llm.tokenize(prompt.encode())
    stamps, out = [], []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, grammar=grammar):
        stamps.append(time.perf_counter())
        if llm.token_eos() == token:
            break
        out.append(token)
        if len(stamps) == n_tokens:
            break
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps), text


def ours_run(backend: LlamaCppBackend, grammar: str, prompt: str, n_tokens: int, rid: str) -> tuple[float, int, str]:
    async def go():
        stamps, text = [], ""
        params = SamplingParams(temperature=0, max_tokens=n_tokens, grammar=grammar)
        async for event in backend.generate(GenerationRequest(rid, prompt, params)):
            if isinstance(event, TokenEvent):
                stamps.append(time.perf_counter())
                text += event.text
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps), text

    return asyncio.run(go())


def worker(side: str, path: str, threads: int, conn) -> None:
    grammar_text = schema_grammar(SCHEMA, "benchmark schema")
    if side == "bare":
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        grammar = LlamaGrammar.from_string(grammar_text, verbose=False)
        run = lambda prompt, n, rid: bare_run(llm, grammar, prompt, n)  # noqa: E731
    else:
        backend = LlamaCppBackend("bench", read_model_info(Path(path)), LlamaCppOptions(n_ctx=1024, n_threads=threads))
        run = lambda prompt, n, rid: ours_run(backend, grammar_text, prompt, n, rid)  # noqa: E731
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(run(*job))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import multiprocessing as mp

    path = args.model or starter_path()
    ctx = mp.get_context("spawn")
    sides = {}
    for side in ("bare", "ours"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(side, str(path), args.threads, child), daemon=True)
        proc.start()
        assert parent.recv() == "ready"
        sides[side] = (proc, parent)

    def run(side: str, prompt: str, n: int, rid: str):
        time.sleep(0.3)  # let the other process's threads stop spinning
        sides[side][1].send((prompt, n, rid))
        return sides[side][1].recv()

    results: dict[str, list[tuple[float, int, str]]] = {"bare": [], "ours": []}
    for side in sides:
        run(side, PROMPT, 8, "warm")
    for i in range(args.rounds):
        for side in (("bare", "ours") if i % 2 == 0 else ("ours", "bare")):
            results[side].append(run(side, PROMPT, args.tokens, f"r{i}"))
    for proc, conn in sides.values():
        conn.send(None)
        proc.join(timeout=30)

    med = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    same = all(a[2] == b[2] for a, b in zip(results["bare"], results["ours"]))
    summary = {
        "model": path.name,
        "threads": args.threads,
        "rounds": args.rounds,
        "tokens": {k: results[k][0][1] for k in results},
        "bare_decode_tok_s": round(med["bare"], 2),
        "ours_decode_tok_s": round(med["ours"], 2),
        "speedup": round(med["ours"] / med["bare"], 2),
        "identical_output": same,
        "output": results["ours"][0][2],
        "bare_output": results["bare"][0][2],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model {summary['model']}, {args.threads} threads, {args.rounds} interleaved rounds, greedy, medians")
        print(f"llama-cpp-python (grammar in the chain): {summary['bare_decode_tok_s']} tok/s")
        print(f"localllm (chain first, grammar on refusal): {summary['ours_decode_tok_s']} tok/s")
        print(f"speed-up {summary['speedup']}x; identical output: {same}; {summary['tokens']['ours']} tokens")
        print(f"output: {summary['output']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
