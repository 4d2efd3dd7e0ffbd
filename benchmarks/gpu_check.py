"""The native engine on a CUDA GPU: correctness, kernels, and speed against the roofline and transformers.

    python benchmarks/gpu_check.py [--sections 1,4,7,5,8,3,2,6] [--skip-7b] [--budget-s 530] [--json FILE]
    python benchmarks/gpu_check.py --device cpu --tiny      # dry run of every section on a CPU, tiny shapes

One script, one call of under nine minutes on one H100, nothing downloaded: every
model is built with random weights of a real shape (from the published config.json
files) directly on the GPU, so it runs on a machine without network. Every figure
line ends with the card's name. A section whose feature is missing says so in one
line ("skipped: ..."), a failing one prints its error, and the rest go on. Before
each section the script checks its estimate against --budget-s and skips it
(one line) when it would not finish in time; the default order puts the issue's
targets first.

Sections (number: what; estimated seconds on an H100):
1. device (5 s): name, versions, and the measured device-to-device copy bandwidth
   (bytes read + bytes written per second), every roofline's denominator;
2. kernels (30 s): the Triton paged-decode and KV-store kernels against the torch
   reference on random shapes (GQA 1/4/8, windows, block sizes, ragged lengths),
   the fused residual add + RMSNorm (plain and Gemma's) at real hidden sizes, and
   the decode step's q/k norm + rotary + KV-store kernel at real head shapes;
3. correctness (45 s): tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma 3 in
   float32 on the GPU: prompt logits against transformers (relative error), 32
   greedy tokens equal, and 8 prompts of different lengths giving the same tokens
   alone and batched (CUDA graphs and the decode kernel in the path);
4. batch-1 decode, Llama-3.2-1B shape in bfloat16 (60 s): tokens/s against the
   roofline (weight bytes / copy bandwidth; target >= 60%) and transformers
   `generate`; then a second engine built with LOCALLLM_NATIVE_FUSED=off, so the
   figures show what the fusions buy;
5. 64 concurrent requests through NativeBackend (150 s; 60 s with --skip-7b): the
   real backend (engine thread, inbox, per-request event streams) with default
   sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), 128-token
   prompts, 128 new tokens each, 1B and Qwen2.5-7B shapes, against transformers
   `generate` sampling the same way for the same 64 as one batch (equal lengths:
   no padding waste for it); target >= 10x at the 7B shape. Greedy through the
   backend too, so the figures show what sampling costs;
6. memory (40 s): the fit planner's predicted VRAM for the engine against
   torch.cuda.max_memory_allocated;
7. Llama-3.1-8B shape at batch 1 (100 s): bfloat16 against --weights int4 (and
   any of --formats-8b): tokens/s, the weight bytes a token reads (counted on the
   engine's modules), and the share of each format's own roofline; targets: int4
   >= 1.5x bfloat16 and >= 60% of the int4 roofline. First the int4 kernel alone on
   one 14336 x 4096 matrix: its error against the dequantized reference and its
   share of the copy bandwidth;
8. the loader on the 8B shape (120 s): a GGUF of that shape written to disk with
   random Q4_K blocks (Q6_K output, float32 norms: about Q4_K_M's 4.6 GB), then
   loaded in a fresh process per weight format (--loader-formats): seconds until
   the engine is ready, the host's peak resident memory (VmHWM, file pages
   included) and peak anonymous memory (sampled), and GPU memory after loading;
9. the GPU memory plan (60 s): benchmarks/gpu_memory_check.py in a fresh process
   (a draft's pool sized beside its target's, a prompt filling the context within
   the planned share, memory given back on close); its checks print ok or FAIL.
"""

from __future__ import annotations

import os
import sys

if "--device" in sys.argv and "cpu" in sys.argv:  # the dry run: Triton decides at import whether to interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import native  # noqa: E402,F401  (first: it sets OpenMP's wait policy before torch loads)
import torch  # noqa: E402

from localllm.core.requests import SamplingParams  # noqa: E402
from native.engine import EngineOptions, LLMEngine  # noqa: E402
from native.loader import LoadedWeights, from_state_dict  # noqa: E402

DEVICE = torch.device("cuda")
TINY = False  # --tiny: small shapes and short runs, so every section's code runs on a CPU in seconds
CARD = "?"  # the device's name, on every figure line
RESULTS: dict[str, object] = {}
JSON_PATH: Path | None = None
START = time.perf_counter()
BUDGET_S = 530.0

# Real shapes (from the published config.json files), random weights.
LLAMA_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
QWEN_7B = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-6,
)
LLAMA_8B = dict(  # Llama-3.1-8B
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
# --tiny keeps each shape's family, rope and tying, and shrinks the sizes (Q4_K needs rows of 256 multiples).
TINY_SIZES = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2)


def shape(spec: dict) -> dict:
    return {**spec, **TINY_SIZES} if TINY else spec


def scaled(real: int, tiny: int) -> int:
    """A count for the real run, or its small stand-in for the dry run."""
    return tiny if TINY else real


class Skip(Exception):
    """A section cannot run here (a feature that has not landed, no GPU): one line, not a traceback."""


