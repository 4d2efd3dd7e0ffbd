"""The `localllm` command: Ollama-style verbs over the store and the backends.

Exit codes: 0 success; 1 a user error, printed as one line (unknown model,
unreadable file, invalid value); 2 a usage error (argparse's own). A traceback
appears only with --debug.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from localllm import __version__
from localllm.cli.error_words import cli_message
from localllm.cli.output import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from localllm.core.errors import BadRequest, LocalLLMError
from localllm.core.units import SIZE_HELP, parse_size
from localllm.core.speculation import METHODS as SPECULATION_METHODS
from localllm.core.weight_formats import WEIGHT_FORMATS
from localllm.store.store import DEFAULT_CHAT_MODEL



# -- value types: a bad value is a user error (exit 1), not a usage error ------
def _number(kind: Callable[[str], float | int], flag: str, low: float | None = None, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise BadRequest(f"{flag} expects a{'n integer' if kind is int else ' number'}, got '{text}'") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise BadRequest(f"{flag} must be {bounds}, got {text}")
        return value

    return parse


def _int_list(flag: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise BadRequest(f"{flag} expects integers separated by commas, e.g. 1,4,8,16; got '{text}'") from None
        if not values or any(v < 1 for v in values):
            raise BadRequest(f"{flag} expects positive integers, e.g. 1,4,8,16; got '{text}'")
        return values

    return parse


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=_number(int, "--ctx", 16), help="context size in tokens (default: 4096 or less)")
    p.add_argument("--threads", type=_number(int, "--threads", 1), help="CPU threads (default: physical cores)")
    p.add_argument("--backend", choices=["auto", "llamacpp", "native", "remote"], default="auto")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    p.add_argument(
        "--kv-cache", type=_size("--kv-cache"), help=f"native engine: memory for its KV cache, e.g. 2GiB ({SIZE_HELP}; default: up to 1/4 of free RAM)"
    )
    p.add_argument(
        "--weights", choices=list(WEIGHT_FORMATS), default="auto",
        help="native engine: how linear weights are stored; int4/int8/fp8 compute in bfloat16 "
        "(default auto: the file's own 4/8 bits on CUDA, else bfloat16 where the CPU runs it fast, else float32)",
    )
    p.add_argument(
        "--speculative", choices=list(SPECULATION_METHODS), default=None,
        help="speculative decoding by prompt lookup (ngram) or a --draft model (default: off)",
    )
    p.add_argument("--draft", metavar="MODEL", help="the draft model for --speculative draft (must share the model's tokenizer)")
    p.add_argument(
        "--num-speculative-tokens", type=_number(int, "--num-speculative-tokens", 1, 16), help="tokens guessed per step (default 4 native; on llama.cpp the most, default 15)"
    )


def _add_remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the remote backend's upstream: an OpenAI base URL such as http://host:8000/v1")
    p.add_argument("--remote-api-key", help="the upstream's API key (default: $LOCALLLM_REMOTE_API_KEY)")


def _size(flag: str):
    def parse(text: str) -> int:
        return parse_size(text, flag)

    return parse


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_number(float, "--temperature", 0.0, 100.0))
    p.add_argument("--top-p", type=_number(float, "--top-p", 0.0, 1.0))
    p.add_argument("--top-k", type=_number(int, "--top-k", 0))
    p.add_argument("--min-p", type=_number(float, "--min-p", 0.0, 1.0))
    p.add_argument("--repeat-penalty", type=_number(float, "--repeat-penalty", 0.0))
    p.add_argument("--seed", type=_number(int, "--seed", 0, 2**32 - 1))
    p.add_argument("--max-tokens", type=_number(int, "--max-tokens", 1))
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print TTFT, token counts and tok/s to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localllm", description="Run language models on this machine.")
    parser.add_argument("--version", action="version", version=f"localllm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="download a model into the store (resumes an interrupted pull)")
    p.add_argument("model", help="catalog NAME[:QUANT], hf:ORG/REPO:QUANT, hf:ORG/REPO/FILE.gguf, hf:ORG/REPO or starter")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("ls", help="list installed models")
    p.add_argument("--json", action="store_true")
    p.add_argument("--catalog", action="store_true", help="list the curated catalog instead")

    p = sub.add_parser("rm", help="remove an installed model")
    p.add_argument("model")

    p = sub.add_parser("show", help="a model's architecture, size and template")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="generate from a prompt (or chat when no prompt is given)")
    p.add_argument("model")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    _add_sampling_flags(p)
    _add_load_flags(p)
    _add_remote_flags(p)

    p = sub.add_parser("chat", help="the chat app (a line chat with --plain or when output is not a terminal)")
    p.add_argument("model", nargs="?", default=DEFAULT_CHAT_MODEL, help=f"default: {DEFAULT_CHAT_MODEL}")
    p.add_argument("--system", help="system prompt (line chat)")
    p.add_argument("--plain", action="store_true", help="the line chat instead of the full-screen app")
    _add_sampling_flags(p)
    _add_load_flags(p)
    _add_remote_flags(p)

    p = sub.add_parser("serve", help="the OpenAI- and Ollama-compatible API on localhost")
    p.add_argument("model", nargs="?", help="load this model at start-up (others load when a request names them)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_number(int, "--port", 0, 65535), default=None, help="port (default: 11435; 0 picks a free one)")
    p.add_argument(
        "--api-key-file", metavar="PATH", default=None,
        help="require 'Authorization: Bearer KEY', the key being this file's first line (or set $LOCALLLM_API_KEY)",
    )
    p.add_argument("--api-key", default=None, help="the key itself (other local users can read it in the process list: prefer --api-key-file)")
    p.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback --host without an API key")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser pages from this origin (repeatable)")
    p.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="also answer requests addressed to this host name, e.g. a reverse proxy's (repeatable; always: localhost, 127.0.0.1, [::1])",
    )
    p.add_argument("--keep-alive", default="5m", help="unload a model after this long unused (5m, 1h, 0, -1 for never)")
    p.add_argument("--max-loaded", type=_number(int, "--max-loaded", 1), default=1, help="models in memory at once (default 1)")
    p.add_argument("--parallel", type=_number(int, "--parallel", 1), default=None, help="requests a model runs at once (default: 4 llama.cpp slots sharing the context; 16 on the native engine)")
    p.add_argument("--max-queue", type=_number(int, "--max-queue", 0), default=None, help="requests that may wait; more get 429 (default 64)")
    p.add_argument("--max-body", type=_size("--max-body"), default="8MiB", help=f"largest request body ({SIZE_HELP}; default 8MiB)")
    _add_load_flags(p)
    _add_remote_flags(p)

    p = sub.add_parser("fit", help="how a model would run here: backend, GPU layers, context, memory, and why")
    p.add_argument("model", help="an installed name, a .gguf path, a folder, or a catalog name / hf: reference not yet pulled")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ctx", type=_number(int, "--ctx", 16), help="context per sequence (default: the largest that fits, up to 8192)")
    p.add_argument("--parallel", type=_number(int, "--parallel", 1), default=1, help="sequences at once, each with the whole context")
    p.add_argument("--backend", choices=["auto", "llamacpp", "native"], default="auto")
    p.add_argument("--vram", type=_size("--vram"), help=f"plan for GPUs of this size, e.g. 12GiB ({SIZE_HELP}; 0: no GPU)")
    p.add_argument("--ram", type=_size("--ram"), help=f"plan for this much RAM available to the model, e.g. 16GiB ({SIZE_HELP})")
    p.add_argument("--gpus", type=_number(int, "--gpus", 0), help="plan for this many GPUs")
    p.add_argument("--compute-capability", help="plan for GPUs of this CUDA compute capability (default with --vram: 8.9)")
    p.add_argument("--gpu-name", help="plan for GPUs of this model, e.g. 'RTX 4090' (its memory bandwidth predicts the speed)")

    p = sub.add_parser(
        "bench", help="load-test an OpenAI-compatible server: TTFT, inter-token latency and tok/s by concurrency",
        conflict_handler="resolve",
    )
    p.add_argument("model", nargs="?", help="the model to load in-process (default: starter), or to name in requests to --url")
    p.add_argument("--concurrency", type=_int_list("--concurrency"), default=[1, 4, 8, 16], help="levels (default 1,4,8,16)")
    p.add_argument("--prompt-tokens", type=_number(int, "--prompt-tokens", 1), default=128, help="prompt length (default 128)")
    p.add_argument("--max-tokens", type=_number(int, "--max-tokens", 1), default=64, help="tokens per answer (default 64)")
    p.add_argument("--requests", type=_number(int, "--requests", 1), help="requests per level (default: the level, at least 8)")
    p.add_argument("--api-key", help="the benchmarked server's key (--url)")
    p.add_argument("--parallel", type=_number(int, "--parallel", 1), help="in-process server: slots (default: the largest level)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="draw throughput and TTFT against concurrency (needs matplotlib)")
    _add_load_flags(p)
    _add_remote_flags(p)
    p.add_argument(
        "--url", help="benchmark this server (an OpenAI base URL, e.g. http://127.0.0.1:8080/v1) instead of ours in-process; "
        "with --backend remote, ours runs in front of it"
    )

    p = sub.add_parser("info", help="this machine's CPU, memory, GPUs and engines")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("service", help="run the API server at login (systemd user unit or launchd agent)")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    return parser


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """Options before, between or after the positionals, as Ollama and llama.cpp users type them.

    argparse alone stops taking positionals once an option has been seen inside a
    verb (`run MODEL --temperature 0 "prompt"` would fail), and its intermixed mode
    refuses subcommands; so the top level reads its own options up to the verb, and
    the verb's parser reads the rest intermixed. `--debug` is accepted anywhere
    before `--`; after `--` everything is a positional (a prompt that starts with `-`).
    """
    parser = build_parser()
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    verbs = _verb_parsers(parser)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-") or a == "--"), len(argv))
    if at == len(argv) or argv[at] not in verbs:
        args = parser.parse_args(argv)  # help, version, no verb, or an unknown verb: argparse words it
    else:
        args = parser.parse_args(argv[:at])
        args = verbs[argv[at]].parse_intermixed_args(argv[at + 1 :], namespace=args)
        args.command = argv[at]
    args.debug = debug
    return args


def _verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parse_command_line(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        from localllm.cli import commands

        return getattr(commands, f"cmd_{args.command}")(args)
    except LocalLLMError as exc:
        return _fail(cli_message(exc), debug)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_OK
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", debug)
    except Exception as exc:  # the last line of defence: one line, never a traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)", debug)


def _fail(message: str, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first_line}", file=sys.stderr)
    return EXIT_ERROR


def _quiet_broken_pipe() -> None:
    """`localllm ls | head`: the reader left; say nothing more."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
