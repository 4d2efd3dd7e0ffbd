"""The fit planner's decode-speed efficiencies on this CPU, measured on the starter.

    .venv/bin/python benchmarks/decode_prediction.py [--threads N] [--rounds R] [--tokens T]

Each round, interleaved so that load from other programs hits every side alike:
the CPU's copy bandwidth (localllm/fit/bandwidth.py's measurement, not cached),
then single-stream greedy decode of T tokens with llama.cpp (llama-cpp-python,
Q4_K_M) and with the native engine in float32, bfloat16, int8 and int4 weights. A side's
efficiency is (tokens/s x bytes a token reads) / copy bandwidth, the factor
localllm/fit/speed.py multiplies the bandwidth by; medians over the rounds.
The bytes a token reads are the fit planner's own figures (weights, KV at the
prompt's length), so this checks the prediction the way `fit` makes it.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from localllm.core.modelinfo import read_model_info  # noqa: E402
from localllm.core.requests import SamplingParams  # noqa: E402
from localllm.fit.bandwidth import measure_copy_bandwidth  # noqa: E402
from localllm.fit.native_memory import compute_dtype_bytes, weight_parts  # noqa: E402
from native.engine import EngineOptions, LLMEngine  # noqa: E402
from starter import starter_path  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def llamacpp_rate(llm, n: int) -> float:
    llm.reset()
    tokens = llm.tokenize(PROMPT.encode())
    stamps = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        if len(stamps) == n or llm.token_eos() == token:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def native_rate(engine: LLMEngine, prompt: list[int], n: int) -> float:
    engine.add_request(f"r{time.perf_counter_ns()}", prompt, SamplingParams(temperature=0, max_tokens=n))
    first, produced = None, 0
    while engine.has_work():
        produced += len(engine.step())
        if produced and first is None:
            first = time.perf_counter()
    return (produced - 1) / (time.perf_counter() - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import llama_cpp

    gguf = starter_path()
    info = read_model_info(gguf)
    llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_threads=args.threads, verbose=False)
    engines = {
        fmt: LLMEngine(gguf, EngineOptions(device="cpu", weights=fmt, threads=args.threads, n_ctx=1024, max_num_seqs=1))
        for fmt in ("float32", "bfloat16", "int8", "int4")
    }
    prompt = engines["float32"].tokenizer.encode(PROMPT, add_bos=True, special=False)
    context = len(prompt) + args.tokens // 2  # the KV a token reads, on average over the run
    llama_read = info.weight_bytes - (info.token_embd_bytes if info.output_bytes else 0) + info.kv_bytes(context, 2)
    reads = {"llama.cpp Q4_K_M": llama_read}
    for dtype in engines:
        reads[f"native {dtype}"] = weight_parts(info, dtype).read_per_token + info.kv_bytes(context, compute_dtype_bytes(dtype))
    for name, read in reads.items():
        print(f"{name}: {read / 1e9:.3f} GB read a token (the fit planner's figure)")

    rates: dict[str, list[float]] = {name: [] for name in reads}
    ratios: dict[str, list[float]] = {name: [] for name in reads}
    copies = []
    for r in range(args.rounds):
        copy = measure_copy_bandwidth(args.threads) or float("nan")
        copies.append(copy)
        measured = {"llama.cpp Q4_K_M": llamacpp_rate(llm, args.tokens)}
        for dtype, engine in engines.items():
            measured[f"native {dtype}"] = native_rate(engine, prompt, args.tokens)
        line = [f"round {r + 1}: copy {copy / 1e9:.1f} GB/s"]
        for name, rate in measured.items():
            rates[name].append(rate)
            ratios[name].append(rate * reads[name] / copy)
            line.append(f"{name} {rate:.1f} tok/s (x{ratios[name][-1]:.2f})")
        print("; ".join(line), flush=True)
    print(f"\nmedians over {args.rounds} rounds, {args.threads} threads, {args.tokens} tokens; "
          f"copy bandwidth {statistics.median(copies) / 1e9:.1f} GB/s")
    for name in reads:
        print(f"  {name}: {statistics.median(rates[name]):.1f} tok/s, efficiency {statistics.median(ratios[name]):.2f} "
              f"(effective {statistics.median(rates[name]) * reads[name] / 1e9:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