def section(name: str, estimate_s: float):
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n== {name}", flush=True)
            left = BUDGET_S - (time.perf_counter() - START)
            if estimate_s > left:
                print(f"   skipped: about {estimate_s:.0f} s needed, {max(left, 0):.0f} s left of --budget-s", flush=True)
                RESULTS[f"{name}: skipped"] = "time budget"
                return
            free_memory()  # what an earlier section left, a failed one included, goes back first
            t0 = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Skip as why:
                print(f"   skipped: {why}", flush=True)
                RESULTS[f"{name}: skipped"] = str(why)
            except Exception as exc:  # a broken section must not hide the others
                traceback.print_exc()
                RESULTS[f"{name}: error"] = f"{type(exc).__name__}: {exc}"
            print(f"   ({time.perf_counter() - t0:.1f} s; estimate {estimate_s:.0f} s)", flush=True)
            if JSON_PATH is not None:  # after every section, so a run cut short still leaves its figures
                JSON_PATH.write_text(json.dumps(RESULTS, indent=2, default=str))
        return run
    return wrap


def figure(text: str) -> None:
    """A measured figure, with the card it was measured on."""
    print(f"   {text}  [{CARD}]", flush=True)


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def has_weights_option() -> bool:
    return any(f.name == "weights" for f in dataclasses.fields(EngineOptions))


def format_kwargs(fmt: str) -> dict:
    """EngineOptions' keywords for a weight format; Skip where `weights` has not landed and dtype cannot say it."""
    if has_weights_option():
        return {"weights": fmt}
    if fmt in ("bfloat16", "float32"):
        return {"dtype": fmt}
    raise Skip(f"EngineOptions.weights missing (needed for {fmt})")


def hf_model(spec: dict, dtype: torch.dtype, seed: int = 0):
    """A transformers model of this shape with random weights, built on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), config.to_dict()


def random_state_dict(spec: dict, dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """(HF config dict, state dict) of this shape with random weights made straight on the device: the model is
    built on the meta device only for its names and shapes, so nothing is initialised twice (16 GB at 8B)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    tensors = {}
    for name, meta in model.state_dict().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=dtype, device=DEVICE)
        else:
            tensors[name] = torch.randn(meta.shape, generator=gen, dtype=dtype, device=DEVICE).mul_(0.02)
    return config.to_dict(), tensors


def engine_from(model, config: dict, *, dtype: str, n_ctx: int, max_num_seqs: int, ignore_eos: bool = True,
                **extra) -> LLMEngine:
    """The native engine on the same weights (the state dict's tensors, shared, not copied where unfused)."""
    return engine_on(from_state_dict(config, dict(model.state_dict())), dtype=dtype, n_ctx=n_ctx,
                     max_num_seqs=max_num_seqs, ignore_eos=ignore_eos, **extra)


def engine_on(source: LoadedWeights | Path, *, n_ctx: int, max_num_seqs: int, ignore_eos: bool = True,
              **extra) -> LLMEngine:
    """The engine on weights in memory or a model file; `extra` are EngineOptions' (dtype, weights, ...)."""
    options = EngineOptions(device=DEVICE.type, n_ctx=n_ctx, max_num_seqs=max_num_seqs, load_tokenizer=False, **extra)
    engine = LLMEngine(source, options)
    if ignore_eos:
        engine.eos_ids = set()  # random weights: decode the requested length whatever comes out
    return engine


