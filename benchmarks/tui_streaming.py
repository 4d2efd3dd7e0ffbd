"""Does the full-screen chat stream at engine speed? `localllm run --stats` against the real app in a terminal.

Both sides are the real command: `localllm run MODEL PROMPT --stats` prints the
engine's decode rate; `localllm chat MODEL` runs in a tmux terminal, gets the
same prompt typed in, and its reply's stats line (`512 tokens · 88.1 tok/s`) is
read off the screen. Same model, prompt, greedy sampling and token budget;
rounds alternate (run, app, run, app, ...) so machine noise hits both alike;
medians are reported. The app's main thread's CPU time during the reply (the
event loop, where Textual parses and paints) is shown too: unlike the rates,
it hardly depends on what else the machine runs. Both rates are the engine's own (tokens after the first
over the time after the first), so a UI that steals the engine's CPU shows up
as a lower app figure.

`--threads 1,2` adds variants of both with `--threads K`; without it each
uses its own default (llama.cpp's threads: one per physical core, in both).

    python benchmarks/tui_streaming.py [--model starter] [--tokens 512] [--rounds 5] [--threads 1,2]

Goal (issue 16): the app's tok/s >= 0.9x run's on the same machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROMPT = "Write the word ocean again and again, one per line, forever."
RUN_RATE = re.compile(r"output: (\d+) tokens, ([\d.]+) tok/s")
APP_RATE = re.compile(r"(\d+) tokens · ([\d.]+) tok/s")


def localllm(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def run_rate(home: Path, model: str, tokens: int, threads: int | None) -> tuple[int, float]:
    extra = ["--threads", str(threads)] if threads else []
    result = localllm(home, "run", model, PROMPT, "--temperature", "0", "--max-tokens", str(tokens), "--stats", *extra)
    found = RUN_RATE.search(result.stderr)
    if result.returncode != 0 or not found:
        raise SystemExit(f"run failed: {result.stderr.strip()}")
    return int(found.group(1)), float(found.group(2))


def app_rate(tmux: str, home: Path, model: str, tokens: int, threads: int | None) -> tuple[int, float, float]:
    session = f"tui-bench-{uuid.uuid4().hex[:8]}"
    extra = f" --threads {threads}" if threads else ""
    command = (f"LOCALLLM_HOME={home} {sys.executable} -m localllm chat {model} --temperature 0 "
               f"--max-tokens {tokens}{extra}")
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "100", "-y", "30", command], check=True)
    try:
        wait_for(tmux, session, lambda shown: f"model: {model}" in shown, timeout=120)
        app = app_pid(tmux, session)
        subprocess.run([tmux, "send-keys", "-t", session, "-l", PROMPT], check=True)
        ui_before, wall_before = main_thread_cpu_s(app), time.perf_counter()
        subprocess.run([tmux, "send-keys", "-t", session, "Enter"], check=True)
        shown = wait_for(tmux, session, APP_RATE.search, timeout=600)
        ui_share = (main_thread_cpu_s(app) - ui_before) / (time.perf_counter() - wall_before)
        found = APP_RATE.search(shown)
        subprocess.run([tmux, "send-keys", "-t", session, "C-q"], check=True)
        return int(found.group(1)), float(found.group(2)), ui_share
    finally:
        time.sleep(0.5)
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)


def app_pid(tmux: str, session: str) -> int:
    """The app's process: the pane's own, or its child when a shell started it."""
    pane = int(subprocess.run([tmux, "display", "-p", "-t", session, "#{pane_pid}"], capture_output=True, text=True).stdout)
    children = Path(f"/proc/{pane}/task/{pane}/children").read_text().split()
    return int(children[0]) if children else pane


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of the app's main thread: the event loop, where Textual parses and paints."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(tmux: str, session: str, ready, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        if ready(shown):
            return shown
        time.sleep(0.2)
    raise SystemExit(f"the app did not get there in {timeout:.0f} s; its screen:\n{shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="starter")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="", help="also run both with --threads K for each K, e.g. 1,2")
    parser.add_argument("--no-default", action="store_true", help="only the --threads variants")
    parser.add_argument("--home", type=Path, help="LOCALLLM_HOME to use (default: a fresh one; the model is pulled)")
    args = parser.parse_args()
    tmux = shutil.which("tmux")
    if not tmux:
        raise SystemExit("this benchmark runs the app in tmux; install tmux first")
    home = args.home or Path(tempfile.mkdtemp(prefix="tui-bench-"))
    if localllm(home, "pull", args.model, "--quiet").returncode != 0:
        raise SystemExit(f"could not pull {args.model}")
    variants: dict[str, int | None] = {} if args.no_default else {"run": None, "app": None}
    for k in filter(None, args.threads.split(",")):
        variants |= {f"run --threads {k}": int(k), f"app --threads {k}": int(k)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    ui: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, list[int]] = {name: [] for name in variants}
    print(f"{os.cpu_count()} CPUs; model {args.model}; {args.tokens} tokens; prompt {PROMPT!r}", flush=True)
    for r in range(args.rounds):
        for name, threads in variants.items():
            measure = run_rate if name.startswith("run") else lambda *a: app_rate(tmux, *a)
            n, rate, *ui_share = measure(home, args.model, args.tokens, threads)
            counts[name].append(n)
            rates[name].append(rate)
            ui[name] += ui_share
            share = f", UI thread {ui_share[0]:.0%} of a core" if ui_share else ""
            print(f"round {r + 1}: {name:<16} {n} tokens, {rate:.1f} tok/s{share}", flush=True)
    base = statistics.median(rates[next(iter(variants))])
    print()
    for name in variants:
        median = statistics.median(rates[name])
        share = f"  UI thread {statistics.median(ui[name]):.0%} of a core" if ui[name] else ""
        print(f"{name:<16} median {median:6.1f} tok/s  ({min(counts[name])}-{max(counts[name])} tokens)  "
              f"ratio to {next(iter(variants))} {median / base:.2f}{share}")


if __name__ == "__main__":
    main()
