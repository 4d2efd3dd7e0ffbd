"""The native engine on a CUDA GPU: correctness, kernels, and speed against the roofline and transformers.

    python benchmarks/gpu_check.py [--skip-7b] [--json FILE]

One script, a few minutes, nothing downloaded: every model is built with
random weights of a real shape directly on the GPU (transformers builds it,
the engine takes the same tensors), so it runs on a machine without network.

Sections, each printed as it finishes (a failing section says why and the rest go on):
1. device: name, versions, and the measured device-to-device copy bandwidth
   (bytes read + bytes written per second), the roofline's denominator;
2. kernels: the Triton paged-decode and KV-store kernels against the torch
   reference on random shapes (GQA 1/4/8, windows, block sizes, ragged lengths),
   the fused residual add + RMSNorm (plain and Gemma's) at real hidden sizes, and
   the decode step's q/k norm + rotary + KV-store kernel at real head shapes;
3. correctness: tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma 3 in float32
   on the GPU: prompt logits against transformers (relative error), 32 greedy
   tokens equal, and 8 prompts of different lengths giving the same tokens
   alone and batched (CUDA graphs and the decode kernel in the path);
4. batch-1 decode, Llama-3.2-1B shape in bfloat16: tokens/s against the
   roofline (weight bytes / copy bandwidth) and transformers `generate`; then
   a second engine built with LOCALLLM_NATIVE_FUSED=off (the residual add +
   norm and the q/k norm + rotary + KV-store kernels split into their ops), so
   the figures show what those fusions buy;
5. 64 concurrent requests (128-token prompts, 128 new tokens each), 1B and
   Qwen2.5-7B shapes: aggregate tokens/s against transformers `generate`
   running the same 64 as one batch (equal lengths: no padding waste for it);
6. memory: the fit planner's predicted VRAM for the engine against
   torch.cuda.max_memory_allocated, when the planner provides the function.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from localllm.core.requests import SamplingParams  # noqa: E402
from native.engine import EngineOptions, LLMEngine  # noqa: E402
from native.loader import from_state_dict  # noqa: E402

DEVICE = torch.device("cuda")
RESULTS: dict[str, object] = {}
JSON_PATH: Path | None = None

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


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n== {name}", flush=True)
            gc.collect()  # what an earlier section left, a failed one included, goes back first
            torch.cuda.empty_cache()
            t0 = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # a broken section must not hide the others
                traceback.print_exc()
                RESULTS[f"{name}: error"] = f"{type(exc).__name__}: {exc}"
            print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
            if JSON_PATH is not None:  # after every section, so a run cut short still leaves its figures
                JSON_PATH.write_text(json.dumps(RESULTS, indent=2, default=str))
        return run
    return wrap


def hf_model(spec: dict, dtype: torch.dtype, seed: int = 0):
    """A transformers model of this shape with random weights, built on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), config.to_dict()


def engine_from(model, config: dict, *, dtype: str, n_ctx: int, max_num_seqs: int, ignore_eos: bool = True,
                **extra) -> LLMEngine:
    """The native engine on the same weights (the state dict's tensors, shared, not copied where unfused)."""
    weights = from_state_dict(config, dict(model.state_dict()))
    options = EngineOptions(device=DEVICE.type, dtype=dtype, n_ctx=n_ctx, max_num_seqs=max_num_seqs,
                            load_tokenizer=False, **extra)
    engine = LLMEngine(weights, options)
    if ignore_eos:
        engine.eos_ids = set()  # random weights: decode the requested length whatever comes out
    return engine


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
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