def sync_time(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter once (a tied embedding is read as the output layer)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    untied_embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight.data_ptr() != untied_embedding.data_ptr():
        total -= untied_embedding.numel() * untied_embedding.element_size()  # only a few rows are read
    return total


def engine_weight_bytes(engine: LLMEngine) -> tuple[int, int]:
    """(bytes a decode step reads, bytes resident), counted on the engine's own modules: parameters, buffers, and
    packed weights that say their size (a quantized weight's `nbytes`, held as an attribute or as a module). An
    untied input embedding table is resident but only a few of its rows are read per token."""
    seen: set[int] = set()
    resident = embedding = 0

    def tensors_of(m: torch.nn.Module, recurse: bool) -> list[torch.Tensor]:
        return [t for t in [*m.parameters(recurse=recurse), *m.buffers(recurse=recurse)] if t.device.type != "meta"]

    for name, module in engine.runner.model.named_modules():
        own = 0
        if isinstance(getattr(module, "nbytes", None), int):  # a packed weight that is a module: its own count
            own += 0 if id(module) in seen else module.nbytes
            seen.add(id(module))
            seen.update(t.data_ptr() for t in tensors_of(module, True))
        for t in tensors_of(module, False):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                own += t.numel() * t.element_size()
        for key, value in vars(module).items():  # QuantWeight, QuantEmbedding, ...: not tensors, but `nbytes`
            if not isinstance(value, (torch.Tensor, torch.nn.Module)) and isinstance(getattr(value, "nbytes", None), int) \
                    and id(value) not in seen:
                seen.add(id(value))
                own += value.nbytes
                if "embed" in key:
                    embedding += value.nbytes
        resident += own
        if name.endswith("embed_tokens"):
            embedding += own
    tied = bool(getattr(engine.config, "tie_embeddings", False))
    return resident - (0 if tied else embedding), resident


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 or n == 0 else f"{n / 1e6:.2f} MB"


def decode_rate(engine: LLMEngine, prompt: list[int], n_new: int, *, runs: int) -> float:
    """Tokens/s decoding n_new tokens alone (after the prompt and first token), median of `runs`."""
    greedy = SamplingParams(temperature=0, max_tokens=n_new)
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8))
    rates = []
    for _ in range(runs):
        engine.add_request("b1", prompt, greedy)
        engine.step()  # the prompt and the first token
        sync()
        t0 = time.perf_counter()
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        sync()
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def proc_status(field: str) -> int:
    """A size from /proc/self/status (VmHWM: peak resident, VmRSS, RssAnon), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# -- 1 --------------------------------------------------------------------------------------
@section("1. device", 5)
def device_facts() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    memory = torch.cuda.get_device_properties(DEVICE).total_memory if DEVICE.type == "cuda" else 0
    n = scaled(2**30, 2**26)
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        times.append(sync_time(lambda: b.copy_(a)))
    bandwidth = 2 * n / statistics.median(times)
    del a, b
    RESULTS["gpu"] = CARD
    RESULTS["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    figure(f"{CARD}, {memory / 2**30:.1f} GiB, torch {torch.__version__}, triton {triton_version}")
    figure(f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")


def bandwidth_bytes_per_s() -> float:
    if "copy_bandwidth_GBps" not in RESULTS:
        raise Skip("no copy bandwidth: run section 1 first")
    return float(RESULTS["copy_bandwidth_GBps"]) * 1e9


# -- 2 --------------------------------------------------------------------------------------
@section("2. kernels against the torch reference", 30)
def kernels() -> None:
    from native import kernel_check as k

    report = k.selfcheck(DEVICE)
    for line in report.lines():
        print("   " + line)
    RESULTS["kernels"] = report.as_dict()
    if not report.ok:
        raise AssertionError("a kernel disagrees with the reference")
    if hasattr(k, "time_decode_attention") and DEVICE.type == "cuda":
        for line in k.time_decode_attention(DEVICE):
            print("   " + line)


# -- 3 --------------------------------------------------------------------------------------
TINY_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
TINY_ARCHS = {
    "llama": dict(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "gemma3": dict(model_type="gemma3_text", head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0),
}


@section("3. correctness on the GPU (tiny random models, float32)", 45)
def correctness() -> None:
    failures = []
    for arch, extra in TINY_ARCHS.items():
        model, config = hf_model({**TINY_BASE, **extra}, torch.float32, seed=1)
        with torch.no_grad():  # norms and biases start constant: randomise them so their handling is tested
            gen = torch.Generator(device=DEVICE).manual_seed(1)
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    p.add_(torch.randn(p.shape, generator=gen, device=DEVICE) * 0.3)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (40, 5, 17, 33, 9, 60, 24, 48)]
        with torch.inference_mode():
            ref_logits = model(torch.tensor([prompts[0]], device=DEVICE)).logits[0].float()
            ref_tokens = model.generate(torch.tensor([prompts[0]], device=DEVICE), max_new_tokens=32,
                                        do_sample=False)[0, len(prompts[0]):].tolist()
        engine = engine_from(model, config, dtype="float32", n_ctx=256, max_num_seqs=8, block_size=4,
                             ignore_eos=False, kv_cache_bytes=64 * 2**20)
        logits = engine.prompt_logits(prompts[0]).float()
        rel = float(((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).max())  # NaN stays NaN
        greedy = SamplingParams(temperature=0, max_tokens=32)
        tokens = engine.generate([prompts[0]], greedy)[0]
        alone = [engine.generate([p], greedy)[0] for p in prompts]
        together = engine.generate(prompts, greedy)
        graphs = engine.runner.graphs is not None
        ok = rel < 1e-4 and tokens == ref_tokens and alone == together and engine.blocks.num_used == 0
        print(f"   {arch:8s} logits rel err {rel:.2e}  greedy equal {tokens == ref_tokens}  "
              f"batch-invariant {alone == together}  pool empty {engine.blocks.num_used == 0}  graphs {graphs}  "
              f"{'ok' if ok else 'FAIL'}")
        RESULTS[f"correctness_{arch}"] = dict(rel=rel, greedy=tokens == ref_tokens, batch=alone == together, graphs=graphs)
        if not ok:
            failures.append(arch)
        del engine, model
        free_memory()
    if failures:
        raise AssertionError(f"mismatch on {failures}")


# -- 4 --------------------------------------------------------------------------------------
@section("4. batch-1 decode, Llama-3.2-1B shape, bfloat16", 60)
def batch1() -> None:
    bandwidth = bandwidth_bytes_per_s()
    model, config = hf_model(shape(LLAMA_1B), torch.bfloat16)
    wbytes = weight_bytes(model)
    roofline = bandwidth / wbytes
    prompt = torch.randint(0, min(128000, config["vocab_size"]), (32,), generator=torch.Generator().manual_seed(0)).tolist()
    n_new = scaled(256, 16)
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=DEVICE)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        hf_t = statistics.median(
            sync_time(lambda: model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False))
            for _ in range(2)
        )
    hf_tps = n_new / hf_t
    tps, forward_ms, graphs = _batch1_decode(model, config, prompt, n_new, runs=3)
    figure(f"weights {gigabytes(wbytes)}; roofline {roofline:.0f} tok/s at {bandwidth / 1e9:.0f} GB/s")
    figure(f"native engine {tps:.0f} tok/s = {tps / roofline:.0%} of roofline (target >= 60%); "
           f"graphs {graphs}; model forward alone {forward_ms:.2f} ms/token")
    figure(f"transformers generate {hf_tps:.0f} tok/s; native / transformers {tps / hf_tps:.1f}x")
    RESULTS["batch1"] = dict(weights_GB=wbytes / 1e9, roofline_tps=roofline, native_tps=tps, share=tps / roofline,
                             transformers_tps=hf_tps, forward_ms=forward_ms, card=CARD)
    before = os.environ.get("LOCALLLM_NATIVE_FUSED")
    os.environ["LOCALLLM_NATIVE_FUSED"] = "off"  # read while the engine captures its graphs: a second engine
    try:
        off_tps, off_ms, _ = _batch1_decode(model, config, prompt, n_new, runs=2)
    finally:
        if before is None:
            del os.environ["LOCALLLM_NATIVE_FUSED"]
        else:
            os.environ["LOCALLLM_NATIVE_FUSED"] = before
    figure(f"fusions off (LOCALLLM_NATIVE_FUSED=off): {off_tps:.0f} tok/s = {off_tps / roofline:.0%} of roofline; "
           f"model forward alone {off_ms:.2f} ms/token; the fusions save {off_ms - forward_ms:.3f} ms/token "
           f"({tps / off_tps:.2f}x tok/s)")
    RESULTS["batch1"].update(unfused_tps=off_tps, unfused_share=off_tps / roofline, unfused_forward_ms=off_ms)
    del model
    free_memory()


def _batch1_decode(model, config: dict, prompt: list[int], n_new: int, *, runs: int) -> tuple[float, float, bool]:
    """A fresh engine's (tokens/s decoding n_new tokens alone, median of `runs`; graph forward ms; graphs used)."""
    engine = engine_from(model, config, dtype="bfloat16", n_ctx=scaled(4096, 256), max_num_seqs=scaled(64, 4))
    result = decode_rate(engine, prompt, n_new, runs=runs), _graph_forward_ms(engine), engine.runner.graphs is not None
    del engine  # its KV cache takes most of the GPU: gone before another engine is built
    free_memory()
    return result


