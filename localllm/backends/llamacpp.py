"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level bindings.

This file is the front-end side: it validates and tokenizes a request on the
caller's thread, queues it for the engine, and turns the engine's events into
the caller's async stream. The engine (llamacpp_engine.py) runs on its own
thread, the only one that touches the model's context, and decodes every
active request together, one `llama_decode` per step (continuous batching),
with prompt reuse across requests (llamacpp_slots.py).

Context and slots: the KV cache holds `n_ctx` tokens in all, shared by the
`n_parallel` slots (llama.cpp's unified cache). One request may use the whole
context; when many long requests together outgrow it, idle caches go first and
then the youngest request waits, to be recomputed, until there is room.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator

from localllm.core.requests import EngineStats, Event, FinishEvent, GenerationRequest
from localllm.backends.grammar import check_grammar
from localllm.backends.llamacpp_embedder import EmbedJob, embed_context_size
from localllm.backends.llamacpp_engine import Control, EngineConfig, Job, LlamaCppEngine
from localllm.core.speculation import SpeculationOptions
from localllm.core.chat_template import ChatTemplate, resolve_template
from localllm.core.errors import BackendError, BadRequest
from localllm.core.hardware import default_threads
from localllm.core.modelinfo import ModelInfo
from localllm.engine_kit.llama_glue import route_llama_logs

DEFAULT_CONTEXT = 4096
DEFAULT_BATCH = 512
DEFAULT_PARALLEL = 4  # slots when nobody chose (the fit plan will choose later)
DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per step while others generate: ~0.4 s on 2 CPU cores
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class LlamaCppOptions:
    n_ctx: int | None = None  # tokens in the KV cache, shared by all slots; None: min(DEFAULT_CONTEXT, trained)
    n_threads: int | None = None  # None: physical cores
    n_gpu_layers: int = 0
    n_batch: int = DEFAULT_BATCH  # tokens per step
    n_parallel: int = DEFAULT_PARALLEL  # requests decoded together
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    verbose: bool = False
    speculation: SpeculationOptions | None = None  # prompt lookup or a draft GGUF (None: off)


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, model_name: str, info: ModelInfo, options: LlamaCppOptions | None = None) -> None:
        self.model_name = model_name
        self.info = info
        self.options = options or LlamaCppOptions()
        self.n_ctx = _context_size(self.options.n_ctx, info)
        self.n_parallel = _check_slots(self.options)
        self._control = Control()
        self._template: ChatTemplate | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = False
        self._preparing = threading.Condition()
        self._prepares = 0  # prepare calls running on other threads
        self._engine = LlamaCppEngine(
            EngineConfig(
                model_path=str(info.path),
                n_ctx=self.n_ctx,
                n_parallel=self.n_parallel,
                n_batch=self.options.n_batch,
                prefill_chunk=min(self.options.prefill_chunk, self.options.n_batch),
                n_threads=self.options.n_threads or default_threads(),
                n_gpu_layers=self.options.n_gpu_layers,
                verbose=self.options.verbose,
                speculation=self.options.speculation.validate() if self.options.speculation else None,
                pooling_type=info.pooling_type,
            ),
            self._control,
        )
        self._thread = threading.Thread(target=self._engine_main, name=f"llamacpp:{model_name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # -- front-end side -----------------------------------------------------
    @property
    def _model(self):
        return self._engine.model

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokenize with llama.cpp's own tokenizer (read-only, safe from any thread)."""
        return self._model.tokenize(text.encode("utf-8"), add_bos, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        self._refuse_embedding_model()
        if self._template is None:
            self._template = resolve_template(
                self.info.chat_template,
                self.info.architecture,
                model_name=self.model_name,
                bos_token=self.info.bos_token,
                eos_token=self.info.eos_token,
            )
        return self._template.render(messages, add_generation_prompt=True, tools=tools)

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        """The token ids the engine will process for `req`."""
        if isinstance(req.prompt, list):
            return list(req.prompt)
        if not req.templated:
            return self.tokenize(req.prompt, add_bos=self.info.add_bos_token)
        tokens = self.tokenize(req.prompt, add_bos=False, special=True)
        bos = self._model.token_bos()
        if self.info.add_bos_token and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)  # the template did not write the BOS the model expects
        return tokens

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """Check `req` and tokenize it, on any thread (the server calls this off its event loop).

        The vocabulary is read-only; `close` waits for running prepares before
        the engine frees the model.
        """
        with self._preparing:
            if self._closed:
                raise BackendError(f"model '{self.model_name}' is closed")
            self._prepares += 1
        try:
            tokens = self._checked_tokens(req)
        finally:
            with self._preparing:
                self._prepares -= 1
                self._preparing.notify_all()
        return replace(req, prompt=tokens, prepared=True)

    def _refuse_embedding_model(self) -> None:
        if self.info.is_embedding_model:
            raise BadRequest(
                f"model '{self.model_name}' is an embedding model: it cannot chat or complete text; "
                f"ask /v1/embeddings or /api/embed"
            )

    def _checked_tokens(self, req: GenerationRequest) -> list[int]:
        self._refuse_embedding_model()
        params = req.params.validate()
        if params.grammar is not None and not req.prepared:
            check_grammar(self._engine.lc, self._model.vocab, params.grammar, params.grammar_triggers)
        tokens = self.prompt_tokens(req)
        if not tokens:
            raise BadRequest("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise BadRequest(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                f"shorten it or raise the context size (--ctx)"
            )
        return tokens

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        if self._closed:
            raise BackendError(f"model '{self.model_name}' is closed")
        params = req.params
        tokens = self._checked_tokens(req)
        limit = self.n_ctx - len(tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        job = Job(req, tokens, asyncio.get_running_loop(), asyncio.Queue(), limit)
        control = self._control
        with control.lock:
            if req.request_id in control.active:
                raise BadRequest(f"request id '{req.request_id}' is already in use")
            control.active.add(req.request_id)
            control.stats.waiting += 1
        control.inbox.put(job)
        finished = False
        try:
            while True:
                event = await job.events.get()
                yield event
                if isinstance(event, FinishEvent):
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    # -- embeddings -----------------------------------------------------------
    @property
    def embed_context(self) -> int:
        """The most tokens one embedding input may have."""
        return embed_context_size(self.n_ctx)

    def prepare_embedding(self, inputs: list[str] | list[list[int]], *, truncate: bool = False) -> list[list[int]]:
        """Each input as checked token ids, on any thread (the server calls this off its event loop).

        Text gets the model's special tokens (BOS; CLS and SEP for BERT). An
        input longer than `embed_context` is cut to it with `truncate`, else refused.
        """
        with self._preparing:
            if self._closed:
                raise BackendError(f"model '{self.model_name}' is closed")
            self._prepares += 1
        try:
            return [self._embedding_tokens(i, item, truncate) for i, item in enumerate(inputs)]
        finally:
            with self._preparing:
                self._prepares -= 1
                self._preparing.notify_all()

    def _embedding_tokens(self, index: int, item: str | list[int], truncate: bool) -> list[int]:
        if isinstance(item, str):
            tokens = self._model.tokenize(item.encode("utf-8"), True, False)
        else:
            tokens = list(item)
            n_vocab = self._engine.n_vocab
            bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < n_vocab), None)
            if bad is not None:
                raise BadRequest(f"input[{index}] has token id {bad}, outside the model's vocabulary of {n_vocab}")
        if not tokens:
            raise BadRequest(f"input[{index}] is empty")
        limit = self.embed_context
        if len(tokens) > limit:
            if not truncate:
                raise BadRequest(
                    f"input[{index}] has {len(tokens)} tokens but this model embeds at most {limit} tokens per input; "
                    f"shorten it"
                )
            tokens = tokens[:limit]
        return tokens

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """Unit-length pooled vectors, computed on the engine thread together with other requests' inputs."""
        if self._closed:
            raise BackendError(f"model '{self.model_name}' is closed")
        if not inputs:
            return []
        if any(isinstance(item, str) for item in inputs):
            inputs = self.prepare_embedding(inputs)
        loop = asyncio.get_running_loop()
        job = EmbedJob([list(t) for t in inputs], loop, loop.create_future())
        self._control.inbox.put(job)
        return await job.future

    def abort(self, request_id: str) -> None:
        self._control.abort(request_id)

    def stats(self) -> EngineStats:
        with self._control.lock:
            return EngineStats(**vars(self._control.stats))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._preparing:  # a prepare still reading the vocabulary finishes first
            self._preparing.wait_for(lambda: self._prepares == 0)
        control = self._control
        with control.lock:  # stop what is running rather than wait for it
            control.aborted |= control.active
        control.inbox.put(None)
        self._thread.join()

    # -- engine thread --------------------------------------------------------
    def _engine_main(self) -> None:
        try:
            import llama_cpp

            route_llama_logs(llama_cpp, self.options.verbose)
            self._engine.load()
        except BaseException as exc:  # reported to the constructor's caller
            self._load_error = exc if isinstance(exc, BackendError) else BackendError(
                f"llama.cpp could not load '{self.model_name}': {exc}"
            )
            self._engine.unload()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._engine.run()
        finally:
            self._engine.unload()


def _context_size(requested: int | None, info: ModelInfo) -> int:
    trained = info.context_length or DEFAULT_CONTEXT
    if requested is None:
        return min(DEFAULT_CONTEXT, trained)
    if requested < 16:
        raise BadRequest(f"context size must be at least 16 tokens (got {requested})")
    if requested > trained:
        raise BadRequest(f"context size {requested} is larger than the {trained} tokens the model was trained for")
    return requested


def _check_slots(options: LlamaCppOptions) -> int:
    if not 1 <= options.n_parallel <= MAX_PARALLEL:
        raise BadRequest(f"parallel must be between 1 and {MAX_PARALLEL} (got {options.n_parallel})")
    if options.n_batch < options.n_parallel:
        raise BadRequest(f"the batch ({options.n_batch} tokens) must hold one token of each of {options.n_parallel} slots")
    if options.prefill_chunk < 1:
        raise BadRequest("prefill_chunk must be >= 1")
    return options.n_parallel


def new_request_id() -> str:
    return uuid.uuid4().hex
