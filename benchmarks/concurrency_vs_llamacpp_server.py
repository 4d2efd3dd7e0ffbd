"""Concurrent requests: our `localllm serve` against llama-cpp-python's own server, side by side.

Both servers run at once as separate processes on the same model file, with
the same context size and threads; the load (localllm/cli/bench.py: streamed
/v1/completions, a 128-token prompt, 64-token answers at temperature 0.8)
alternates between them, round after round, so machine noise hits both
alike; medians are reported. llama-cpp-python's server gets
`--interrupt_requests False`: with its default a new request cuts the stream
that is running, and 7 of 8 concurrent streams end early.

A second part measures what prompt reuse buys a chat: the time to first token
of a second turn whose history is about 1,000 tokens, when the server has seen
the first turn (reuse) and when it has not (cold: a fresh history each round).

    python benchmarks/concurrency_vs_llamacpp_server.py [--model PATH] [--threads 2] [--ctx 4096] [--rounds 3]

Needs llama-cpp-python's server packages: pip install 'localllm[bench]'.
Goals (issue 8): at 8 concurrent requests >= 2.5x its aggregate output tok/s; at 1 request >= 0.95x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localllm.cli.bench import BenchConfig, run_level  # noqa: E402
from starter import starter_path  # noqa: E402  (benchmarks/ is the script's folder)

MODEL_NAME = "starter"
LEVELS = (1, 8)
WORDS = (
    "river mountain city garden window market letter music winter summer engine bridge forest island "
    "teacher doctor painter farmer station harbor castle village planet ocean desert valley lantern "
    "coffee bread apple orange silver golden quiet rapid gentle ancient modern famous northern southern"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"{self.name} exited with {self.process.returncode}:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wait_for(url: str, proc: Process, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.check()
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{proc.name} did not come up: {proc.text()[-3000:]}")


def start_ours(model: Path, args, log_dir: Path) -> tuple[Process, str]:
    proc = Process("localllm", [
        sys.executable, "-m", "localllm", "serve", str(model), "--port", "0", "--parallel", str(max(LEVELS)),
        "--ctx", str(args.ctx), "--threads", str(args.threads), "--keep-alive", "-1", "--backend", "llamacpp",
    ], log_dir)
    deadline = time.monotonic() + 120
    while not (match := re.search(r"localllm API on (http://\S+?)\s", proc.text())):
        proc.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"localllm serve did not start: {proc.text()}")
        time.sleep(0.1)
    base = match.group(1)
    wait_for(f"{base}/health", proc)
    return proc, f"{base}/v1"


def start_theirs(model: Path, args, log_dir: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process("llama_cpp.server", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", str(args.threads),
        "--n_threads_batch", str(args.threads), "--interrupt_requests", "False",
    ], log_dir)
    base = f"http://127.0.0.1:{port}/v1"
    wait_for(f"{base}/models", proc)
    return proc, base


def model_name(url: str) -> str:
    return httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]


# -- part 1: throughput by concurrency ------------------------------------------------------
def throughput(sides: dict[str, tuple[str, str]], args) -> dict[str, dict[int, list]]:
    results: dict[str, dict[int, list]] = {side: {level: [] for level in LEVELS} for side in sides}
    for rnd in range(args.rounds):
        order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
        for side in order:
            url, model = sides[side]
            for level in LEVELS:
                cfg = BenchConfig(url=url, model=model, concurrency=[level], prompt_tokens=args.prompt_tokens,
                                  max_tokens=args.max_tokens, requests=8)
                report = asyncio.run(run_level(cfg, level))
                results[side][level].append(report)
                print(f"  round {rnd + 1} {side:>16} x{level}: {report.aggregate_tok_s:6.1f} tok/s, "
                      f"TTFT p50 {report.ttft_p50_s * 1000:5.0f} ms, errors {report.errors}", file=sys.stderr)
                time.sleep(1.0)
    return results


# -- part 2: a chat's second turn ------------------------------------------------------------
def history_text(rng: random.Random, n_words: int) -> str:
    turns, words = [], 0
    while words < n_words:
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60)))
        turns.append(f"User: Tell me about {user}.\nAssistant: {reply}.\n")
        words += len(user.split()) + len(reply.split()) + 6
    return "".join(turns)


def complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, str, dict]:
    """(TTFT s, text, usage) of one streamed greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, ttft, text, usage = time.perf_counter(), 0.0, "", {}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                if choice.get("text"):
                    ttft = ttft or time.perf_counter() - started
                    text += choice["text"]
    return ttft, text, usage