def _graph_forward_ms(engine: LLMEngine) -> float:
    """GPU time of one batch-1 decode forward (graph replay, or eager), without the engine around it."""
    runner = engine.runner
    if runner.graphs is None:
        return float("nan")
    slots, tables = [[0], [0]], [[[0]]] * runner.graphs.groups  # block 0: the engine is idle by now
    runner.graphs.run([1], [0], slots, tables)
    t = statistics.median(sync_time(lambda: runner.graphs.run([1], [0], slots, tables)) for _ in range(20))
    return t * 1e3


# -- 5 --------------------------------------------------------------------------------------
class ByteTokenizer:
    """Random weights have no vocabulary: prompts are token ids, and every token streams as one byte."""

    vocab_size = 0
    bos_id = None
    eog_ids: set[int] = set()
    add_bos = False

    def encode(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        raise ValueError("random weights have no tokenizer: send token ids")

    def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)

    def piece(self, token: int) -> bytes:
        return b"x"

    def close(self) -> None:
        pass


def random_weights_backend(weights: LoadedWeights, *, n_ctx: int, max_num_seqs: int):
    """The real NativeBackend (engine thread, inbox, continuous batching, per-request event streams, the
    engine's sampler) on weights made in memory. Only loading differs: there is no file and no tokenizer."""
    try:
        from localllm.backends.native import NativeBackend, NativeOptions
        from localllm.core.modelinfo import ModelInfo
    except ImportError as exc:
        raise Skip(f"the native backend cannot be imported ({exc})") from None

    class RandomWeightsBackend(NativeBackend):
        def __init__(self, options: NativeOptions) -> None:
            c = weights.config
            info = ModelInfo(
                path=Path("random-weights"), format="memory", architecture=c.architecture, model_name=None,
                parameters=0, quantization="BF16", size_bytes=0, context_length=c.max_position, n_layers=c.n_layers,
                n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, hidden_size=c.hidden_size,
                vocab_size=c.vocab_size, sliding_window=None, sliding_window_layers=[], rope_freq_base=None,
                chat_template=None, bos_token_id=None, eos_token_id=None, bos_token=None, eos_token=None,
                add_bos_token=False,
            )
            self._weights: LoadedWeights | None = weights
            super().__init__("random-weights", info, options)

        def _load(self) -> None:
            o = self.options
            self._engine = LLMEngine(self._weights, EngineOptions(
                device=o.device, dtype=o.dtype, n_ctx=o.n_ctx, max_num_seqs=o.max_num_seqs,
                kv_cache_bytes=o.kv_cache_bytes, load_tokenizer=False))
            self._weights = None  # the engine took the tensors it needs
            self._engine.eos_ids = set()  # random weights: every request runs to max_tokens
            self._tokenizer = ByteTokenizer()
            self.n_ctx = self._engine.n_ctx
            self._publish_stats()

    return RandomWeightsBackend(NativeOptions(device=DEVICE.type, dtype="bfloat16", n_ctx=n_ctx,
                                              max_num_seqs=max_num_seqs))


