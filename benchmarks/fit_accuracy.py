"""The fit planner's predicted RAM against what a process really takes, llama.cpp and the native engine.

    python benchmarks/fit_accuracy.py [--model PATH] [--contexts 2048,8192,32768]
                                      [--native-contexts 2048,8192] [--fill full|short] [--threads 2]

Each measurement runs in a process of its own: it imports llama-cpp-python
(every `localllm run` does, to probe the hardware), reads its RSS, resets the
kernel's high-water mark (/proc/self/clear_refs), opens the model the way
`localllm run --backend B --ctx N` does (backends/select.py, so the plan is
followed), sends one request, and reads the high-water mark (VmHWM). The
growth is HWM minus the RSS before loading: load plus request, at the peak.

--fill full (the default) makes that request fill the context (prompt of
context - 4 random tokens, 3 generated): the peak a long prompt reaches, which
the planner must never underestimate. --fill short sends 8 tokens: what a
process takes right after loading. On the CPU, memory counts once touched
(llama.cpp reserves a 514.5 MiB compute buffer for the starter that a request
barely touches), so the two differ.

Predicted: `plan_fit(info, this machine without GPUs, Wishes(context, backend)).ram_bytes`.
Goal (issue 7): within +-10% everywhere, and never below a full-context peak.
Linux only (VmHWM). A 32k full-context prompt on the starter takes many
minutes on two cores: run it when the machine is otherwise quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from starter import starter_path  # noqa: E402  (benchmarks/ is the script's folder)

MIB = 1024 * 1024


def status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


def measure(model: Path, backend: str, context: int, fill: str, threads: int) -> dict:
    """Runs in the child: open the model as `localllm run` would, one request, the peak growth."""
    import asyncio
    import random

    import llama_cpp  # noqa: F401  (loaded by every run's hardware probe: part of the baseline)

    from localllm.core.requests import GenerationRequest, SamplingParams
    from localllm.backends.select import LoadOptions, open_backend
    from localllm.store.store import ResolvedModel

    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from here
    started = time.perf_counter()
    engine = open_backend(ResolvedModel(model.name, model), LoadOptions(backend=backend, n_ctx=context, n_threads=threads))
    loaded = time.perf_counter()
    after_load = status_bytes("VmRSS")
    rng = random.Random(0)
    n_prompt = context - 4 if fill == "full" else 8
    vocab = engine.info.vocab_size
    prompt = [engine.info.bos_token_id or 0] + [rng.randrange(1000, vocab - 1000) for _ in range(n_prompt - 1)]

    async def one_request() -> int:
        generated = 0
        request = GenerationRequest("fit-accuracy", prompt, SamplingParams(temperature=0, max_tokens=3))
        async for event in engine.generate(request):
            generated += 1
        return generated

    asyncio.run(one_request())
    peak = status_bytes("VmHWM")
    engine.close()
    return {
        "backend": backend,
        "context": context,
        "fill": fill,
        "prompt_tokens": n_prompt,
        "load_growth": after_load - before,
        "peak_growth": peak - before,
        "load_s": loaded - started,
        "request_s": time.perf_counter() - loaded,
    }


def predict(model: Path, backend: str, context: int) -> dict:
    from localllm.fit import HardwareWishes, Wishes, hypothetical, plan_fit
    from localllm.fit.machine import probe
    from localllm.core.modelinfo import read_model_info

    hw = hypothetical(probe(), HardwareWishes(vram=0))  # this CPU, no GPU
    plan = plan_fit(read_model_info(model), hw, Wishes(context=context, backend=backend))
    return {"ram_bytes": plan.ram_bytes, "parts": plan.ram_parts, "fits": plan.fits}


def run_child(model: Path, backend: str, context: int, fill: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--model", str(model), "--contexts", str(context),
           "--fill", fill, "--threads", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{backend} at {context}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--contexts", default="2048,8192,32768", help="llama.cpp contexts")
    parser.add_argument("--native-contexts", default="2048,8192", help="native engine contexts ('' to skip)")
    parser.add_argument("--fill", choices=["full", "short"], default="full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["llamacpp", "native"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    model = args.model or starter_path()

    if args.child:
        print(json.dumps(measure(model, args.child, int(args.contexts), args.fill, args.threads)))
        return 0

    jobs = [("llamacpp", int(c)) for c in args.contexts.split(",") if c]
    jobs += [("native", int(c)) for c in args.native_contexts.split(",") if c]
    print(f"model {model.name}, fill {args.fill}, {args.threads} threads, each row its own process")
    print(f"{'backend':<9} {'context':>7} {'predicted':>10} {'load':>9} {'peak':>9} {'error':>7}  time")
    rows = []
    for backend, context in jobs:
        predicted = predict(model, backend, context)
        try:
            measured = run_child(model, backend, context, args.fill, args.threads)
        except RuntimeError as exc:
            print(f"{backend:<9} {context:>7}  failed: {exc}")
            continue
        error = predicted["ram_bytes"] / measured["peak_growth"] - 1
        rows.append({**measured, "predicted": predicted["ram_bytes"], "parts": predicted["parts"], "error": error})
        print(
            f"{backend:<9} {context:>7} {predicted['ram_bytes'] / MIB:>6.0f} MiB {measured['load_growth'] / MIB:>5.0f} MiB "
            f"{measured['peak_growth'] / MIB:>5.0f} MiB {error:>+7.1%}  load {measured['load_s']:.1f} s, "
            f"request {measured['request_s']:.1f} s ({measured['prompt_tokens']} prompt tokens)",
            flush=True,
        )
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    under = [r for r in rows if r["error"] < 0]
    print(f"worst error {worst:.1%} (goal 10%); {'no' if not under else len(under)} underestimate(s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
