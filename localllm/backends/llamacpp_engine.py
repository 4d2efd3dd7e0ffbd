"""The batched llama.cpp engine: one thread, one `llama_decode` per step for every active sequence.

This is what llama.cpp's own server does, written against the C API through
llama-cpp-python's low-level bindings. Each request runs in a *slot*, a
sequence id of one unified KV cache (`kv_unified`: all sequences draw cells
from one pool, so one request may use the whole context, and a prefix shared
between sequences occupies its cells once); `n_parallel` slots decode
together, and requests join and leave at any step. Each request has its own
sampler chain (seeds, penalties, grammar), reads the logits of its own row,
and streams its text through its own TextStream.

A step, top to bottom in `LlamaCppEngine`, one module per part:

* admit waiting requests into idle slots and say which tokens each slot runs
  (llamacpp_scheduler.py);
* start each from the longest prefix any slot holds; keep every slot's token
  list equal to what llama.cpp holds (llamacpp_slots.py);
* give generating slots guesses to check (llamacpp_speculative.py, guesses
  from llamacpp_guessers.py);
* write the tokens into one llama_batch and decode it, abortable mid-prompt
  (llamacpp_batch.py);
* draw each slot's token, or check its guesses; when the cache is full, drop
  idle caches or preempt the youngest request (its client only sees a pause);
* hand the step's events over, once per client event loop (llamacpp_outbox.py).

The sliding-window cache is full size (`swa_full`): with llama.cpp's default
small window cache, positions that slid out of the window are overwritten and
no prefix longer than the window could be reused. Embeddings
(llamacpp_embedder.py) run in a second context on the same weights, one
decode of many inputs between chat steps; while anyone generates, a decode
takes about a prefill chunk's worth of tokens.

llama.cpp's arithmetic depends slightly on batch shape, so a greedy output
beside other requests may part from the same request alone at a near-tie
(docs/ARCHITECTURE.md has the measurements).

The engine thread is the only one that touches the model's context. Front ends
talk to it through `Control` (engine_inbox.py): an inbox of jobs, and a set of aborted ids.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

from localllm.core.requests import FinishEvent, TokenEvent
from localllm.backends.engine_inbox import Control, Job
from localllm.backends.llamacpp_batch import DECODE_ABORTED, DECODE_NO_KV_SLOT, DECODE_OK, StepBatch
from localllm.backends.llamacpp_embedder import Embedder, EmbedJob
from localllm.backends.llamacpp_guessers import make_guesser
from localllm.backends.llamacpp_outbox import Outbox
from localllm.backends.llamacpp_sampler import build_sampler
from localllm.backends.llamacpp_scheduler import Scheduler
from localllm.backends.llamacpp_slots import Slot, SlotCache, SlotTable
from localllm.backends.llamacpp_speculative import Speculation
from localllm.backends.logprobs import top_logprobs
from localllm.backends.textstream import TextStream
from localllm.core.errors import BackendError
from localllm.core.speculation import SpeculationOptions
from localllm.core.harmony import CHANNEL as HARMONY_CHANNEL, MARKERS as HARMONY_MARKERS
from localllm.engine_kit.llama_glue import single_tokens, token_piece



@dataclass
class EngineConfig:
    model_path: str
    n_ctx: int  # KV cells shared by all slots; also the most one request may use
    n_parallel: int  # slots: sequences decoded together
    n_batch: int  # tokens per step (one llama_decode)
    prefill_chunk: int  # prompt tokens per step while other sequences generate
    n_threads: int
    n_gpu_layers: int = 0
    verbose: bool = False
    speculation: SpeculationOptions | None = None  # None (or method off): no guessing
    pooling_type: int | None = None  # the GGUF's own (embedding models); None: mean pooling


class LlamaCppEngine:
    def __init__(self, config: EngineConfig, control: Control) -> None:
        self.config = config
        self.control = control
        self.slots = SlotTable(config.n_parallel)
        self.scheduler = Scheduler(self.slots, config.n_batch, config.prefill_chunk)
        self.outbox = Outbox()
        self.speculation: Speculation | None = None  # None: no guessing
        self.embedder: Embedder | None = None
        self._prompt_tokens_total = 0
        self._reused_tokens_total = 0
        self._reuse_hits = 0

    # -- loading ------------------------------------------------------------------
    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        cfg = self.config
        self.lc, self.internals = llama_cpp, _internals
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = cfg.n_gpu_layers
        self.model = _internals.LlamaModel(path_model=cfg.model_path, params=model_params, verbose=cfg.verbose)
        if cfg.n_parallel > llama_cpp.llama_max_parallel_sequences():
            raise BackendError(f"llama.cpp runs at most {llama_cpp.llama_max_parallel_sequences()} sequences at once")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = cfg.n_ctx
        ctx_params.n_batch = cfg.n_batch
        ctx_params.n_ubatch = cfg.n_batch  # one ubatch per step: an abort or a full cache undoes the whole step
        ctx_params.n_seq_max = cfg.n_parallel
        ctx_params.kv_unified = True
        ctx_params.swa_full = True
        ctx_params.n_threads = cfg.n_threads
        ctx_params.n_threads_batch = cfg.n_threads
        ctx_params.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=ctx_params, verbose=cfg.verbose)
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = StepBatch(llama_cpp, self.ctx, cfg.n_batch, self.control)
        self.n_vocab = self.model.n_vocab()
        # gpt-oss: its reader needs harmony's markers, control tokens in its vocabulary; only a vocabulary with
        # <|channel|> is harmony's (Phi's <|end|> is a control token too, and must stay unprinted there)
        harmony = single_tokens(self.model, (HARMONY_CHANNEL,))
        self.shown_controls = single_tokens(self.model, HARMONY_MARKERS) if harmony else frozenset()
        spec = cfg.speculation
        if spec is not None and spec.enabled:
            guesser = make_guesser(
                spec, llama_cpp, _internals, target=self.model, n_ctx=cfg.n_ctx, n_parallel=cfg.n_parallel,
                n_batch=cfg.n_batch, n_threads=cfg.n_threads, verbose=cfg.verbose,
            )
            self.speculation = Speculation(spec, guesser)
        n_swa = llama_cpp.llama_model_n_swa(self.model.model)
        mirror = self.speculation.guesser if self.speculation is not None else None
        self.cache = SlotCache(llama_cpp, self.mem, n_swa, self.slots, mirror)
        self.embedder = Embedder(
            llama_cpp, _internals, self.model, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads,
            pooling=cfg.pooling_type, verbose=cfg.verbose,
        )
        with self.control.lock:
            self.control.stats.slots_total = cfg.n_parallel

    def unload(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self.speculation is not None:
            self.speculation.close()
            self.speculation = None
        batch = getattr(self, "batch", None)
        if batch is not None:
            batch.close()
            self.batch = None
        for part in ("ctx", "model"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Step until the inbox says stop; then end every request still here with 'abort'."""
        try:
            while self._take_inbox(block=not (self.scheduler.waiting or self.slots.busy() or self.embedder.pending)):
                try:
                    self._reap_aborted()
                    self._admit()
                    if self.slots.busy():
                        self._step()
                except Exception as exc:  # a failed step must not take the engine down
                    self._fail_all(f"generation failed: {exc}")
                if self.embedder.pending:
                    try:
                        self._embed_step()
                    except Exception as exc:  # nor a failed embedding
                        self.embedder.fail_all(f"embedding failed: {exc}")
                self._deliver()
                self._publish_stats()
        finally:
            for slot in self.slots.busy():
                self._finish(slot.job, "abort", slot)
            while self.scheduler.waiting:
                self._finish(self.scheduler.waiting.popleft(), "abort")
            self._deliver()
            self.embedder.close()

    def _take_inbox(self, *, block: bool) -> bool:
        """Move new jobs to the waiting queue; False once asked to stop."""
        inbox = self.control.inbox
        try:
            message = inbox.get() if block else inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if message is None:
                return False
            if isinstance(message, Job):
                self.scheduler.waiting.append(message)
            elif isinstance(message, EmbedJob):
                self.embedder.add(message)
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                return True

    def _reap_aborted(self) -> None:
        with self.control.lock:
            aborted = set(self.control.aborted)
        if not aborted:
            return
        waiting = self.scheduler.waiting
        for job in [j for j in waiting if j.rid in aborted]:
            waiting.remove(job)
            self._finish(job, "abort")
        for slot in self.slots.busy():
            if slot.job.rid in aborted:
                self._finish(slot.job, "abort", slot)

    def _embed_step(self) -> None:
        """One decode of embedding inputs; a short one while streams are generating."""
        generating = any(s.job.generated for s in self.slots.busy())
        self.embedder.step(self.config.prefill_chunk if generating else self.embedder.n_ctx)

    def _admit(self) -> None:
        """Start what the scheduler admits: a sampler, and the slot's cache from the longest cached prefix."""
        while (admission := self.scheduler.next_admission()) is not None:
            job, plan = admission
            first_time = job.sampler is None
            if first_time:
                try:
                    job.sampler = build_sampler(self.internals, self.lc, self.model, job.request.params, self.config.n_ctx)
                except Exception as exc:
                    self._finish(job, "error", error=f"generation failed: {exc}")
                    continue
            slot = plan.slot
            reuse = self.cache.take_prefix(slot, plan.source, plan.reuse)
            slot.job, slot.todo = job, (job.prompt + job.generated)[reuse:]
            slot.admitted_at = time.perf_counter()
            if first_time:
                job.admitted_at = slot.admitted_at
                job.timings.queued_s = job.admitted_at - job.queued_at
                job.usage.prompt_tokens = len(job.prompt)
                job.usage.cached_prompt_tokens = reuse
                job.stream = TextStream(stop=list(job.request.params.stop))
                job.spec = self.speculation.new_record() if self.speculation is not None else None
                self._prompt_tokens_total += len(job.prompt)
                self._reused_tokens_total += reuse
                self._reuse_hits += reuse > 0
            with self.control.lock:
                self.control.stats.waiting -= 1
                self.control.stats.running += 1

    # -- one step -------------------------------------------------------------------------
    def _step(self) -> None:
        """Schedule, decode once, then take each slot's next token (or check its guesses)."""
        spec = self.speculation
        work = self.scheduler.schedule(spec.add_guesses if spec is not None else None)
        if not work:
            return
        rows = self.batch.fill(work)
        prompt_rids = frozenset(slot.job.rid for slot, chunk in work if len(chunk) > 1 and not slot.guesses)
        status = self.batch.decode(prompt_rids)
        guessed = [slot for slot, _ in work if slot.guesses]
        if status != DECODE_OK:
            for slot in guessed:  # the guesses go; the next step makes new ones
                self.cache.drop_guesses(slot)
        if status == DECODE_NO_KV_SLOT:
            if guessed:
                spec.skip_next = True  # perhaps only the guesses did not fit
            else:
                self._make_room()
            return
        if status == DECODE_ABORTED:
            self.cache.resync([slot for slot, _ in work])
            return
        if status != DECODE_OK:
            raise RuntimeError(f"llama_decode returned {status}")
        if spec is not None:
            spec.skip_next = False
        for slot, chunk in work:
            slot.cached += chunk
            slot.todo = slot.todo[len(chunk):]  # a guessing slot ran all of it
        for slot, row in rows:
            if slot.guesses:
                self._verify(slot, row)
            else:
                self._sample(slot, row)

    def _make_room(self) -> None:
        """The KV cache is full: drop an idle cache, or else preempt the youngest request."""
        for slot in self.slots.eviction_order():
            self.cache.drop(slot)
            return
        youngest = self.scheduler.preempt_youngest()
        if youngest is not None:
            self.cache.drop(youngest)
            with self.control.lock:
                self.control.stats.running -= 1
                self.control.stats.waiting += 1
            return
        for slot in self.slots.busy():  # one request filled the context alone
            self._finish(slot.job, "error", slot, error="the context is full")
            self.cache.drop(slot)

    # -- tokens out ------------------------------------------------------------------------
    def _sample(self, slot: Slot, row: int) -> None:
        token = self._draw(slot, row)
        if token is not None and self._take(slot, token, row):
            slot.todo = [token]

    def _verify(self, slot: Slot, row: int) -> None:
        """Check the slot's guesses (llamacpp_speculative.py); the cells of guesses not kept go."""
        verdict = self.speculation.verify(slot, row, self._draw, self._take)
        self.cache.trim(slot, verdict.verified)
        with self.control.lock:
            self.control.stats.spec_draft_tokens += verdict.checked
            self.control.stats.spec_accepted_tokens += verdict.kept

    def _draw(self, slot: Slot, row: int) -> int | None:
        """The request's next token from the logits at `row`; None if that ended the request."""
        job = slot.job
        try:
            return job.sampler.sample(self.ctx, row)
        except Exception as exc:  # a grammar with no way forward ends this request only
            self._finish(job, "error", slot, error=f"generation failed: {exc}")
            return None

    def _take(self, slot: Slot, token: int, row: int) -> bool:
        """Record and stream a drawn token; False if it ended the request."""
        job = slot.job
        params = job.request.params
        now = time.perf_counter()
        if not job.generated:
            job.first_at = now
            job.timings.prompt_s = now - job.admitted_at
            job.timings.ttft_s = now - job.queued_at
        job.last_at = now
        job.generated.append(token)
        job.usage.completion_tokens += 1
        if self.lc.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(job, "stop", slot)
            return False
        logprobs = None
        if params.logprobs is not None:
            logprobs = [top_logprobs(self.ctx.ctx, self.n_vocab, token, params.logprobs, self._piece, row)]
        scan = job.stream.feed(self._piece(token))
        self.outbox.put(job, TokenEvent(job.rid, scan.text, [token], logprobs))
        if scan.stopped:
            self._finish(job, "stop", slot)
        elif job.usage.completion_tokens >= job.limit:
            self._finish(job, "length", slot)
        else:
            return True
        return False

    def _piece(self, token: int) -> bytes:
        """The bytes of one token as text (control tokens such as <eos> give b"")."""
        return token_piece(self.lc, self.model.vocab, token, special=token in self.shown_controls)

    def _deliver(self) -> None:
        """Hand the step's events over (llamacpp_outbox.py); a request whose loop is gone is aborted next step."""
        lost = self.outbox.deliver()
        if lost:
            with self.control.lock:
                self.control.aborted.update(rid for rid in lost if rid in self.control.active)

    def _finish(self, job: Job, reason: str, slot: Slot | None = None, error: str | None = None) -> None:
        """End a request: flush held-back text, free its slot (its cache stays), send the finish event."""
        now = time.perf_counter()
        if reason in ("stop", "length") and job.stream is not None:
            # text held back because it might have begun a stop string is part of the
            # answer when the output ends otherwise; after a stop string flush() gives nothing
            tail = job.stream.flush()
            if tail:
                self.outbox.put(job, TokenEvent(job.rid, tail, []))
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if slot is not None:
            slot.job, slot.todo = None, []
            slot.last_used = time.monotonic()
            self.scheduler.held = False
        job.timings.decode_s = job.last_at - job.first_at
        job.timings.total_s = now - job.queued_at
        usage = job.usage
        with self.control.lock:  # before the finish event, so the id is free once a client sees it
            self.control.active.discard(job.rid)
            self.control.aborted.discard(job.rid)
            stats = self.control.stats
            if slot is not None:
                stats.running -= 1
            else:
                stats.waiting -= 1
            stats.requests_finished += 1
            if usage.completion_tokens:
                stats.last_ttft_s = job.timings.ttft_s
                stats.last_decode_tokens_per_s = job.timings.decode_tokens_per_s(usage.completion_tokens)
            if usage.draft_tokens:
                stats.last_spec_acceptance_rate = usage.accepted_draft_tokens / usage.draft_tokens
        matched = job.stream.matched if job.stream is not None else None
        self.outbox.put(job, FinishEvent(job.rid, reason, usage, job.timings, error, matched))  # type: ignore[arg-type]

    def _fail_all(self, message: str) -> None:
        """After an unexpected failure: end every running request with an error and start from a clean cache."""
        for slot in self.slots.busy():
            self._finish(slot.job, "error", slot, error=message)
        self.cache.clear()

    def _publish_stats(self) -> None:
        cells = self.slots.cells_in_use()
        with self.control.lock:
            stats = self.control.stats
            stats.kv_used_ratio = cells / self.config.n_ctx
            stats.prefix_cache_hits = self._reuse_hits
            stats.prefix_cache_tokens = self._reused_tokens_total
            if self._prompt_tokens_total:
                stats.prefix_cache_hit_rate = self._reused_tokens_total / self._prompt_tokens_total