def serve(backend, prompts: list[list[int]], params: SamplingParams, tag: str) -> tuple[float, int]:
    """(seconds, tokens generated) for all prompts sent at once through backend.generate, as a server would."""
    from localllm.core.requests import FinishEvent, GenerationRequest

    async def one(i: int, prompt: list[int]) -> int:
        async for event in backend.generate(GenerationRequest(f"{tag}-{i}", prompt, params)):
            if isinstance(event, FinishEvent):
                if event.reason == "error":
                    raise RuntimeError(f"request {tag}-{i} failed: {event.error}")
                return event.usage.completion_tokens
        return 0

    async def all_of_them() -> tuple[float, int]:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t0, sum(counts)

    return asyncio.run(all_of_them())


@section("5. 64 concurrent requests, default sampling, through NativeBackend, against transformers", 150)
def concurrent(skip_7b: bool) -> None:
    shapes = {"llama-1b": LLAMA_1B} if skip_7b else {"llama-1b": LLAMA_1B, "qwen2.5-7b": QWEN_7B}
    n_req, prompt_len, n_new = 64, scaled(128, 16), scaled(128, 16)
    d = SamplingParams()
    print(f"   default sampling: temperature {d.temperature}, top_k {d.top_k}, top_p {d.top_p}, min_p {d.min_p}; "
          f"{n_req} requests of {prompt_len} prompt tokens, {n_new} new tokens each", flush=True)
    for name, spec in shapes.items():
        model, config = hf_model(shape(spec), torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, min(100000, config["vocab_size"]), (n_req, prompt_len), generator=gen)
        sampling = dict(do_sample=True, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p,
                        pad_token_id=0)
        with torch.inference_mode():
            ids = prompts.to(DEVICE)
            model.generate(ids[:8], attention_mask=torch.ones_like(ids[:8]), max_new_tokens=4, min_new_tokens=4,
                           **sampling)
            mask = torch.ones_like(ids)
            hf_t = sync_time(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n_new,
                                                    min_new_tokens=n_new, **sampling))
        hf_tps = n_req * n_new / hf_t
        sd = dict(model.state_dict())
        del model, ids
        free_memory()
        weights = from_state_dict(config, sd)
        del sd
        backend = random_weights_backend(weights, n_ctx=scaled(2048, 256), max_num_seqs=n_req)
        del weights
        try:
            as_lists = [p.tolist() for p in prompts]
            serve(backend, as_lists[:4], SamplingParams(max_tokens=4), "warm")
            greedy_t, greedy_n = serve(backend, as_lists, SamplingParams(temperature=0, max_tokens=n_new), "greedy")
            t, n = serve(backend, as_lists, SamplingParams(max_tokens=n_new), "sampled")
        finally:
            backend.close()
        tps, greedy_tps = n / t, greedy_n / greedy_t
        goal = " (target >= 10x)" if name == "qwen2.5-7b" else ""
        figure(f"{name}: NativeBackend default sampling {tps:.0f} tok/s ({n} tokens in {t:.2f} s), greedy "
               f"{greedy_tps:.0f} tok/s (sampling costs {1 - tps / greedy_tps:.0%}); transformers sampling "
               f"{hf_tps:.0f} tok/s ({hf_t:.2f} s) -> {tps / hf_tps:.1f}x{goal}")
        RESULTS[f"concurrent_{name}"] = dict(native_sampled_tps=tps, native_greedy_tps=greedy_tps,
                                             transformers_sampled_tps=hf_tps, ratio=tps / hf_tps, card=CARD)
        del backend
        free_memory()


# -- 6 --------------------------------------------------------------------------------------
@section("6. predicted against measured VRAM (native engine, Llama-3.2-1B shape, bfloat16)", 40)
def memory() -> None:
    from localllm.fit.native_memory import predict_native_vram

    for ctx in (scaled(2048, 256), scaled(8192, 512)):
        free_memory()
        on_gpu = DEVICE.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if on_gpu else 0
        model, config = hf_model(shape(LLAMA_1B), torch.bfloat16)
        sd = dict(model.state_dict())
        del model
        weights = from_state_dict(config, sd)
        del sd
        predicted = predict_native_vram(weights.config, "cuda", ctx, parallel=1, max_num_seqs=1)
        options = EngineOptions(device=DEVICE.type, dtype="bfloat16", n_ctx=ctx, max_num_seqs=1,
                                load_tokenizer=False, kv_cache_bytes=predicted.kv_bytes)
        engine = LLMEngine(weights, options)
        del weights
        engine.eos_ids = set()
        prompt = torch.randint(0, min(100000, config["vocab_size"]), (ctx - 8,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))  # a full-context prompt: the peak
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in predicted.parts.items())
        del engine
        if not on_gpu:
            raise Skip(f"measuring needs torch.cuda's allocator (predicted at ctx {ctx}: "
                       f"{predicted.allocated_bytes / 2**30:.3f} GiB)")
        sync()
        measured = torch.cuda.max_memory_allocated() - base
        error = predicted.allocated_bytes / measured - 1
        figure(f"ctx {ctx}: predicted {predicted.allocated_bytes / 2**30:.3f} GiB, measured peak "
               f"{measured / 2**30:.3f} GiB ({error:+.1%}; goal within 10%)  [MiB: {parts}]")
        RESULTS[f"vram_ctx{ctx}"] = dict(predicted=predicted.allocated_bytes, measured=measured, error=error,
                                         parts=predicted.parts, card=CARD)
        free_memory()


