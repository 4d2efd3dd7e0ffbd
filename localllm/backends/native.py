"""The native backend: the PyTorch engine in native/ behind the Backend interface.

Same shape as the llama.cpp backend: one engine thread owns the model and its
KV cache; `generate` validates and tokenizes on the caller's side, posts the
request to the engine's inbox and receives events through a per-request
asyncio queue. The difference is inside the thread: instead of serving one
request after another, it steps the native engine, which batches every active
request into each forward pass (continuous batching), and fans the sampled
tokens out to their queues.

Event semantics match llamacpp.py: text comes through TextStream (no half
characters, no partial stop strings), an end-of-generation token ends with
"stop" without text, max_tokens or a full context ends with "length" after
flushing held-back text, abort and a client that stops listening end with
"abort". torch is imported on the engine thread only, so the app runs where
torch is missing until this backend is asked for.

With speculative decoding (native/speculative.py) one step may give a request
several tokens; each is delivered as its own event, as if decoded one by one,
and the request's guessed and kept token counts end up in its Usage.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from localllm.core.requests import EngineStats, Event, FinishEvent, GenerationRequest, Timings, TokenEvent, Usage
from localllm.backends.textstream import TextStream
from localllm.core.chat_template import ChatTemplate, resolve_template
from localllm.core.errors import BackendError, BadRequest, LocalLLMError
from localllm.core.hardware import default_threads
from localllm.core.modelinfo import ModelInfo
from localllm.core.speculation import SpeculationOptions


@dataclass
class NativeOptions:
    n_ctx: int | None = None  # None: min(4096, trained context)
    n_threads: int | None = None  # None: physical cores
    kv_cache_bytes: int | None = None  # CPU KV cache budget; None: the engine's default
    max_num_seqs: int = 16  # requests batched together
    device: str | None = None  # None: CUDA when available
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    verbose: bool = False
    speculation: SpeculationOptions | None = None  # native/speculative.py; None: off (a draft is its file's path)


@dataclass
class _Job:
    """One request as the engine thread sees it."""

    request: GenerationRequest
    tokens: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    queued_at: float = field(default_factory=time.perf_counter)
    stream: TextStream | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    started_at: float = 0.0
    first_at: float = 0.0
    last_at: float = 0.0
    seq: Any = None  # the engine's Sequence


class NativeBackend:
    name = "native"

    def __init__(self, model_name: str, info: ModelInfo, options: NativeOptions | None = None) -> None:
        self.model_name = model_name
        self.info = info
        self.options = options or NativeOptions()
        self._inbox: queue.Queue = queue.Queue()
        self._active: set[str] = set()  # request ids queued or running
        self._aborted: set[str] = set()  # the subset of _active asked to stop
        self._lock = threading.Lock()  # guards the sets and _stats across threads
        self._stats = EngineStats()
        self._template: ChatTemplate | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._engine_main, name=f"native:{model_name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # -- front-end side -------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens)

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
        """The token ids the engine will process for `req` (as the llama.cpp backend makes them)."""
        if isinstance(req.prompt, list):
            return list(req.prompt)
        if not req.templated:
            return self.tokenize(req.prompt, add_bos=self._tokenizer.add_bos)
        tokens = self.tokenize(req.prompt, add_bos=False, special=True)
        bos = self._tokenizer.bos_id
        if self._tokenizer.add_bos and bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)  # the template did not write the BOS the model expects
        return tokens

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """Check `req` and tokenize it, on any thread (the server calls this off its event loop)."""
        if self._closed:
            raise BackendError(f"model '{self.model_name}' is closed")
        return replace(req, prompt=self._checked_tokens(req), prepared=True)

    def _checked_tokens(self, req: GenerationRequest) -> list[int]:
        req.params.validate()
        if req.params.grammar is not None:
            raise BadRequest("grammars are not supported by the native backend yet; use --backend llamacpp")
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
        tokens = self._checked_tokens(req)
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

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        raise BadRequest("the native backend cannot compute embeddings; serve this model with --backend llamacpp")

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._active:
                return
            self._aborted.add(request_id)
        self._inbox.put("wake")  # the engine thread may be waiting for work

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

    # -- engine thread ------------------------------------------------------------------
    def _engine_main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to the constructor's caller
            if isinstance(exc, LocalLLMError):
                self._load_error = exc
            elif isinstance(exc, ImportError):
                self._load_error = BackendError(f"the native backend needs torch ({exc}); install localllm[native]")
            else:
                self._load_error = BackendError(f"the native engine could not load '{self.model_name}': {exc}")
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve_forever()
        finally:
            self._engine.close()

    def _load(self) -> None:
        from native.engine import EngineOptions, LLMEngine

        o = self.options
        self._engine = LLMEngine(
            self.info.path,
            EngineOptions(
                device=o.device,
                dtype=o.dtype,
                max_model_len=o.n_ctx,
                max_num_seqs=o.max_num_seqs,
                kv_cache_bytes=o.kv_cache_bytes,
                threads=o.n_threads or default_threads(),
                verbose=o.verbose,
                speculation=o.speculation.validate() if o.speculation else None,
            ),
        )
        self._tokenizer = self._engine.tokenizer
        self.n_ctx = self._engine.max_model_len
        self._jobs: dict[str, _Job] = {}
        self._publish_stats()

    def _serve_forever(self) -> None:
        while True:
            block = not self._engine.has_work()
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                message = "wake"
            while True:  # take everything that is waiting, then step once
                if message is None:
                    self._abort_all()
                    return
                if isinstance(message, _Job):
                    self._admit(message)
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    break
            self._handle_aborts()
            if self._engine.has_work():
                self._step()
            self._publish_stats()

    def _admit(self, job: _Job) -> None:
        rid = job.request.request_id
        try:
            job.seq = self._engine.add_request(rid, job.tokens, job.request.params)
        except LocalLLMError as exc:
            self._finish(job, "error", str(exc))
            return
        job.stream = TextStream(stop=list(job.request.params.stop))
        job.usage.prompt_tokens = len(job.tokens)
        self._jobs[rid] = job

    def _handle_aborts(self) -> None:
        with self._lock:
            aborted = [rid for rid in self._aborted if rid in self._jobs]
        for rid in aborted:
            self._engine.abort(rid)
            self._finish(self._jobs[rid], "abort")

    def _abort_all(self) -> None:
        for rid in list(self._jobs):
            self._engine.abort(rid)
            self._finish(self._jobs[rid], "abort")

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self._engine.step()
        except Exception as exc:  # a failed step must not take the engine down: fail what ran
            for rid in list(self._jobs):
                self._engine.abort(rid)
                self._finish(self._jobs[rid], "error", f"generation failed: {exc}")
            return
        now = time.perf_counter()
        for job in self._jobs.values():
            if not job.started_at and job.seq.num_computed > 0:
                job.started_at = started
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is not None:
                self._deliver(job, out, now)

    def _deliver(self, job: _Job, out, now: float) -> None:
        """One sampled token: count it, stream its text, finish the request if it is done."""
        usage, params = job.usage, job.request.params
        if usage.completion_tokens == 0:
            job.first_at = now
            job.started_at = job.started_at or now
            job.timings.prompt_s = now - job.started_at
            job.timings.ttft_s = now - job.queued_at
            usage.cached_prompt_tokens = max(job.seq.num_cached_prompt, 0)
        job.last_at = now
        usage.completion_tokens += 1
        if out.finish_reason == "stop":  # an end-of-generation token: no text
            self._finish(job, "stop")
            return
        logprobs = [self._logprobs(out.logprobs)] if params.logprobs is not None and out.logprobs else None
        scan = job.stream.feed(self._tokenizer.piece(out.token))
        rid = job.request.request_id
        if not self._emit(job, TokenEvent(rid, scan.text, [out.token], logprobs)) or self._is_aborted(rid):
            self._engine.abort(rid)
            self._finish(job, "abort")
        elif scan.stopped:
            self._engine.abort(rid)  # finished by a stop string: the engine lets it go
            self._finish(job, "stop")
        elif out.finish_reason == "length":
            tail = job.stream.flush()
            if tail:
                self._emit(job, TokenEvent(rid, tail, []))
            self._finish(job, "length")

    def _logprobs(self, lp) -> dict:
        def text(token: int) -> str:
            return self._tokenizer.piece(token).decode("utf-8", errors="replace")

        return {
            "token": lp.token,
            "text": text(lp.token),
            "logprob": lp.logprob,
            "top": [{"token": t, "text": text(t), "logprob": v} for t, v in lp.top],
        }

    def _finish(self, job: _Job, reason: str, error: str | None = None) -> None:
        rid = job.request.request_id
        self._jobs.pop(rid, None)
        t = job.timings
        if job.usage.completion_tokens:
            t.decode_s = job.last_at - job.first_at
            if job.started_at:
                t.queued_s = job.started_at - job.queued_at
        t.total_s = time.perf_counter() - job.queued_at
        spec = job.seq.spec if job.seq is not None else None
        if spec is not None and spec.proposed:
            job.usage.draft_tokens, job.usage.accepted_draft_tokens = spec.proposed, spec.accepted
        with self._lock:  # before the finish event, so the id is free once a client sees it
            self._active.discard(rid)
            self._aborted.discard(rid)
            self._stats.requests_finished += 1
            if job.usage.completion_tokens:
                self._stats.last_ttft_s = t.ttft_s
                self._stats.last_decode_tokens_per_s = t.decode_tokens_per_s(job.usage.completion_tokens)
            if job.usage.draft_tokens:
                self._stats.last_spec_acceptance_rate = job.usage.accepted_draft_tokens / job.usage.draft_tokens
        self._publish_stats()  # its blocks are back: stats say so before the client hears it is done
        matched = job.stream.matched if job.stream is not None else None
        self._emit(job, FinishEvent(rid, reason, job.usage, t, error, matched))

    def _publish_stats(self) -> None:
        s = self._engine.stats()
        with self._lock:
            self._stats.running = s["running"]
            self._stats.waiting = s["waiting"] + sum(1 for rid in self._active if rid not in self._jobs)
            self._stats.kv_blocks_used = s["kv_blocks_used"]
            self._stats.kv_blocks_total = s["kv_blocks_total"]
            self._stats.kv_used_ratio = s["kv_blocks_used"] / max(s["kv_blocks_total"], 1)
            self._stats.prefix_cache_hit_rate = s["prefix_cache_hit_rate"]
            self._stats.spec_draft_tokens = s.get("spec_draft_tokens", 0)
            self._stats.spec_accepted_tokens = s.get("spec_accepted_tokens", 0)

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
