"""What one more row costs in a llama.cpp step: the figures behind the llama.cpp speculation policy.

    .venv/bin/python benchmarks/llamacpp_row_cost.py [--threads N] [--rows 12] [--repeats 9]

On the starter model (Q4_K_M, 262,144-token vocabulary), after a 40-token
prompt, one `llama_decode` of R tokens of one sequence is timed (median of
`--repeats`, the rows removed from the cache between tries), once with
logits for every row (what checking R - 1 guesses needs) and once with
logits for the last row only (what a prompt chunk needs). Printed per R:
both times and their ratio to a single row. The difference between the two
columns is the output layer, computed once per row with logits.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from starter import starter_path  # noqa: E402

PROMPT = (b"The lighthouse at the end of the harbour was built in 1871 from granite quarried on the island. "
          b"Its lamp, first fed with whale oil and later with paraffin, could be seen twenty miles out to sea.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import _internals

    silence = llama_cpp.llama_log_callback(lambda *_: None)
    llama_cpp.llama_log_set(silence, ctypes.c_void_p(0))
    model = _internals.LlamaModel(path_model=str(starter_path()), params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 4096, 512, 512
    params.n_threads = params.n_threads_batch = args.threads
    params.no_perf = True
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    prompt = model.tokenize(PROMPT, True, False)

    def decode(tokens: list[int], start: int, all_logits: bool) -> float:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        began = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - began

    decode(prompt, 0, False)
    following = prompt[1:] + prompt  # any tokens will do: the cost does not depend on which
    print(f"starter model (Q4_K_M) on llama.cpp, {args.threads} threads, after {len(prompt)} prompt tokens, "
          f"median of {args.repeats}")
    print(f"{'rows':>4} {'all logits ms':>13} {'x 1 row':>7} {'last logits ms':>14}")
    base = 0.0
    for rows in range(1, args.rows + 1):
        times = {}
        for all_logits in (True, False):
            tries = []
            for _ in range(args.repeats):
                llama_cpp.llama_memory_seq_rm(memory, 0, len(prompt), -1)
                tries.append(decode(following[:rows], len(prompt), all_logits))
            times[all_logits] = statistics.median(tries) * 1000
        base = base or times[True]
        print(f"{rows:>4} {times[True]:>13.1f} {times[True] / base:>7.2f} {times[False]:>14.1f}", flush=True)
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
