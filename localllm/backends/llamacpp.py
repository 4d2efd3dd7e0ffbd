"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level bindings.

One engine thread owns the model and its context (llama.cpp is not thread-safe
per context). Front ends call `generate` from any asyncio loop; the request goes
into the engine's inbox and its events come back through that loop's queue.

The loop is written step by step against the C API (batch, decode, a sampler
chain per request) rather than through `Llama.generate`, so a later change can
fill one batch from many sequences, as llama.cpp's own server does.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from localllm.backends.base import (
    EngineStats,
    Event,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    Timings,
    TokenEvent,
    Usage,
)
from localllm.backends.grammar import GrammarSampler, check_grammar
from localllm.backends.logprobs import top_logprobs
from localllm.backends.textstream import TextStream
from localllm.chat_template import ChatTemplate, resolve_template
from localllm.errors import BackendError, BadRequest
from localllm.hardware import default_threads
from localllm.modelinfo import ModelInfo

DEFAULT_CONTEXT = 4096
DEFAULT_BATCH = 512
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: pick a random seed
DECODE_ABORTED = 2  # llama_decode's status when the abort callback said stop


@dataclass
class LlamaCppOptions:
    n_ctx: int | None = None  # None: min(DEFAULT_CONTEXT, trained context)
    n_threads: int | None = None  # None: physical cores
    n_gpu_layers: int = 0
    n_batch: int = DEFAULT_BATCH
    verbose: bool = False


