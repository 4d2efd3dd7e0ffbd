"""The native engine's GPU memory plan on a CUDA device: a draft beside its target, the worst prompt, unloading.

    python benchmarks/gpu_memory_check.py [--ctx 16384] [--smoke]

Two random-weight Llama-shaped models (a ~1B target and a small draft with the
same vocabulary) are saved as Hugging Face folders in a temporary directory;
nothing is downloaded. Prints one line per figure and exits 1 if a check fails:
1. target alone: what the profiling pass measured (weights, the activation
   peak of a full prompt chunk against the longest context) and its pool;
2. the worst prompt: one prompt filling the context, prefilled in chunks; the
   allocator's peak must stay within the planned share of the device;
3. target + draft (speculative decoding): both pools sized from one budget,
   both positive, all that is allocated within gpu_memory_utilization;
4. close: what is still allocated after closing, against before loading.
--smoke builds tiny models and runs the same steps on the CPU (no memory
figures): a check of this script, not of the GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import torch

from localllm.core.requests import SamplingParams
from localllm.core.speculation import SpeculationOptions
from native.engine import EngineOptions, LLMEngine

GiB = 2**30
SHAPES = {
    "target": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8),
    "draft": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def save_model(folder: Path, shape: str, vocab: int, ctx: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=ctx, **SHAPES[shape])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def pool_bytes(engine: LLMEngine) -> int:
    return engine.runner.kv_cache_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=16384)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--smoke checks the script on the CPU)")
        return 0
    device = "cpu" if args.smoke else "cuda"
    ctx = 256 if args.smoke else args.ctx
    vocab = 128 if args.smoke else 32000
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        target = save_model(Path(tmp) / "target", "tiny" if args.smoke else "target", vocab, ctx)
        draft = save_model(Path(tmp) / "draft", "tiny" if args.smoke else "draft", vocab, ctx)
        base = dict(device=device, dtype="float32" if args.smoke else "bfloat16", n_ctx=ctx, load_tokenizer=False)
        before = torch.cuda.memory_allocated() if not args.smoke else 0

        print("1. target alone")
        engine = LLMEngine(target, EngineOptions(**base))
        if not args.smoke:
            m = engine.runner.memory
            print(f"  weights {m.weights / GiB:.2f} GiB, activation peak {m.activation_peak / GiB:.2f} GiB "
                  f"(a chunk of {engine.runner.options.max_num_batched_tokens} against {ctx}), pool {pool_bytes(engine) / GiB:.2f} GiB")
        check(pool_bytes(engine) > 0, "the target's pool is sized")

        print("2. the worst prompt: the whole context in chunks")
        if not args.smoke:
            torch.cuda.reset_peak_memory_stats()
        prompt = [(i * 7 + 3) % vocab for i in range(ctx - 1)]
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
        if not args.smoke:
            free, total = torch.cuda.mem_get_info()
            peak = torch.cuda.max_memory_allocated()
            share = total * engine.options.gpu_memory_utilization
            print(f"  allocated peak {peak / GiB:.2f} GiB of a share of {share / GiB:.2f} GiB ({total / GiB:.1f} GiB device)")
            check(peak <= share, "the worst prompt stays within the planned share")
        engine.close()
        del engine
        gc.collect()

        print("3. target + draft")
        spec = SpeculationOptions("draft", draft=str(draft))
        engine = LLMEngine(target, EngineOptions(**base, speculation=spec))
        drafter = engine.speculator.proposer.engine
        t, d = pool_bytes(engine), pool_bytes(drafter)
        print(f"  target pool {t / GiB:.2f} GiB ({engine.blocks.num_blocks} blocks), "
              f"draft pool {d / GiB:.2f} GiB ({drafter.blocks.num_blocks} blocks)")
        check(t > 0 and d > 0, "both pools are positive")
        if not args.smoke:
            used = torch.cuda.memory_allocated()
            free, total = torch.cuda.mem_get_info()
            share = total * engine.options.gpu_memory_utilization
            print(f"  allocated after both loaded {used / GiB:.2f} GiB of a share of {share / GiB:.2f} GiB")
            check(used <= share, "weights and both pools within the share")
        out = engine.generate([prompt[:200]], SamplingParams(temperature=0, max_tokens=16))
        check(len(out[0]) == 16, "speculative decoding runs")
        engine.close()
        del engine, drafter
        gc.collect()

        print("4. close")
        if not args.smoke:
            after = torch.cuda.memory_allocated()
            free, total = torch.cuda.mem_get_info()
            print(f"  allocated {after / GiB:.3f} GiB (before loading {before / GiB:.3f} GiB), reserved "
                  f"{torch.cuda.memory_reserved() / GiB:.3f} GiB, device free {free / GiB:.1f} of {total / GiB:.1f} GiB")
            check(after - before < 64 * 2**20, "closing gave the memory back")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