# -- 7 --------------------------------------------------------------------------------------
@section("7. batch-1 decode, Llama-3.1-8B shape: bfloat16 against quantized weights", 100)
def eight_b(formats: list[str]) -> None:
    bandwidth = bandwidth_bytes_per_s()
    config, sd = random_state_dict(shape(LLAMA_8B), torch.bfloat16)
    prompt = torch.randint(0, config["vocab_size"], (32,), generator=torch.Generator().manual_seed(0)).tolist()
    n_new, runs = scaled(128, 16), scaled(3, 2)
    kv_bytes = scaled(2 * 2**30, 32 * 2**20)  # the same KV budget for every format
    if "int4" in formats:
        int4_kernel_alone(sd, bandwidth)
    rows: dict[str, dict] = {}
    for fmt in ["bfloat16", *[f for f in formats if f != "bfloat16"]]:
        try:
            kwargs = format_kwargs(fmt)
        except Skip as why:
            print(f"   {fmt}: skipped: {why}", flush=True)
            continue
        t0 = time.perf_counter()
        engine = engine_on(from_state_dict(config, dict(sd)), n_ctx=scaled(2048, 256), max_num_seqs=4,
                           kv_cache_bytes=kv_bytes, **kwargs)
        build_s = time.perf_counter() - t0
        read, resident = engine_weight_bytes(engine)
        tps = decode_rate(engine, prompt, n_new, runs=runs)
        roofline = bandwidth / read
        figure(f"{fmt:9s} {tps:7.1f} tok/s; a token reads {gigabytes(read)} of weights (resident "
               f"{gigabytes(resident)}); its roofline {roofline:.0f} tok/s -> {tps / roofline:.0%} of it "
               f"(engine built in {build_s:.0f} s)")
        rows[fmt] = dict(tps=tps, read_bytes=read, resident_bytes=resident, roofline_tps=roofline,
                         share=tps / roofline, card=CARD)
        del engine
        free_memory()
    RESULTS["batch1_8b"] = rows
    if "int4" in rows:
        q, b = rows["int4"], rows["bfloat16"]
        figure(f"int4 / bfloat16 decode {q['tps'] / b['tps']:.2f}x (target >= 1.5x); int4 at {q['share']:.0%} of "
               f"the int4 roofline (target >= 60%)")


def int4_kernel_alone(sd: dict, bandwidth: float) -> None:
    """The int4 matmul on one real-size matrix, outside the engine: error and bandwidth, so a slow decode can be
    told apart from a slow kernel. One line whatever happens; the section goes on."""
    try:
        from native.quant import QuantWeight, dequantize, from_float
    except ImportError:
        print("   int4 kernel alone: skipped: native.quant missing", flush=True)
        return
    try:
        w = next(v for k, v in sd.items() if k.endswith("layers.0.mlp.down_proj.weight"))
        values = from_float(w, "int4")
        packed = QuantWeight.pack(values, DEVICE)
        reference = dequantize(values).to(DEVICE)
        n, k = reference.shape
        for rows in (1, 16):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device=DEVICE)
            got, want = packed(x).float(), x.float() @ reference.T
            rel = float((got - want).norm() / want.norm())
            reps = 50
            packed(x)
            t = sync_time(lambda: [packed(x) for _ in range(reps)]) / reps
            dense = sync_time(lambda: [x @ w.T for _ in range(reps)]) / reps
            figure(f"int4 kernel alone, {rows:2d} row(s) x ({n} x {k}): rel err {rel:.1e} against the dequantized "
                   f"reference; {t * 1e6:.0f} us = {packed.nbytes / t / 1e9:.0f} GB/s ({packed.nbytes / t / bandwidth:.0%} "
                   f"of copy bandwidth); bfloat16 dense {dense * 1e6:.0f} us")
        del packed, reference
    except Exception as exc:
        print(f"   int4 kernel alone: failed: {type(exc).__name__}: {exc}", flush=True)


