"""`localllm bench`: which server to measure, the levels, and the report.

Without --url the command starts our own API in this process (on a free
loopback port, with the load flags given, one slot per concurrent request of
the largest level) and measures it through HTTP like any other server. With
--url it measures that server directly; with --url and --backend remote, ours
runs in front of it, so the difference is what our hop costs.

In process, each level also shows what the fit planner predicted for the
engine it chose (localllm/fit/speed.py): one request's decode tok/s and all
requests' together, beside the measured ones, so a prediction can be checked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx

from localllm.cli.bench import BenchConfig, format_table, plot, run_bench, to_json
from localllm.cli.output import EXIT_ERROR, EXIT_OK, print_json
from localllm.core.errors import BackendError, BadRequest

LOAD_TIMEOUT_S = 600.0


def cmd_bench(args: argparse.Namespace) -> int:
    levels: list[int] = args.concurrency
    if args.plot:
        require_matplotlib()  # before minutes of measuring, not after
    if args.url and args.backend not in ("auto", "remote"):
        raise BadRequest(f"--url measures that server directly; --backend {args.backend} is for the in-process server")
    server = None
    if args.url and args.backend != "remote":
        url = args.url.rstrip("/")
        model = args.model or first_model(url, args.api_key)
        api_key = args.api_key
    else:
        server, url, model = start_in_process(args, levels)
        api_key = None
    cfg = BenchConfig(
        url=url,
        model=model,
        concurrency=levels,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        requests=args.requests,
        api_key=api_key,
    ).validate()
    prediction = predict(args, model) if server is not None else None
    try:
        if not args.json:
            where = "in-process" if server is not None else url
            print(f"benchmarking {model} ({where}): levels {','.join(map(str, levels))}, "
                  f"{cfg.prompt_tokens}-token prompts, {cfg.max_tokens}-token answers", file=sys.stderr)
        reports = asyncio.run(run_bench(cfg))
    finally:
        if server is not None:
            server.stop()
    if prediction is not None:
        label, speed = prediction
        for r in reports:
            total = speed.throughput_tok_s(r.concurrency)
            r.predicted_request_tok_s = round(total / r.concurrency, 1)  # each of the requests decoding together
            r.predicted_aggregate_tok_s = round(total, 1)
        if not args.json:
            print(f"predicted by the fit plan for {label}: {speed.decode_tok_s():.1f} tok/s for one request "
                  f"({speed.read_bytes / 1e9:.2f} GB read a token)", file=sys.stderr)
    if args.plot:
        plot(reports, args.plot, f"{model}: {cfg.max_tokens}-token answers")
    if args.json:
        print_json({
            "url": url if server is None else None,
            "model": model,
            "in_process": server is not None,
            "prompt_tokens": cfg.prompt_tokens,
            "max_tokens": cfg.max_tokens,
            "predicted_for": prediction[0] if prediction else None,
            "levels": to_json(reports),
        })
    else:
        print(format_table(reports))
    failed_everywhere = all(r.errors == r.requests for r in reports)
    return EXIT_ERROR if failed_everywhere else EXIT_OK


def predict(args: argparse.Namespace, model: str):
    """(label, SpeedModel) of the engine the fit plan picks for `model` with these flags; None when it cannot say.

    The plan is made for one request at a time (as loading makes it), on this
    machine with the thread count asked for, so the CPU's bandwidth is measured
    with as many threads as the engine uses.
    """
    from dataclasses import replace

    from localllm.cli.loading import load_options
    from localllm.core.errors import LocalLLMError
    from localllm.fit.machine import probe
    from localllm.fit.planner import Wishes, plan_fit
    from localllm.fit.settings import FitSettings
    from localllm.store.bundled import resolve_installing
    from localllm.store.store import ModelStore

    options = load_options(args)
    if options.backend == "remote":
        return None
    try:
        info = resolve_installing(ModelStore(), model, allow_paths=True).info()
        hw = probe()
        if options.n_threads:
            hw = replace(hw, physical_cores=options.n_threads)
        plan = plan_fit(info, hw, Wishes(options.n_ctx, 1, options.backend, options.weights), FitSettings.from_env())
    except (LocalLLMError, OSError, ValueError):
        return None
    chosen = next((c for c in plan.candidates if c.plan is plan), None)
    return (chosen.label, chosen.speed) if chosen is not None else None


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadRequest("--plot needs matplotlib: pip install 'localllm[bench]'") from None


def first_model(url: str, api_key: str | None) -> str:
    """The first model a server lists at /models: what to name when the user named none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/models", headers=headers, timeout=30)
        response.raise_for_status()
        data = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise BadRequest(f"cannot list the models of {url}: {exc}; name one: localllm bench MODEL --url {url}") from None
    if not data:
        raise BadRequest(f"{url} lists no models; name one: localllm bench MODEL --url {url}")
    return str(data[0]["id"])


def start_in_process(args: argparse.Namespace, levels: list[int]):
    """Our API on a free loopback port with the model loaded: (server, OpenAI base URL, model name)."""
    from localllm.cli.loading import load_options, resolve_or_pull
    from localllm.server.run import ServerThread
    from localllm.server.settings import DEFAULT_MAX_QUEUE, ServerSettings

    ref = args.model or "starter"
    if args.backend != "remote":
        resolve_or_pull(ref)  # a catalog name not installed yet is pulled first, as `run` does
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        model=ref,
        keep_alive_s=None,
        parallel=args.parallel or max(levels),
        max_queue=max(DEFAULT_MAX_QUEUE, max(levels)),
        load=load_options(args),
    )
    server = ServerThread(settings)
    base = server.start()
    try:
        model = wait_until_loaded(base)
    except BaseException:
        server.stop()
        raise
    return server, f"{base}/v1", model


def wait_until_loaded(base: str) -> str:
    """Poll /health until the start-up model is loaded; its name."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        response = httpx.get(f"{base}/health", timeout=30)
        body = response.json()
        if response.status_code == 200 and body.get("loaded"):
            return body["loaded"][0]
        if body.get("status") == "failed":
            raise BackendError(f"the model did not load: {body.get('error')}")
        time.sleep(0.2)
    raise BackendError(f"the model did not load within {LOAD_TIMEOUT_S:.0f} s")
