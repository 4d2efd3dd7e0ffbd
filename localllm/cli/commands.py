"""What each CLI verb does, once its arguments are parsed (see parser.py)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from localllm.backends.base import Backend

from localllm.core.requests import GenerationRequest, SamplingParams
from localllm.cli.loading import load_options, open_model, pull_with_progress, sampling_from
from localllm.cli.output import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, print_json
from localllm.core.errors import BadRequest
from localllm.store.bundled import resolve_installing
from localllm.store.store import ModelStore
from localllm.core.units import human_bytes, human_count

if TYPE_CHECKING:
    from localllm.tui.conversations import ChatSettings


# -- store verbs -----------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> int:
    try:
        pull_with_progress(args.model, quiet=args.quiet)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # already explained on stderr
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    if args.catalog:
        return _ls_catalog(args)
    rows = []
    for m in ModelStore().list():
        info = m.info or {}
        rows.append(
            {
                "name": m.name,
                "size_bytes": m.size,
                "quantization": info.get("quantization"),
                "parameters": info.get("parameters"),
                "context_length": info.get("context_length"),
                "format": m.format,
                "source": m.source,
                "sha256": m.sha256,
                "added": m.added,
            }
        )
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no models installed; try `localllm pull starter`")
        return EXIT_OK
    table = [["NAME", "SIZE", "QUANT", "PARAMS", "CONTEXT", "ADDED"]]
    for r in rows:
        table.append(
            [
                r["name"],
                human_bytes(r["size_bytes"]),
                r["quantization"] or "-",
                human_count(r["parameters"]) if r["parameters"] else "-",
                str(r["context_length"] or "-"),
                r["added"][:10],
            ]
        )
    _print_table(table)
    return EXIT_OK


def _ls_catalog(args: argparse.Namespace) -> int:
    from localllm.store.catalog import default_catalog

    installed = {m.name for m in ModelStore().list()}
    rows = [
        {
            "name": e.name,
            "aliases": list(e.aliases),
            "description": e.description,
            "parameters": e.parameter_count,
            "context_length": e.context_length,
            "license": e.license,
            "default_quant": e.default_quant,
            "gguf_repo": e.gguf_repo,
            "source_repo": e.source_repo,
            "reasoning": e.reasoning,
            "experts": e.experts,
            "installed": e.name in installed,
        }
        for e in default_catalog().entries
    ]
    if args.json:
        print_json(rows)
        return EXIT_OK
    table = [["NAME", "PARAMS", "CONTEXT", "LICENSE", "GGUF REPOSITORY", ""]]
    for r in rows:
        table.append(
            [
                r["name"],
                human_count(r["parameters"]) + (" MoE" if r["experts"] else ""),
                str(r["context_length"]),
                r["license"],
                r["gguf_repo"],
                "installed" if r["installed"] else "",
            ]
        )
    _print_table(table)
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    manifest = ModelStore().remove(args.model)
    print(f"removed {manifest.name} ({human_bytes(manifest.size)})")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from localllm.core.chat_template import template_source
    from localllm.core.modelinfo import show_dict

    model = resolve_installing(ModelStore(), args.model, allow_paths=True)
    info = model.info()
    facts = show_dict(info, model.name, template_source(info.chat_template, info.architecture))
    if args.json:
        print_json(facts)
        return EXIT_OK
    for key, value in facts.items():
        if key == "size_bytes":
            value = f"{human_bytes(value)} ({value} bytes)"
        elif key == "parameters":
            value = f"{human_count(value)} ({value})"
        print(f"{key:<22} {value if value is not None else '-'}")
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    from localllm.cli import service

    print(getattr(service, args.action)())
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from localllm.core import hardware
    from localllm.cli.fit_command import installed_plans
    from localllm.fit.render import verdict

    hw = hardware.detect()
    plans = installed_plans(hw)
    facts = {"localllm": __import__("localllm").__version__, **hw.to_dict()}
    facts["fit"] = {name: plan.to_dict() for name, plan in plans.items()}
    if args.json:
        print_json(facts)
        return EXIT_OK
    print(f"localllm     {facts['localllm']}")
    print(f"os           {hw.os} {hw.os_release} ({hw.machine}), Python {hw.python}")
    print(f"cpu          {hw.cpu_model}: {hw.physical_cores} cores, {hw.logical_cores} threads; {' '.join(hw.cpu_flags)}")
    print(f"ram          {human_bytes(hw.ram_available_bytes)} available of {human_bytes(hw.ram_total_bytes)}")
    if hw.gpus:
        for g in hw.gpus:
            cc = f", compute {g.compute_capability}" if g.compute_capability else ""
            print(f"gpu {g.index}        {g.name}: {human_bytes(g.vram_free_bytes)} free of {human_bytes(g.vram_total_bytes)}{cc}")
    else:
        print("gpu          none found")
    lc = hw.llama_cpp
    if lc.installed:
        offload = ", ".join(n for n, on in (("CUDA", lc.cuda), ("Metal", lc.metal)) if on) or "CPU only"
        print(f"llama.cpp    llama-cpp-python {lc.version}: {offload}")
    else:
        print("llama.cpp    not installed")
    torch_line = f"{hw.torch_version}, CUDA {'available' if hw.torch_cuda_available else 'not available'}" if hw.torch_version else "not installed"
    print(f"torch        {torch_line}")
    missing = hardware.native_engine_missing()
    if missing:
        print(f"native       not installed (no {', '.join(missing)}); add it with: {hardware.NATIVE_ENGINE_INSTALL}")
    else:
        print("native       installed (--backend native)")
    for name, plan in plans.items():
        print(f"fit          {name}: {verdict(plan)}")
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    from localllm.cli.fit_command import cmd_fit as fit

    return fit(args)


# -- generation verbs ------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    params = sampling_from(args)
    prompt = _read_prompt(args.prompt)
    backend = open_model(args)
    try:
        if prompt is None:
            from localllm.cli.linechat import line_chat

            return line_chat(backend, params, show_stats=args.stats, raw=args.raw)
        return _complete_once(backend, prompt, params, raw=args.raw, show_stats=args.stats)
    finally:
        backend.close()


def cmd_chat(args: argparse.Namespace) -> int:
    from localllm.cli.linechat import line_chat

    params = sampling_from(args)
    if not args.plain and sys.stdout.isatty() and sys.stdin.isatty():
        return _chat_app(args, params)
    backend = open_model(args)
    try:
        return line_chat(backend, params, system=args.system, show_stats=args.stats)
    finally:
        backend.close()


def _chat_app(args: argparse.Namespace, params: SamplingParams) -> int:
    """The full-screen chat; the command's flags become the first chat's settings and open its models.

    The context is each chat's own setting (starting from --ctx), so the app's options leave it open."""
    from dataclasses import replace

    from localllm.tui.app import LocalLLMApp

    options = replace(load_options(args), n_ctx=None)
    LocalLLMApp(args.model, load=options, defaults=chat_defaults(args, params)).run()
    return EXIT_OK


def chat_defaults(args: argparse.Namespace, params: SamplingParams) -> ChatSettings:
    """The first chat's settings: every sampling flag, the system prompt and the context (--ctx)."""
    from localllm.tui.conversations import ChatSettings

    return ChatSettings.starting_from(params, system=args.system or "", n_ctx=args.ctx)


