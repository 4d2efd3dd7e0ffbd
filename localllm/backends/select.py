"""Choosing and opening a backend for a model.

`auto` runs GGUF files on llama.cpp and Hugging Face folders on the native
engine; `--backend native` runs either on the native engine. `--backend remote`
(or a RemoteModel, from the server's routing file) opens no file at all: the
model runs on an upstream OpenAI-compatible server. Local backends follow the
fit planner (localllm/fit/): `auto` becomes the backend it picks, with its GPU
layers and context; a named backend that cannot fit is refused with its reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from localllm.backends.base import Backend
from localllm.core.errors import BadRequest
from localllm.core.modelinfo import ModelInfo
from localllm.core.speculation import SpeculationOptions
from localllm.core.weight_formats import WEIGHT_FORMATS
from localllm.backends.remotes import RemoteModel
from localllm.store.store import ResolvedModel

BACKENDS = ("auto", "llamacpp", "native", "remote")


@dataclass
class LoadOptions:
    backend: str = "auto"
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    verbose: bool = False
    kv_cache_bytes: int | None = None  # native engine: memory for its KV cache (None: its default)
    weights: str = "auto"  # native engine: how linear weights are stored (core/weight_formats.py)
    speculation: SpeculationOptions = field(default_factory=SpeculationOptions)  # its draft: a name or a path
    n_parallel: int | None = None  # llama.cpp: requests decoded together, sharing n_ctx (None: its default)
    max_num_seqs: int | None = None  # native engine: sequences batched together, an explicit --parallel (None: its default)
    remote_url: str | None = None  # remote backend: the upstream's OpenAI base URL, e.g. http://host:8000/v1
    remote_api_key: str | None = None
    remote_timeout_s: float | None = None  # remote backend: longest wait for the upstream (None: its default)


def with_n_ctx(options: LoadOptions, n_ctx: int | None) -> LoadOptions:
    """The one place a front end decides a model's runtime context: this use's own (a request's
    num_ctx, a chat's setting), else the configured one (--ctx), else None and the fit planner
    chooses (localllm/fit/follow.py)."""
    return options if n_ctx is None else replace(options, n_ctx=n_ctx)


def open_backend(model: ResolvedModel, options: LoadOptions | None = None) -> Backend:
    options = options or LoadOptions()
    if options.backend not in BACKENDS:
        raise BadRequest(f"unknown backend '{options.backend}'; choose one of: {', '.join(BACKENDS)}")
    options = _weights_choice(options)
    if options.backend == "remote" or isinstance(model, RemoteModel):
        if options.speculation.enabled:
            raise BadRequest("speculative decoding runs in a local engine; a remote model is decoded by its upstream")
        return _open_remote(model, options)
    if options.n_threads is not None and options.n_threads < 1:
        raise BadRequest("threads must be >= 1")
    info = model.info()
    draft = _draft_info(str(options.speculation.draft)) if options.speculation.draft else None
    if options.backend != "llamacpp" or info.format == "gguf":
        from localllm.fit.follow import follow_plan  # backend, GPU layers and context from the fit planner

        options = follow_plan(model.name, info, options, draft=draft)
    if options.backend == "native" or (options.backend == "auto" and info.format != "gguf"):
        return _open_native(model, info, options, draft)
    if info.format != "gguf":
        raise BadRequest(f"model '{model.name}' is {info.format}; only GGUF models run on llama.cpp")
    from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    llama_options = LlamaCppOptions(
        n_ctx=options.n_ctx,
        n_threads=options.n_threads,
        n_gpu_layers=options.n_gpu_layers,
        verbose=options.verbose,
        speculation=_llamacpp_speculation(options.speculation, draft),
    )
    if options.n_parallel is not None:
        llama_options.n_parallel = options.n_parallel
    return LlamaCppBackend(model.name, info, llama_options)


def _weights_choice(options: LoadOptions) -> LoadOptions:
    """--weights picks the native engine's storage; llama.cpp runs the file's own quantization."""
    if options.weights not in WEIGHT_FORMATS:
        raise BadRequest(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got '{options.weights}'")
    if options.weights == "auto":
        return options
    if options.backend == "llamacpp":
        raise BadRequest(f"--weights {options.weights} is for the native engine; llama.cpp runs the file's own "
                         "quantization (drop --weights, or use --backend native)")
    if options.backend == "remote":
        raise BadRequest(f"--weights {options.weights} is for the native engine; a remote model is stored by its upstream")
    return replace(options, backend="native") if options.backend == "auto" else options


def _llamacpp_speculation(speculation: SpeculationOptions, draft: ModelInfo | None) -> SpeculationOptions | None:
    """llama.cpp's speculative decoding settings; None when off. The draft must be a GGUF too."""
    if not speculation.enabled:
        return None
    if draft is not None and draft.format != "gguf":
        raise BadRequest(f"the draft model '{speculation.draft}' is {draft.format}; llama.cpp needs a GGUF draft")
    return _with_draft_file(speculation, draft).validate()


def _with_draft_file(speculation: SpeculationOptions, draft: ModelInfo | None) -> SpeculationOptions:
    """The settings an engine gets: the draft named by its file's path."""
    return replace(speculation, draft=str(draft.path)) if draft is not None else speculation


def _draft_info(name: str) -> ModelInfo:
    """The draft model's file: a name in the store, or a path."""
    from localllm.store.bundled import resolve_installing
    from localllm.store.store import ModelStore

    return resolve_installing(ModelStore(), name, allow_paths=True).info()


def _open_native(model: ResolvedModel, info, options: LoadOptions, draft: ModelInfo | None) -> Backend:
    """The native PyTorch engine (GGUF files and Hugging Face folders); torch is imported only now."""
    from localllm.backends.native import NativeBackend, NativeOptions

    native_options = NativeOptions(
        n_ctx=options.n_ctx,
        n_threads=options.n_threads,
        kv_cache_bytes=options.kv_cache_bytes,
        weights=options.weights,
        verbose=options.verbose,
        speculation=_with_draft_file(options.speculation, draft),
    )
    if options.max_num_seqs is not None:
        native_options.max_num_seqs = options.max_num_seqs
    return NativeBackend(model.name, info, native_options)


def _open_remote(model: ResolvedModel, options: LoadOptions) -> Backend:
    """A model on an upstream server; httpx is imported only now."""
    from localllm.backends.remote import RemoteBackend, RemoteOptions

    if not options.remote_url:
        raise BadRequest("--backend remote needs --url, the upstream's OpenAI base URL (e.g. http://host:8000/v1)")
    remote = RemoteOptions(
        url=options.remote_url,
        model=model.upstream_name if isinstance(model, RemoteModel) else model.name,
        api_key=options.remote_api_key,
        n_ctx=options.n_ctx,
    )
    if options.remote_timeout_s is not None:
        remote.read_timeout_s = options.remote_timeout_s
    return RemoteBackend(model.name, remote)
