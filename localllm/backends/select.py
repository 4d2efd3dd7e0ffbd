"""Choosing and opening a backend for a model.

Today every model is a GGUF file and llama.cpp runs it; the fit planner and
the native and remote engines join here later, behind the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.backends.base import Backend
from localllm.errors import BadRequest
from localllm.store.store import ResolvedModel

BACKENDS = ("auto", "llamacpp", "native", "remote")


@dataclass
class LoadOptions:
    backend: str = "auto"
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    verbose: bool = False


def open_backend(model: ResolvedModel, options: LoadOptions | None = None) -> Backend:
    options = options or LoadOptions()
    if options.backend not in BACKENDS:
        raise BadRequest(f"unknown backend '{options.backend}'; choose one of: {', '.join(BACKENDS)}")
    if options.backend in ("native", "remote"):
        raise BadRequest(f"the {options.backend} backend is not available yet; use --backend llamacpp")
    info = model.info()
    if info.format != "gguf":
        raise BadRequest(f"model '{model.name}' is {info.format}; only GGUF models run on llama.cpp")
    if options.n_threads is not None and options.n_threads < 1:
        raise BadRequest("threads must be >= 1")
    from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    return LlamaCppBackend(
        model.name,
        info,
        LlamaCppOptions(
            n_ctx=options.n_ctx,
            n_threads=options.n_threads,
            n_gpu_layers=options.n_gpu_layers,
            verbose=options.verbose,
        ),
    )