def second_turns(sides: dict[str, tuple[str, str]], args) -> dict[str, dict[str, list[float]]]:
    rng = random.Random(8)
    out = {side: {"reuse": [], "cold": [], "prompt": [], "cached": []} for side in sides}
    question = "\nUser: And which of these would you visit first, and why?\nAssistant:"
    for rnd in range(args.rounds):
        for side in (list(sides) if rnd % 2 == 0 else list(reversed(sides))):
            url, model = sides[side]
            cold_history = history_text(rng, args.history_words)  # never seen by the server
            ttft, _, usage = complete(url, model, cold_history + question, 16)
            out[side]["cold"].append(ttft)
            warm_history = history_text(rng, args.history_words)
            first = warm_history + "User: Which one is the oldest?\nAssistant:"
            _, reply, _ = complete(url, model, first, 32)
            ttft, _, usage = complete(url, model, first + reply + question, 16)
            out[side]["reuse"].append(ttft)
            out[side]["prompt"].append(usage.get("prompt_tokens", 0))
            out[side]["cached"].append((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
            time.sleep(1.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the starter)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--history-words", type=int, default=810, help="about 1,000 tokens of history")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = args.model or starter_path()
    log_dir = Path(tempfile.mkdtemp(prefix="concurrency-bench-"))
    procs = []
    try:
        ours, ours_url = start_ours(model, args, log_dir)
        procs.append(ours)
        theirs, theirs_url = start_theirs(model, args, log_dir)
        procs.append(theirs)
        sides = {"localllm": (ours_url, model_name(ours_url)), "llama_cpp.server": (theirs_url, model_name(theirs_url))}
        for url, name in sides.values():  # warm-up: first-touch page faults, thread start-up
            complete(url, name, "Hello", 4)
        print(f"model {model.name}, ctx {args.ctx}, threads {args.threads}, {args.rounds} interleaved rounds; "
              f"logs in {log_dir}", file=sys.stderr)
        results = throughput(sides, args)
        turns = second_turns(sides, args)
    finally:
        for proc in procs:
            proc.stop()
    report(results, turns, args)


def report(results, turns, args) -> None:
    med = statistics.median
    rows = []
    for level in LEVELS:
        ours = [r.aggregate_tok_s for r in results["localllm"][level]]
        theirs = [r.aggregate_tok_s for r in results["llama_cpp.server"][level]]
        rows.append({
            "concurrency": level,
            "localllm_tok_s": med(ours),
            "llama_cpp_server_tok_s": med(theirs),
            "ratio": med(ours) / med(theirs) if med(theirs) else float("inf"),
            "localllm_ttft_p50_ms": med([r.ttft_p50_s for r in results["localllm"][level]]) * 1000,
            "llama_cpp_server_ttft_p50_ms": med([r.ttft_p50_s for r in results["llama_cpp.server"][level]]) * 1000,
            "localllm_itl_p50_ms": med([r.itl_p50_s for r in results["localllm"][level]]) * 1000,
            "llama_cpp_server_itl_p50_ms": med([r.itl_p50_s for r in results["llama_cpp.server"][level]]) * 1000,
            "errors": sum(r.errors for side in results.values() for r in side[level]),
        })
    chat = {side: {"cold_ttft_ms": med(t["cold"]) * 1000, "reuse_ttft_ms": med(t["reuse"]) * 1000,
                   "prompt_tokens": med(t["prompt"]), "cached_tokens": med(t["cached"])} for side, t in turns.items()}
    if args.json:
        print(json.dumps({"throughput": rows, "second_turn": chat}, indent=2))
        return
    print(f"\n{args.prompt_tokens}-token prompts, {args.max_tokens}-token answers, 8 requests per level; medians of {args.rounds} rounds")
    print(f"{'conc':>4} | {'localllm tok/s':>14} | {'llama_cpp.server':>16} | {'ratio':>6} | {'TTFT p50 ours/theirs':>21} | {'ITL p50 ours/theirs':>20} | errors")
    for r in rows:
        print(f"{r['concurrency']:>4} | {r['localllm_tok_s']:>14.1f} | {r['llama_cpp_server_tok_s']:>16.1f} | {r['ratio']:>5.2f}x | "
              f"{r['localllm_ttft_p50_ms']:>8.0f} / {r['llama_cpp_server_ttft_p50_ms']:>6.0f} ms | "
              f"{r['localllm_itl_p50_ms']:>7.1f} / {r['llama_cpp_server_itl_p50_ms']:>6.1f} ms | {r['errors']}")
    print("\nsecond turn of a chat, TTFT (greedy, streamed /v1/completions)")
    for side, c in chat.items():
        counts = (f"history {c['prompt_tokens']:.0f} tokens, {c['cached_tokens']:.0f} reused"
                  if c["prompt_tokens"] else "its stream reports no usage")
        print(f"  {side:>16}: cold {c['cold_ttft_ms']:.0f} ms, after the first turn {c['reuse_ttft_ms']:.0f} ms ({counts})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
