"""The native backend: the PyTorch engine in native/ behind the Backend interface.

The front half is the one every local backend shares (local.py): one engine
thread owns the model and its KV cache; `generate` validates and tokenizes on
the caller's side, posts the request to the engine's inbox and receives events
through a per-request asyncio queue. What is this backend's own is inside the
thread: it steps the native engine, which batches every active request into
each forward pass (continuous batching), and fans the sampled tokens out to
their queues.

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

import queue
import time
from dataclasses import dataclass
from typing import Any

from localllm.backends.engine_inbox import WAKE, Job
from localllm.backends.local import LocalBackend
from localllm.backends.textstream import TextStream
from localllm.core.errors import BackendError, LocalLLMError, NotSupported
from localllm.core.requests import Event, FinishEvent, GenerationRequest, TokenEvent
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
    dtype: str | None = None  # compute dtype; None: what `weights` implies
    weights: str = "auto"  # linear weights: auto|float32|bfloat16|int8|int4|fp8 (core/weight_formats.py)
    verbose: bool = False
    speculation: SpeculationOptions | None = None  # native/speculative.py; None: off (a draft is its file's path)


class NativeBackend(LocalBackend):
    name = "native"
    engine_label = "the native engine"
    embed_context = None  # this engine computes no embeddings

    def __init__(self, model_name: str, info: ModelInfo, options: NativeOptions | None = None) -> None:
        super().__init__(model_name, info)
        self.options = options or NativeOptions()
        self._engine: Any = None  # the LLMEngine, made on the engine thread
        self._jobs: dict[str, Job] = {}  # admitted to the engine, by request id
        self._start()

    # -- tokens -----------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens)

    def _adds_bos(self) -> bool:
        return self._tokenizer.add_bos

    def _bos_id(self) -> int | None:
        return self._tokenizer.bos_id

    def _check_engine_request(self, req: GenerationRequest) -> None:
        if req.params.grammar is not None:
            raise NotSupported("native", "grammars", alternative="llamacpp")

    # -- embeddings: not in this engine ------------------------------------------------
    def prepare_embedding(self, inputs: list[str] | list[list[int]], *, truncate: bool = False) -> list[list[int]]:
        raise NotSupported("native", "embeddings", alternative="llamacpp")

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        raise NotSupported("native", "embeddings", alternative="llamacpp")

    # -- engine thread ------------------------------------------------------------------
    def _load(self) -> None:
        from native.engine import EngineOptions, LLMEngine

        o = self.options
        self._engine = LLMEngine(
            self.info.path,
            EngineOptions(
                device=o.device,
                dtype=o.dtype,
                weights=o.weights,
                n_ctx=o.n_ctx,
                max_num_seqs=o.max_num_seqs,
                kv_cache_bytes=o.kv_cache_bytes,
                threads=o.n_threads or default_threads(),
                verbose=o.verbose,
                speculation=o.speculation.validate() if o.speculation else None,
            ),
        )
        self._tokenizer = self._engine.tokenizer
        self.n_ctx = self._engine.n_ctx
        self._publish_stats()

    def _load_failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, LocalLLMError):
            return exc
        if isinstance(exc, ImportError):
            return BackendError(f"the native backend needs torch ({exc}); install localllm[native]")
        return super()._load_failure(exc)

    def _unload(self) -> None:
        """Close the engine and forget it: a closed backend that is still referenced holds no model memory."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def _run(self) -> None:
        inbox = self._control.inbox
        while True:
            block = not self._engine.has_work()
            try:
                message = inbox.get(block=block)
            except queue.Empty:
                message = WAKE
            while True:  # take everything that is waiting, then step once
                if message is None:
                    self._abort_all()
                    return
                if isinstance(message, Job):
                    self._admit(message)
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    break
            self._handle_aborts()
            if self._engine.has_work():
                self._step()
            self._publish_stats()

    def _admit(self, job: Job) -> None:
        rid = job.rid
        try:
            job.seq = self._engine.add_request(rid, job.prompt, job.request.params)
        except LocalLLMError as exc:
            self._finish(job, "error", str(exc))
            return
        job.stream = TextStream(stop=list(job.request.params.stop))
        job.usage.prompt_tokens = len(job.prompt)
        self._jobs[rid] = job

    def _handle_aborts(self) -> None:
        with self._control.lock:
            aborted = [rid for rid in self._control.aborted if rid in self._jobs]
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
            if not job.admitted_at and job.seq.num_computed > 0:
                job.admitted_at = started
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is not None:
                self._deliver(job, out, now)

    def _deliver(self, job: Job, out, now: float) -> None:
        """One sampled token: count it, stream its text, finish the request if it is done."""
        usage, params = job.usage, job.request.params
        if usage.completion_tokens == 0:
            job.first_at = now
            job.admitted_at = job.admitted_at or now
            job.timings.prompt_s = now - job.admitted_at
            job.timings.ttft_s = now - job.queued_at
            usage.cached_prompt_tokens = max(job.seq.num_cached_prompt, 0)
        job.last_at = now
        usage.completion_tokens += 1
        if out.finish_reason == "stop":  # an end-of-generation token: no text
            self._finish(job, "stop")
            return
        logprobs = [self._logprobs(out.logprobs)] if params.logprobs is not None and out.logprobs else None
        scan = job.stream.feed(self._tokenizer.piece(out.token))
        rid = job.rid
        if not self._emit(job, TokenEvent(rid, scan.text, [out.token], logprobs)) or self._control.is_aborted(rid):
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

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        rid = job.rid
        self._jobs.pop(rid, None)
        t = job.timings
        if job.usage.completion_tokens:
            t.decode_s = job.last_at - job.first_at
            if job.admitted_at:
                t.queued_s = job.admitted_at - job.queued_at
        t.total_s = time.perf_counter() - job.queued_at
        spec = job.seq.spec if job.seq is not None else None
        if spec is not None and spec.proposed:
            job.usage.draft_tokens, job.usage.accepted_draft_tokens = spec.proposed, spec.accepted
        control = self._control
        with control.lock:  # before the finish event, so the id is free once a client sees it
            control.active.discard(rid)
            control.aborted.discard(rid)
            stats = control.stats
            stats.requests_finished += 1
            if job.usage.completion_tokens:
                stats.last_ttft_s = t.ttft_s
                stats.last_decode_tokens_per_s = t.decode_tokens_per_s(job.usage.completion_tokens)
            if job.usage.draft_tokens:
                stats.last_spec_acceptance_rate = job.usage.accepted_draft_tokens / job.usage.draft_tokens
        self._publish_stats()  # its blocks are back: stats say so before the client hears it is done
        matched = job.stream.matched if job.stream is not None else None
        self._emit(job, FinishEvent(rid, reason, job.usage, t, error, matched))

    def _publish_stats(self) -> None:
        s = self._engine.stats()
        control = self._control
        with control.lock:
            stats = control.stats
            stats.running = s["running"]
            stats.waiting = s["waiting"] + sum(1 for rid in control.active if rid not in self._jobs)
            stats.kv_blocks_used = s["kv_blocks_used"]
            stats.kv_blocks_total = s["kv_blocks_total"]
            stats.kv_used_ratio = s["kv_blocks_used"] / max(s["kv_blocks_total"], 1)
            stats.prefix_cache_hit_rate = s["prefix_cache_hit_rate"]
            stats.spec_draft_tokens = s.get("spec_draft_tokens", 0)
            stats.spec_accepted_tokens = s.get("spec_accepted_tokens", 0)

    def _emit(self, job: Job, event: Event) -> bool:
        """Hand an event to the request's loop; False when that loop is gone."""
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
            return True
        except RuntimeError:
            return False