# -- 1 --------------------------------------------------------------------------------------
@section("1. device")
def device_facts() -> None:
    props = torch.cuda.get_device_properties(DEVICE)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    n = 2**30
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        times.append(sync_time(lambda: b.copy_(a)))
    bandwidth = 2 * n / statistics.median(times)
    del a, b
    RESULTS["gpu"] = props.name
    RESULTS["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    print(f"   {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, triton {triton_version}")
    print(f"   device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")


# -- 2 --------------------------------------------------------------------------------------
@section("2. kernels against the torch reference")
def kernels() -> None:
    from native import kernel_check as k

    report = k.selfcheck(DEVICE)
    for line in report.lines():
        print("   " + line)
    RESULTS["kernels"] = report.as_dict()
    if not report.ok:
        raise AssertionError("a kernel disagrees with the reference")
    if hasattr(k, "time_decode_attention"):
        for line in k.time_decode_attention(DEVICE):
            print("   " + line)


# -- 3 --------------------------------------------------------------------------------------
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
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


@section("3. correctness on the GPU (tiny random models, float32)")
def correctness() -> None:
    failures = []
    for arch, extra in TINY_ARCHS.items():
        model, config = hf_model({**TINY, **extra}, torch.float32, seed=1)
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
        gc.collect()
        torch.cuda.empty_cache()
    if failures:
        raise AssertionError(f"mismatch on {failures}")


# -- 4 --------------------------------------------------------------------------------------
@section("4. batch-1 decode, Llama-3.2-1B shape, bfloat16")
def batch1(bandwidth_gbps: float) -> None:
    model, config = hf_model(LLAMA_1B, torch.bfloat16)
    wbytes = weight_bytes(model)
    roofline = bandwidth_gbps * 1e9 / wbytes
    prompt = torch.randint(0, 128000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    n_new = 256
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=DEVICE)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        hf_t = statistics.median(
            sync_time(lambda: model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False))
            for _ in range(2)
        )
    hf_tps = n_new / hf_t
    tps, forward_ms, graphs = _batch1_decode(model, config, prompt, n_new, runs=3)
    print(f"   weights {wbytes / 1e9:.2f} GB; roofline {roofline:.0f} tok/s at {bandwidth_gbps:.0f} GB/s")
    print(f"   native engine {tps:.0f} tok/s = {tps / roofline:.0%} of roofline (goal >= 60%); "
          f"graphs {graphs}; model forward alone {forward_ms:.2f} ms/token")
    print(f"   transformers generate {hf_tps:.0f} tok/s; native / transformers {tps / hf_tps:.1f}x")
    RESULTS["batch1"] = dict(weights_GB=wbytes / 1e9, roofline_tps=roofline, native_tps=tps, share=tps / roofline,
                             transformers_tps=hf_tps, forward_ms=forward_ms)
    before = os.environ.get("LOCALLLM_NATIVE_FUSED")
    os.environ["LOCALLLM_NATIVE_FUSED"] = "off"  # read while the engine captures its graphs: a second engine
    try:
        off_tps, off_ms, _ = _batch1_decode(model, config, prompt, n_new, runs=2)
    finally:
        if before is None:
            del os.environ["LOCALLLM_NATIVE_FUSED"]
        else:
            os.environ["LOCALLLM_NATIVE_FUSED"] = before
    print(f"   fusions off (LOCALLLM_NATIVE_FUSED=off): {off_tps:.0f} tok/s = {off_tps / roofline:.0%} of roofline; "
          f"model forward alone {off_ms:.2f} ms/token; the fusions save {off_ms - forward_ms:.3f} ms/token "
          f"({tps / off_tps:.2f}x tok/s)")
    RESULTS["batch1"].update(unfused_tps=off_tps, unfused_share=off_tps / roofline, unfused_forward_ms=off_ms)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def _batch1_decode(model, config: dict, prompt: list[int], n_new: int, *, runs: int) -> tuple[float, float, bool]:
    """A fresh engine's (tokens/s decoding n_new tokens alone, median of `runs`; graph forward ms; graphs used)."""
    engine = engine_from(model, config, dtype="bfloat16", n_ctx=4096, max_num_seqs=64)
    greedy = SamplingParams(temperature=0, max_tokens=n_new)
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8))
    rates = []
    for _ in range(runs):
        engine.add_request("b1", prompt, greedy)
        engine.step()  # the prompt and the first token
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        rates.append(steps / (time.perf_counter() - t0))
    result = statistics.median(rates), _graph_forward_ms(engine), engine.runner.graphs is not None
    del engine  # its KV cache takes most of the GPU: gone before another engine is built
    gc.collect()
    torch.cuda.empty_cache()
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
@section("5. 64 concurrent requests against transformers generate")
def concurrent(skip_7b: bool) -> None:
    shapes = {"llama-1b": LLAMA_1B} if skip_7b else {"llama-1b": LLAMA_1B, "qwen2.5-7b": QWEN_7B}
    n_req, prompt_len, n_new = 64, 128, 128
    for name, spec in shapes.items():
        model, config = hf_model(spec, torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 100000, (n_req, prompt_len), generator=gen)
        with torch.inference_mode():
            ids = prompts.to(DEVICE)
            model.generate(ids[:8], attention_mask=torch.ones_like(ids[:8]), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=0)
            mask = torch.ones_like(ids)
            hf_t = sync_time(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                                    do_sample=False, pad_token_id=0))
        hf_tps = n_req * n_new / hf_t
        sd = dict(model.state_dict())
        del model, ids
        gc.collect()
        torch.cuda.empty_cache()
        weights = from_state_dict(config, sd)
        del sd
        options = EngineOptions(device="cuda", dtype="bfloat16", n_ctx=2048, max_num_seqs=n_req, load_tokenizer=False)
        engine = LLMEngine(weights, options)
        engine.eos_ids = set()
        greedy = SamplingParams(temperature=0, max_tokens=n_new)
        engine.generate([p.tolist() for p in prompts[:4]], SamplingParams(temperature=0, max_tokens=4))
        t = sync_time(lambda: engine.generate([p.tolist() for p in prompts], greedy))
        tps = n_req * n_new / t
        print(f"   {name}: native {tps:.0f} tok/s ({t:.2f} s), transformers {hf_tps:.0f} tok/s ({hf_t:.2f} s) "
              f"-> {tps / hf_tps:.1f}x (goal >= 10x)")
        RESULTS[f"concurrent_{name}"] = dict(native_tps=tps, transformers_tps=hf_tps, ratio=tps / hf_tps)
        del engine, weights
        gc.collect()
        torch.cuda.empty_cache()