# -- 8 --------------------------------------------------------------------------------------
GGUF_TYPES = {"F32": (0, 1, 4), "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210)}  # name: (ggml id, values, bytes)
REPLY = "@@ "  # the load worker's answer starts with this (libraries may print on stdout too)


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value) -> bytes:
    if isinstance(value, str):
        return struct.pack("<I", 8) + _gguf_string(value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    return struct.pack("<II", 4, value)  # uint32


def llama3_rope_divisors(spec: dict) -> list[float]:
    """What llama.cpp stores as rope_freqs.weight for Llama 3.1's rope scaling: each frequency's divisor."""
    s, head_dim, theta = spec["rope_scaling"], spec["head_dim"], spec["rope_theta"]
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    divisors = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * theta ** (2 * i / head_dim)
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            divisors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return divisors


def _random_blocks(type_name: str, count: int):
    """Random quant blocks with small fixed scales (random scale bytes could be inf or NaN)."""
    import numpy as np

    _, _, size = GGUF_TYPES[type_name]
    blocks = np.random.default_rng(0).integers(0, 256, (count, size), dtype=np.uint8)
    f16 = lambda x: np.array([x], dtype=np.float16).view(np.uint8)  # noqa: E731
    if type_name == "Q4_K":
        blocks[:, 0:2], blocks[:, 2:4] = f16(2e-4), f16(1e-4)  # d, dmin
    elif type_name == "Q6_K":
        blocks[:, 208:210] = f16(2e-4)  # d
    return blocks


def write_random_gguf(path: Path, spec: dict) -> int:
    """A Llama GGUF of this shape with random Q4_K blocks (Q6_K output, float32 norms), written a tensor at a
    time from a pool of random blocks, so writing 4.6 GB takes seconds. Returns its size in bytes."""
    import numpy as np

    hidden, inter, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    heads, kv_heads, head_dim = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    tensors: list[tuple[str, tuple[int, ...], str]] = [
        ("token_embd.weight", (vocab, hidden), "Q4_K"),
        ("output_norm.weight", (hidden,), "F32"),
        ("output.weight", (vocab, hidden), "Q6_K"),
        ("rope_freqs.weight", (head_dim // 2,), "F32"),
    ]
    for i in range(spec["num_hidden_layers"]):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (hidden,), "F32"), (b + "ffn_norm.weight", (hidden,), "F32"),
                    (b + "attn_q.weight", (heads * head_dim, hidden), "Q4_K"),
                    (b + "attn_k.weight", (kv_heads * head_dim, hidden), "Q4_K"),
                    (b + "attn_v.weight", (kv_heads * head_dim, hidden), "Q4_K"),
                    (b + "attn_output.weight", (hidden, heads * head_dim), "Q4_K"),
                    (b + "ffn_gate.weight", (inter, hidden), "Q4_K"), (b + "ffn_up.weight", (inter, hidden), "Q4_K"),
                    (b + "ffn_down.weight", (hidden, inter), "Q4_K")]
    meta = {
        "general.architecture": "llama", "general.name": "random Llama-3.1-8B shape", "general.alignment": 32,
        "llama.block_count": spec["num_hidden_layers"], "llama.context_length": spec["max_position_embeddings"],
        "llama.embedding_length": hidden, "llama.feed_forward_length": inter, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": float(spec["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": float(spec["rms_norm_eps"]), "llama.vocab_size": vocab,
        "llama.rope.dimension_count": head_dim, "tokenizer.ggml.bos_token_id": spec["bos_token_id"],
        "tokenizer.ggml.eos_token_id": spec["eos_token_id"],
    }

    def nbytes(shape_: tuple[int, ...], type_name: str) -> int:
        _, values, size = GGUF_TYPES[type_name]
        return math.prod(shape_) // values * size

    pad = lambda n: -n % 32  # noqa: E731
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    header += b"".join(_gguf_string(k) + _gguf_value(v) for k, v in meta.items())
    offset = 0
    for name, shape_, type_name in tensors:
        header += _gguf_string(name) + struct.pack("<I", len(shape_)) + struct.pack(f"<{len(shape_)}Q", *reversed(shape_))
        header += struct.pack("<IQ", GGUF_TYPES[type_name][0], offset)
        offset += nbytes(shape_, type_name) + pad(nbytes(shape_, type_name))
    pools = {t: _random_blocks(t, 1 << 16) for t in ("Q4_K", "Q6_K")}
    with open(path, "wb") as f:
        f.write(header + b"\0" * pad(len(header)))
        for name, shape_, type_name in tensors:
            if type_name == "F32":
                values = llama3_rope_divisors(spec) if name == "rope_freqs.weight" else [1.0] * shape_[0]
                f.write(np.asarray(values, dtype=np.float32).tobytes())
            else:
                pool, left = pools[type_name], math.prod(shape_) // GGUF_TYPES[type_name][1]
                while left:
                    take = min(left, len(pool))
                    f.write(pool[:take].tobytes())
                    left -= take
            f.write(b"\0" * pad(nbytes(shape_, type_name)))
    return path.stat().st_size


@section("8. the loader, Llama-3.1-8B shape (GGUF of Q4_K blocks), a fresh process per weight format", 120)
def loader(formats: list[str], directory: str | None) -> None:
    spec = shape(LLAMA_8B)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "llama-3.1-8b-shape-q4_k.gguf"
        t0 = time.perf_counter()
        size = write_random_gguf(path, spec)
        figure(f"wrote {gigabytes(size)} in {time.perf_counter() - t0:.1f} s (the loads below read it from the "
               f"page cache)")
        limit = scaled(200, 120)
        for fmt in formats:
            command = [sys.executable, str(Path(__file__).resolve()), "--load-worker", str(path), "--load-format", fmt,
                       "--device", DEVICE.type] + (["--tiny"] if TINY else [])
            t0 = time.perf_counter()
            try:
                done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=limit)
            except subprocess.TimeoutExpired:
                print(f"   {fmt}: not ready after {limit} s: stopped", flush=True)
                RESULTS[f"loader_{fmt}"] = "timeout"
                continue
            answers = [json.loads(line[len(REPLY):]) for line in done.stdout.splitlines() if line.startswith(REPLY)]
            if done.returncode != 0 or not answers:
                print(f"   {fmt}: the load process failed (exit {done.returncode}; its error is above)", flush=True)
                RESULTS[f"loader_{fmt}"] = f"exit {done.returncode}"
                continue
            a = answers[-1]
            if "skipped" in a:
                print(f"   {fmt}: skipped: {a['skipped']}", flush=True)
                continue
            figure(f"{fmt:9s} ready in {a['load_s']:.1f} s (process {time.perf_counter() - t0:.0f} s); host peak "
                   f"{a['hwm'] / 2**30:.2f} GiB resident (VmHWM, mapped file pages included), anonymous peak "
                   f"{a['anon_peak'] / 2**30:.2f} GiB ({(a['anon_peak'] - a['anon_before']) / 2**30:+.2f} GiB over the "
                   f"process before loading); device memory {a['device_bytes'] / 2**30:.2f} GiB; compute "
                   f"{a['dtype']}; {a['tokens']} tokens decoded after")
            RESULTS[f"loader_{fmt}"] = {**a, "card": CARD}


