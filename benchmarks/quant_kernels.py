"""CPU matmul timings of quantized weights (native/quant) against float32 and bfloat16.

For each weight shape (out x in) and row count, times x @ W.T through:
float32 and bfloat16 dense weights (native.layers.linear.linear, the engine's
float path), and QuantWeight int4 / int8 / fp8 with bfloat16 activations.
The ways are interleaved round after round so machine noise hits all alike;
medians are printed with each way's ratio to float32 and the bytes it holds.

    python benchmarks/quant_kernels.py [--rounds 9] [--threads N]

A way stops being timed once it has used --budget seconds (at least 3 calls):
fp8 on the CPU runs torch's reference `_scaled_mm`, seconds per call on the
large shape (fp8 is meant for GPUs of compute capability 8.9+).

Shapes: 262144 x 640 (the starter's output projection) and 640 x 2048 (its
down projection), at 1 and 8 rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from native.layers.linear import linear  # noqa: E402
from native.quant import QuantWeight, from_float  # noqa: E402

SHAPES = [(262_144, 640), (640, 2048)]
ROWS = [1, 8]


def measure(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timing per way and case")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, median ms")
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.05
        w_bf16 = w.to(torch.bfloat16)
        ways = {
            "float32": (lambda x, w=w: linear(x, w), torch.float32, w.numel() * 4),
            "bfloat16": (lambda x, w=w_bf16: linear(x, w), torch.bfloat16, w.numel() * 2),
        }
        for fmt in ("int4", "int8", "fp8"):
            qw = QuantWeight.pack(from_float(w, fmt), torch.device("cpu"))
            ways[fmt] = (qw, torch.bfloat16, qw.nbytes)
        del w
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen)
            inputs = {name: x.to(dtype) for name, (_, dtype, _) in ways.items()}
            times: dict[str, list[float]] = {name: [] for name in ways}
            for name, (fn, _, _) in ways.items():
                measure(fn, inputs[name])  # warm up
            for _ in range(args.rounds):
                for name, (fn, _, _) in ways.items():
                    if len(times[name]) < 3 or sum(times[name]) < args.budget:
                        times[name].append(measure(fn, inputs[name]))
            base = statistics.median(times["float32"])
            print(f"\n{n} x {k}, {rows} row{'s' if rows > 1 else ''}")
            for name, (_, _, nbytes) in ways.items():
                median = statistics.median(times[name])
                calls = len(times[name])
                print(
                    f"  {name:9s} {median * 1e3:9.3f} ms  {base / median:5.2f}x float32  "
                    f"{nbytes / 2**20:7.1f} MiB  ({calls} calls)"
                )
        del ways


if __name__ == "__main__":
    main()