@dataclass
class _Job:
    """One request as the engine thread sees it."""

    request: GenerationRequest
    tokens: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    queued_at: float = field(default_factory=time.perf_counter)


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, model_name: str, info: ModelInfo, options: LlamaCppOptions | None = None) -> None:
        self.model_name = model_name
        self.info = info
        self.options = options or LlamaCppOptions()
        self.n_ctx = _context_size(self.options.n_ctx, info)
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._active: set[str] = set()  # request ids queued or running
        self._aborted: set[str] = set()  # the subset of _active asked to stop
        self._lock = threading.Lock()  # guards the sets and _stats across threads
        self._stats = EngineStats()
        self._template: ChatTemplate | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._engine_main, name=f"llamacpp:{model_name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # -- front-end side -----------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokenize with llama.cpp's own tokenizer (read-only, safe from any thread)."""
        return self._model.tokenize(text.encode("utf-8"), add_bos, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
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

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        if self._closed:
            raise BackendError(f"model '{self.model_name}' is closed")
        req.params.validate()
        if req.params.grammar is not None:
            check_grammar(self._llama_cpp, self._model.vocab, req.params.grammar, req.params.grammar_triggers)
        tokens = self.prompt_tokens(req)
        if not tokens:
            raise BadRequest("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise BadRequest(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                f"shorten it or raise the context size (--ctx)"
            )
        loop = asyncio.get_running_loop()
        job = _Job(req, tokens, loop, asyncio.Queue())
        with self._lock:
            if req.request_id in self._active:
                raise BadRequest(f"request id '{req.request_id}' is already in use")
            self._active.add(req.request_id)
            self._stats.waiting += 1
        self._inbox.put(job)
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

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._active:
                self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(**vars(self._stats))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:  # stop what is running rather than wait for it
            self._aborted |= self._active
        self._inbox.put(None)
        self._thread.join()

    # -- engine thread --------------------------------------------------------
    def _engine_main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to the constructor's caller
            self._load_error = exc if isinstance(exc, BackendError) else BackendError(
                f"llama.cpp could not load '{self.model_name}': {exc}"
            )
            self._ready.set()
            return
        self._ready.set()
        try:
            while (job := self._inbox.get()) is not None:
                self._serve(job)
        finally:
            self._unload()

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        _route_llama_logs(llama_cpp, self.options.verbose)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = self.options.n_gpu_layers
        self._model = _internals.LlamaModel(
            path_model=str(self.info.path), params=model_params, verbose=self.options.verbose
        )
        threads = self.options.n_threads or default_threads()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx
        ctx_params.n_batch = self.options.n_batch
        ctx_params.n_ubatch = self.options.n_batch
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.n_seq_max = 1
        ctx_params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._model, params=ctx_params, verbose=self.options.verbose)
        self._batch = _internals.LlamaBatch(n_tokens=self.options.n_batch, embd=0, n_seq_max=1)
        self._prefilling: str | None = None
        self._abort_callback = llama_cpp.ggml_abort_callback(self._should_abort_compute)
        self._no_abort_callback = llama_cpp.ggml_abort_callback(0)  # NULL: no Python call per graph node
        self._llama_cpp = llama_cpp
        self._internals = _internals
        self._kv_tokens: list[int] = []  # what the KV cache of sequence 0 holds, in order

    def _unload(self) -> None:
        for part in ("_batch", "_ctx", "_model"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()

    def _piece(self, token: int) -> bytes:
        """The bytes of one token as text (control tokens such as <eos> give b"")."""
        import ctypes

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def _emit(self, job: _Job, event: Event) -> bool:
        """Hand an event to the request's loop; False when that loop is gone."""
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
            return True
        except RuntimeError:
            return False

    def _is_aborted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._aborted

    def _serve(self, job: _Job) -> None:
        with self._lock:
            self._stats.waiting -= 1
            self._stats.running += 1
        usage, timings = Usage(prompt_tokens=len(job.tokens)), Timings()
        started = time.perf_counter()
        timings.queued_s = started - job.queued_at
        try:
            reason = self._run(job, usage, timings, started)
            error = None
        except Exception as exc:  # a failed request must not take the engine down
            reason, error = "error", f"generation failed: {exc}"
            self._kv_tokens = []
            self._ctx.kv_cache_clear()
        timings.total_s = time.perf_counter() - job.queued_at
        rid = job.request.request_id
        with self._lock:  # before the finish event, so the id is free once a client sees it
            self._active.discard(rid)
            self._aborted.discard(rid)
            self._stats.running -= 1
            self._stats.requests_finished += 1
            self._stats.kv_used_ratio = len(self._kv_tokens) / self.n_ctx
            if usage.completion_tokens:
                self._stats.last_ttft_s = timings.ttft_s
                self._stats.last_decode_tokens_per_s = timings.decode_tokens_per_s(usage.completion_tokens)
        self._emit(job, FinishEvent(rid, reason, usage, timings, error))

    def _run(self, job: _Job, usage: Usage, timings: Timings, started: float) -> str:
        rid, params = job.request.request_id, job.request.params
        if self._is_aborted(rid):
            return "abort"
        usage.cached_prompt_tokens = self._prefill(job.tokens, rid)
        if usage.cached_prompt_tokens < 0:
            return "abort"
        timings.prompt_s = time.perf_counter() - started
        sampler = _build_sampler(self._internals, self._llama_cpp, self._model, params)
        try:
            return self._decode_loop(job, sampler, usage, timings)
        finally:
            sampler.close()

    def _prefill(self, tokens: list[int], rid: str) -> int:
        """Bring the KV cache to hold `tokens`, reusing the longest cached prefix.

        Returns how many prompt tokens were reused, or -1 when aborted midway.
        """
        reuse = _common_prefix(self._kv_tokens, tokens)
        reuse = min(reuse, len(tokens) - 1)  # the last prompt token must run to give logits
        if reuse > 0 and self._ctx.kv_cache_seq_rm(0, reuse, -1):
            self._kv_tokens = self._kv_tokens[:reuse]
        else:  # nothing shared, or a sliding-window cache that cannot rewind
            reuse = 0
            self._ctx.kv_cache_clear()
            self._kv_tokens = []
        n_batch = self.options.n_batch
        # While a prompt is processed, llama.cpp asks between graph nodes whether to stop,
        # so an abort (Esc, Ctrl+Q, a closed connection) lands within milliseconds. Decode
        # steps are short and skip the callback: it would take the GIL once per node.
        self._prefilling = rid
        self._llama_cpp.llama_set_abort_callback(self._ctx.ctx, self._abort_callback, None)
        try:
            for start in range(reuse, len(tokens), n_batch):
                if self._is_aborted(rid):
                    return -1
                chunk = tokens[start : start + n_batch]
                if not self._decode(chunk):
                    return -1
        finally:
            self._prefilling = None
            self._llama_cpp.llama_set_abort_callback(self._ctx.ctx, self._no_abort_callback, None)
        return reuse

    def _decode(self, chunk: list[int]) -> bool:
        """Run `chunk` at the end of sequence 0; logits only for its last token.

        False when the abort callback stopped it: llama.cpp then drops the
        chunk's positions from the cache, so the bookkeeping stays true.
        """
        self._batch.set_batch(chunk, n_past=len(self._kv_tokens), logits_all=False)
        status = self._llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
        if status == DECODE_ABORTED:
            return False
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self._kv_tokens.extend(chunk)
        return True

    def _should_abort_compute(self, _data) -> bool:
        """Called by llama.cpp between graph nodes (only while a prompt is processed)."""
        rid = self._prefilling
        return rid is not None and rid in self._aborted

    def _decode_loop(self, job: _Job, sampler, usage: Usage, timings: Timings) -> str:
        rid, params = job.request.request_id, job.request.params
        llama_cpp, vocab = self._llama_cpp, self._model.vocab
        stream = TextStream(stop=list(params.stop))
        limit = self.n_ctx - len(self._kv_tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        first_at = last_at = 0.0
        reason = "length"
        while usage.completion_tokens < limit:
            token = sampler.sample(self._ctx, -1)
            last_at = time.perf_counter()
            if usage.completion_tokens == 0:
                first_at = last_at
                timings.ttft_s = first_at - job.queued_at
            usage.completion_tokens += 1
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"
                break
            logprobs = None
            if params.logprobs is not None:
                logprobs = [top_logprobs(self._ctx.ctx, self._model.n_vocab(), token, params.logprobs, self._piece)]
            scan = stream.feed(self._piece(token))
            if not self._emit(job, TokenEvent(rid, scan.text, [token], logprobs)) or self._is_aborted(rid):
                reason = "abort"
                break
            if scan.stopped:
                reason = "stop"
                break
            if usage.completion_tokens >= limit:
                break
            self._decode([token])  # the abort callback only acts during prefill
        else:
            reason = "length"
        if reason != "abort":
            # text held back because it might have begun a stop string is part of the
            # answer when the output ends otherwise (length, end of turn); after a stop
            # string flush() gives nothing
            tail = stream.flush()
            if tail:
                self._emit(job, TokenEvent(rid, tail, []))
        timings.decode_s = last_at - first_at
        return reason


_log_callback = None  # kept alive for as long as llama.cpp may call it


def _route_llama_logs(llama_cpp, verbose: bool) -> None:
    """llama.cpp logs to stderr by default; a CLI must print only what it means to."""
    global _log_callback
    import ctypes
    import sys

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if verbose:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    _log_callback = callback
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _context_size(requested: int | None, info: ModelInfo) -> int:
    trained = info.context_length or DEFAULT_CONTEXT
    if requested is None:
        return min(DEFAULT_CONTEXT, trained)
    if requested < 16:
        raise BadRequest(f"context size must be at least 16 tokens (got {requested})")
    if requested > trained:
        raise BadRequest(f"context size {requested} is larger than the {trained} tokens the model was trained for")
    return requested


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _build_sampler(internals, llama_cpp, model, params: SamplingParams):
    """The request's sampler: its chain, wrapped with its grammar when it has one."""
    chain = _build_chain(internals, llama_cpp, model, params)
    if params.grammar is None:
        return chain
    return GrammarSampler(llama_cpp, chain, model.vocab, model.n_vocab(), params.grammar, params.grammar_triggers)


def _build_chain(internals, llama_cpp, model, params: SamplingParams):
    """A llama.cpp sampler chain in llama.cpp's own order: penalties, top-k, top-p, min-p, temperature."""
    sampler = internals.LlamaSampler()
    if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        last_n = params.repeat_last_n if params.repeat_last_n >= 0 else -1
        sampler.add_penalties(
            model.n_vocab(), last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
        )
    if params.temperature == 0:
        sampler.add_greedy()
        return sampler
    if params.top_k > 0:
        sampler.add_top_k(params.top_k)
    if params.top_p < 1.0:
        sampler.add_top_p(params.top_p, 1)
    if params.min_p > 0:
        sampler.add_min_p(params.min_p, 1)
    sampler.add_temp(params.temperature)
    sampler.add_dist(RANDOM_SEED if params.seed is None else params.seed)
    return sampler


def new_request_id() -> str:
    return uuid.uuid4().hex