# -- 6 --------------------------------------------------------------------------------------
@section("6. predicted against measured VRAM (native engine, Llama-3.2-1B shape, bfloat16)")
def memory() -> None:
    from localllm.fit.native_memory import predict_native_vram

    for ctx in (2048, 8192):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model, config = hf_model(LLAMA_1B, torch.bfloat16)
        sd = dict(model.state_dict())
        del model
        weights = from_state_dict(config, sd)
        del sd
        predicted = predict_native_vram(weights.config, "cuda", ctx, parallel=1, max_num_seqs=1)
        options = EngineOptions(device="cuda", dtype="bfloat16", n_ctx=ctx, max_num_seqs=1,
                                load_tokenizer=False, kv_cache_bytes=predicted.kv_bytes)
        engine = LLMEngine(weights, options)
        del weights
        engine.eos_ids = set()
        prompt = torch.randint(0, 100000, (ctx - 8,), generator=torch.Generator().manual_seed(0)).tolist()
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))  # a full-context prompt: the peak
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        error = predicted.allocated_bytes / measured - 1
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in predicted.parts.items())
        print(f"   ctx {ctx}: predicted {predicted.allocated_bytes / 2**30:.3f} GiB, measured peak "
              f"{measured / 2**30:.3f} GiB ({error:+.1%}; goal within 10%)  [MiB: {parts}]")
        RESULTS[f"vram_ctx{ctx}"] = dict(predicted=predicted.allocated_bytes, measured=measured, error=error,
                                         parts=predicted.parts)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-7b", action="store_true", help="only the 1B shape in section 5")
    parser.add_argument("--json", type=Path, help="also write the figures here (after every section)")
    parser.add_argument("--sections", default="1,2,3,4,5,6", help="which sections, in this order (default: all)")
    args = parser.parse_args()
    global JSON_PATH
    JSON_PATH = args.json
    if not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    run = {
        "1": device_facts,
        "2": kernels,
        "3": correctness,
        "4": lambda: batch1(float(RESULTS.get("copy_bandwidth_GBps", 3000.0))),
        "5": lambda: concurrent(args.skip_7b),
        "6": memory,
    }
    for key in args.sections.split(","):
        run[key.strip()]()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 1 if any(k.endswith(": error") for k in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