def _read_prompt(given: str | None) -> str | None:
    """The prompt argument, stdin when it is piped, both joined when both are given."""
    piped = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if given is not None and piped:
        return f"{given}\n\n{piped}"
    if given is not None:
        return given
    if piped is not None:
        if not piped.strip():
            raise BadRequest("the prompt read from stdin is empty")
        return piped
    return None


def _complete_once(backend: Backend, prompt: str, params: SamplingParams, *, raw: bool, show_stats: bool) -> int:
    from localllm.backends.llamacpp import new_request_id
    from localllm.cli.console import ThoughtsFirst, format_stats, stdout_writer, stream_to
    from localllm.core.reasoning import ReplyReasoning

    messages = None if raw else [{"role": "user", "content": prompt}]
    text = prompt if raw else backend.render_chat(messages)
    thoughts = None if raw else ReplyReasoning.of(backend.info.chat_template, text, params).stream()
    writer = ThoughtsFirst(thoughts) if thoughts is not None else stdout_writer()
    request = GenerationRequest(new_request_id(), text, params, templated=not raw, messages=messages)
    finish = stream_to(backend, request, writer)
    if isinstance(writer, ThoughtsFirst):
        writer.finish()  # a reasoning model's thoughts went out dimmed before the answer
    print(flush=True)
    if show_stats:
        print(format_stats(finish), file=sys.stderr)
    if finish.reason == "error":
        print(f"error: {finish.error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


# -- the load generator --------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from localllm.cli.bench_command import cmd_bench as bench

    return bench(args)


# -- the API server ----------------------------------------------------------------
def _serve_api_key(args: argparse.Namespace, environ) -> str | None:
    """The key from --api-key-file, $LOCALLLM_API_KEY or (with a warning) --api-key."""
    from localllm.server.auth import read_key_file

    if args.api_key is not None and args.api_key_file is not None:
        raise BadRequest("give the key once: --api-key-file or --api-key, not both")
    if args.api_key_file is not None:
        return read_key_file(args.api_key_file)
    if args.api_key is not None:
        print("warning: --api-key is visible to other users of this machine in the process list; "
              "use --api-key-file PATH or LOCALLLM_API_KEY instead", file=sys.stderr)
        return args.api_key
    return environ.get("LOCALLLM_API_KEY") or None


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from localllm.backends.remotes import load_routes
    from localllm.server.run import serve
    from localllm.server.settings import DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT, ServerSettings, parse_duration

    settings = ServerSettings(
        host=args.host,
        port=DEFAULT_PORT if args.port is None else args.port,
        model=args.model,
        api_key=_serve_api_key(args, os.environ),
        insecure_no_auth=args.insecure_no_auth,
        cors_origins=list(args.cors_origin),
        allowed_hosts=list(args.allowed_host),
        keep_alive_s=parse_duration(args.keep_alive, "--keep-alive"),
        max_loaded=args.max_loaded,
        parallel=DEFAULT_PARALLEL if args.parallel is None else args.parallel,
        max_queue=DEFAULT_MAX_QUEUE if args.max_queue is None else args.max_queue,
        max_body_bytes=args.max_body,
        load=load_options(args),
        remotes=load_routes(),
    )
    serve(settings)
    return EXIT_OK