def load_worker(path: str, fmt: str) -> int:
    """Section 8's child: load the GGUF into an engine once, report seconds and peak memory on stdout."""
    def reply(**values) -> None:
        print(REPLY + json.dumps(values), flush=True)

    try:
        kwargs = format_kwargs(fmt)
    except Skip as why:
        reply(skipped=str(why))
        return 0
    if DEVICE.type == "cuda":
        torch.empty(1, device=DEVICE)  # the CUDA context's own host memory is not the loader's
    anon_before, peak, done = proc_status("RssAnon"), [0], threading.Event()

    def watch() -> None:  # RssAnon has no high-water mark of its own: sample it
        while not done.is_set():
            peak[0] = max(peak[0], proc_status("RssAnon"))
            done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    engine = engine_on(Path(path), n_ctx=scaled(2048, 256), max_num_seqs=1, kv_cache_bytes=scaled(2**30, 16 * 2**20),
                       **kwargs)
    sync()
    load_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    hwm = proc_status("VmHWM")
    tokens = engine.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=4))[0]
    reply(load_s=load_s, hwm=hwm, anon_peak=max(peak[0], anon_before), anon_before=anon_before,
          device_bytes=torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0,
          dtype=str(engine.runner.dtype).removeprefix("torch."), tokens=len(tokens))
    return 0


@section("9. the GPU memory plan: a draft beside its target, the worst prompt, close (benchmarks/gpu_memory_check.py)", 60)
def memory_plan() -> None:
    script = Path(__file__).with_name("gpu_memory_check.py")
    argv = [sys.executable, str(script)] + (["--smoke"] if DEVICE.type == "cpu" else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.strip():
            figure(line.strip())
    if done.returncode != 0:
        print(done.stderr[-2000:], flush=True)
        raise RuntimeError(f"gpu_memory_check.py exited {done.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="1,4,7,5,8,9,3,2,6",
                        help="which sections, in this order (default: all, the issue's targets first)")
    parser.add_argument("--skip-7b", action="store_true", help="only the 1B shape in section 5 (saves ~90 s)")
    parser.add_argument("--formats-8b", default="int4", help="weight formats section 7 sets against bfloat16")
    parser.add_argument("--loader-formats", default="auto,bfloat16", help="weight formats section 8 loads with")
    parser.add_argument("--loader-dir", help="where section 8 writes its GGUF (default: the temporary folder)")
    parser.add_argument("--budget-s", type=float,
                        help="skip a section whose estimate would end past this many seconds (default 530; "
                             "none with --tiny)")
    parser.add_argument("--json", type=Path, help="also write the figures here (after every section)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only with --tiny: a dry run")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and short runs: check the script runs")
    parser.add_argument("--load-worker", help=argparse.SUPPRESS)  # section 8's child process
    parser.add_argument("--load-format", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global JSON_PATH, DEVICE, TINY, CARD, BUDGET_S
    JSON_PATH, DEVICE, TINY = args.json, torch.device(args.device), args.tiny
    BUDGET_S = args.budget_s if args.budget_s is not None else float("inf") if TINY else 530.0
    if args.load_worker:
        return load_worker(args.load_worker, args.load_format)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU (or --device cpu --tiny for a dry run)", file=sys.stderr)
        return 1
    if DEVICE.type == "cpu" and not TINY:
        print("on the CPU only the dry run makes sense: add --tiny", file=sys.stderr)
        return 1
    CARD = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU {platform.machine()} (dry run)"
    t0 = time.perf_counter()
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    run = {
        "1": device_facts,
        "2": kernels,
        "3": correctness,
        "4": batch1,
        "5": lambda: concurrent(args.skip_7b),
        "6": memory,
        "7": lambda: eight_b(split(args.formats_8b)),
        "8": lambda: loader(split(args.loader_formats), args.loader_dir),
        "9": memory_plan,
    }
    for key in split(args.sections):
        run[key]()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s  [{CARD}]")
    return 1 if any(k.endswith(": error") for k in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
