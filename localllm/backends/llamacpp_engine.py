"""The batched llama.cpp engine: one thread, one `llama_decode` per step for every active sequence.

This is what llama.cpp's own server does, written against the C API through
llama-cpp-python's low-level bindings:

* Each request runs in a *slot*, a sequence id of one unified KV cache
  (`kv_unified`: all sequences draw cells from one pool, so one request may use
  the whole context, and a prefix shared between sequences occupies its cells
  once). `n_parallel` slots decode together.
* A step builds one `llama_batch`: first the one pending token of every
  generating sequence, then prompt tokens, shortest remaining prompt first, up
  to a token budget (`n_batch`, and `prefill_chunk` while anyone is
  generating), so running streams keep flowing while a long prompt is chunked.
  Requests join and leave at any step.
* Each request has its own sampler chain (seeds, penalties, grammar), reads the
  logits of its own row, and streams its text through its own TextStream.
* Prompt reuse: a new request starts from the longest prefix it shares with any
  slot's cache (`llama_memory_seq_cp`); an idle slot keeps its cache until the
  cells are needed.
* When the cache is full, idle caches are dropped (least recently used first);
  if that is not enough the youngest running request is preempted: its cells
  are freed and it is queued again with its prompt and output so far, and
  nothing is admitted until a running request ends; then it is recomputed
  (or reused). Its client only sees a pause.
* The sliding-window cache is full size (`swa_full`): with llama.cpp's default
  small window cache, positions that slid out of the window are overwritten and
  no prefix longer than the window could be reused.
* Events go out once per step: one wake-up per client event loop, however many
  of its requests got a token.
* Speculative decoding (llamacpp_speculative.py): a generating sequence may put
  guessed tokens after its pending one; their rows get logits, the request's
  sampler checks them in order, and the cells of rejected guesses are removed.
* Embeddings (llamacpp_embedder.py) run in a second context on the same
  weights, one decode of many inputs between chat steps; while anyone
  generates, a decode takes about a prefill chunk's worth of tokens.

llama.cpp's arithmetic depends slightly on batch shape, so a greedy output
beside other requests may part from the same request alone at a near-tie
(docs/ARCHITECTURE.md has the measurements).

The engine thread is the only one that touches the model's context. Front ends
talk to it through `Control` (engine_inbox.py): an inbox of jobs, and a set of aborted ids.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import time
from dataclasses import dataclass

from localllm.core.requests import Event, FinishEvent, TokenEvent
from localllm.backends.engine_inbox import Control, Job
from localllm.backends.llamacpp_embedder import Embedder, EmbedJob
from localllm.backends.llamacpp_sampler import build_sampler
from localllm.backends.llamacpp_slots import Slot, SlotTable
from localllm.backends.llamacpp_speculative import GuessRequest, SpeculationConfig, SpecRecord, make_guesser
from localllm.backends.logprobs import top_logprobs
from localllm.backends.textstream import TextStream
from localllm.core.errors import BackendError
from localllm.engine_kit.llama_glue import token_piece

DECODE_OK, DECODE_NO_KV_SLOT, DECODE_ABORTED = 0, 1, 2  # llama_decode's statuses


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
    speculation: SpeculationConfig | None = None  # None: no guessing
    pooling_type: int | None = None  # the GGUF's own (embedding models); None: mean pooling


class LlamaCppEngine:
    def __init__(self, config: EngineConfig, control: Control) -> None:
        self.config = config
        self.control = control
        self.slots = SlotTable(config.n_parallel)
        self.waiting: collections.deque[Job] = collections.deque()
        self._watch: frozenset[str] = frozenset()  # requests whose prompt the running decode processes
        self._prompt_tokens_total = 0
        self._reused_tokens_total = 0
        self._reuse_hits = 0
        self.preemptions = 0  # requests sent back to wait because the KV cache was full
        self._held = False  # after a preemption, admit nothing until a running request ends
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        self.guesser = None  # speculative decoding's source of guesses (None: off)
        self._skip_guesses = False  # the last step with guesses found the cache full: one step without
        self.embedder: Embedder | None = None

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
        self.batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self.n_swa = llama_cpp.llama_model_n_swa(self.model.model)
        self.n_vocab = self.model.n_vocab()
        self._abort_callback = llama_cpp.ggml_abort_callback(self._should_abort_compute)
        self._no_abort_callback = llama_cpp.ggml_abort_callback(0)  # NULL: no Python call per graph node
        spec = cfg.speculation
        if spec is not None:
            self.guesser = make_guesser(
                spec, llama_cpp, _internals, target=self.model, n_ctx=cfg.n_ctx, n_parallel=cfg.n_parallel,
                n_batch=cfg.n_batch, n_threads=cfg.n_threads, verbose=cfg.verbose,
            )
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
        if self.guesser is not None:
            self.guesser.close()
            self.guesser = None
        batch = getattr(self, "batch", None)
        if batch is not None:
            self.lc.llama_batch_free(batch)
            self.batch = None
        for part in ("ctx", "model"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Step until the inbox says stop; then end every request still here with 'abort'."""
        try:
            while self._take_inbox(block=not (self.waiting or self.slots.busy() or self.embedder.pending)):
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
            while self.waiting:
                self._finish(self.waiting.popleft(), "abort")
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
                self.waiting.append(message)
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
        for job in [j for j in self.waiting if j.rid in aborted]:
            self.waiting.remove(job)
            self._finish(job, "abort")
        for slot in self.slots.busy():
            if slot.job.rid in aborted:
                self._finish(slot.job, "abort", slot)

    def _embed_step(self) -> None:
        """One decode of embedding inputs; a short one while streams are generating."""
        generating = any(s.job.generated for s in self.slots.busy())
        self.embedder.step(self.config.prefill_chunk if generating else self.embedder.n_ctx)

    # -- admission --------------------------------------------------------------------
    def _admit(self) -> None:
        """Give waiting requests (oldest first) idle slots, starting from the longest cached prefix."""
        while self.waiting and not self._held:
            job = self.waiting[0]
            tokens = job.prompt + job.generated  # a preempted request resumes where it was
            plan = self.slots.plan(tokens)
            if plan is None:
                return
            self.waiting.popleft()
            first_time = job.sampler is None
            if first_time:
                try:
                    job.sampler = build_sampler(self.internals, self.lc, self.model, job.request.params, self.config.n_ctx)
                except Exception as exc:
                    self._finish(job, "error", error=f"generation failed: {exc}")
                    continue
            slot = plan.slot
            reuse = self._take_prefix(slot, plan.source, plan.reuse)
            slot.job, slot.todo = job, tokens[reuse:]
            slot.admitted_at = time.perf_counter()
            if first_time:
                job.admitted_at = slot.admitted_at
                job.timings.queued_s = job.admitted_at - job.queued_at
                job.usage.prompt_tokens = len(job.prompt)
                job.usage.cached_prompt_tokens = reuse
                job.stream = TextStream(stop=list(job.request.params.stop))
                spec = self.config.speculation
                job.spec = SpecRecord(min(spec.start_tokens, spec.num_tokens)) if spec is not None else None
                self._prompt_tokens_total += len(job.prompt)
                self._reused_tokens_total += reuse
                self._reuse_hits += reuse > 0
            with self.control.lock:
                self.control.stats.waiting -= 1
                self.control.stats.running += 1

    def _take_prefix(self, slot: Slot, source: Slot | None, reuse: int) -> int:
        """Make `slot`'s sequence hold the first `reuse` tokens of `source`'s; the number it holds."""
        lc, mem = self.lc, self.mem
        if source is not None and reuse > 0 and not self._prefix_intact(source, reuse):
            reuse = 0
        if source is slot and reuse > 0 and lc.llama_memory_seq_rm(mem, slot.seq_id, reuse, -1):
            slot.cached = slot.cached[:reuse]
            return reuse  # the draft, if any, trims its own copy when it next guesses
        self._drop_cache(slot)
        if source is None or source is slot or reuse <= 0:
            return 0
        lc.llama_memory_seq_cp(mem, source.seq_id, slot.seq_id, 0, reuse)
        slot.cached = source.cached[:reuse]
        if self.guesser is not None:
            self.guesser.copy_prefix(source.seq_id, slot.seq_id, reuse)
        return reuse

    def _prefix_intact(self, source: Slot, reuse: int) -> bool:
        """Whether the sliding-window layers still hold what a continuation after `reuse` tokens attends to.

        llama.cpp may overwrite window cells that slid out of every sequence's
        window; the positions it keeps for a sequence are always one run from
        its smallest position (`llama_memory_seq_pos_min`) to its largest.
        """
        pos_min = self.lc.llama_memory_seq_pos_min(self.mem, source.seq_id)
        if pos_min <= 0:
            return True
        return self.n_swa > 0 and pos_min <= reuse - self.n_swa

    # -- one step -------------------------------------------------------------------------
    def _step(self) -> None:
        work = self._schedule()
        if not work:
            return
        rows = self._fill_batch(work)
        prompt_rids = frozenset(slot.job.rid for slot, chunk in work if len(chunk) > 1 and not slot.guesses)
        status = self._decode(prompt_rids)
        guessed = [slot for slot, _ in work if slot.guesses]
        if status != DECODE_OK:
            for slot in guessed:  # the guesses go; the next step makes new ones
                self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.cached) + len(slot.todo), -1)
                slot.guesses = []
        if status == DECODE_NO_KV_SLOT:
            if guessed:
                self._skip_guesses = True  # perhaps only the guesses did not fit
            else:
                self._make_room()
            return
        if status == DECODE_ABORTED:
            self._resync([slot for slot, _ in work])
            return
        if status != DECODE_OK:
            raise RuntimeError(f"llama_decode returned {status}")
        self._skip_guesses = False
        for slot, chunk in work:
            slot.cached += chunk
            slot.todo = slot.todo[len(chunk):]  # a guessing slot ran all of it
        for slot, row in rows:
            if slot.guesses:
                self._verify(slot, row)
            else:
                self._sample(slot, row)

    def _schedule(self) -> list[tuple[Slot, list[int]]]:
        """The tokens each slot runs this step: every pending output token, then prompt chunks."""
        busy = [s for s in self.slots.busy() if s.todo]
        single = [s for s in busy if len(s.todo) == 1]
        prompts = sorted((s for s in busy if len(s.todo) > 1), key=lambda s: (len(s.todo), s.admitted_at))
        work = [(s, list(s.todo)) for s in single]
        budget = self.config.n_batch - len(work)
        if self.guesser is not None:
            budget -= self._add_guesses(single, budget)
            work = [(s, s.todo + s.guesses) for s in single]
        if any(s.job.generated for s in single):
            budget = min(budget, self.config.prefill_chunk)  # keep the streams flowing
        for slot in prompts:
            if budget <= 0:
                break
            chunk = slot.todo[:budget]
            work.append((slot, chunk))
            budget -= len(chunk)
        return work

    def _add_guesses(self, single: list[Slot], room: int) -> int:
        """Give generating slots guesses to check this step (`slot.guesses`); the rows they add.

        Only while few sequences generate: each guess costs a row with logits.
        A request's guesses never run past its token limit.
        """
        spec = self.config.speculation
        generating = [s for s in single if s.job.generated]
        if self._skip_guesses or not generating or len(generating) > spec.max_generating:
            return 0
        requests, slots = [], []
        for slot in generating:
            job = slot.job
            k = min(job.spec.k, job.limit - job.usage.completion_tokens - 1, room)
            if k <= 0 or not job.spec.guesses_beside(len(generating) - 1, spec):
                continue
            job.spec.asked = k
            requests.append(GuessRequest(slot.seq_id, job.prompt + job.generated, k, job.request.params, len(job.generated)))
            slots.append(slot)
            room -= k
        if not requests:
            return 0
        added = 0
        for slot, request, guesses in zip(slots, requests, self.guesser.guess(requests)):
            slot.guesses = guesses[: request.k]
            added += len(slot.guesses)
        return added

    def _fill_batch(self, work: list[tuple[Slot, list[int]]]) -> list[tuple[Slot, int]]:
        """Write the step's tokens into the llama_batch; (slot, row) for each slot that gets logits.

        A slot gets logits once its input is complete: at its last token, or,
        with guesses, at its pending token and every guess (the row given is
        the first of those).
        """
        batch = self.batch
        rows: list[tuple[Slot, int]] = []
        i = 0
        for slot, chunk in work:
            start = len(slot.cached)
            complete = len(chunk) == len(slot.todo) + len(slot.guesses)
            first = len(chunk) - 1 - len(slot.guesses) if complete else len(chunk)
            for j, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = slot.seq_id
                batch.logits[i] = j >= first
                i += 1
            if complete:
                rows.append((slot, i - len(chunk) + first))
        batch.n_tokens = i
        return rows

    def _decode(self, prompt_rids: frozenset[str]) -> int:
        """One llama_decode. While it processes prompts, llama.cpp asks between graph nodes
        whether to stop, so an abort lands within milliseconds; pure generation steps are
        short and skip the callback (it takes the GIL once per node)."""
        lc, ctx = self.lc, self.ctx.ctx
        if not prompt_rids:
            return lc.llama_decode(ctx, self.batch)
        self._watch = prompt_rids
        lc.llama_set_abort_callback(ctx, self._abort_callback, None)
        try:
            return lc.llama_decode(ctx, self.batch)
        finally:
            self._watch = frozenset()
            lc.llama_set_abort_callback(ctx, self._no_abort_callback, None)

    def _should_abort_compute(self, _data) -> bool:
        """Called by llama.cpp between graph nodes while a step processes prompts."""
        return not self._watch.isdisjoint(self.control.aborted)

    def _resync(self, slots: list[Slot]) -> None:
        """After an aborted decode, believe llama.cpp about what each sequence now holds."""
        for slot in slots:
            have = self.lc.llama_memory_seq_pos_max(self.mem, slot.seq_id) + 1
            if have > len(slot.cached):
                n = have - len(slot.cached)
                slot.cached, slot.todo = slot.cached + slot.todo[:n], slot.todo[n:]
            elif have < len(slot.cached):
                slot.todo = slot.cached[have:] + slot.todo
                slot.cached = slot.cached[:have]
            if not slot.todo and slot.cached:  # its logits are gone: run its last token again
                self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.cached) - 1, -1)
                slot.todo = [slot.cached.pop()]

    def _make_room(self) -> None:
        """The KV cache is full: drop an idle cache, or else preempt the youngest request."""
        for slot in self.slots.eviction_order():
            self._drop_cache(slot)
            return
        busy = sorted(self.slots.busy(), key=lambda s: s.admitted_at)
        if len(busy) <= 1:
            for slot in busy:
                self._finish(slot.job, "error", slot, error="the context is full")
                self._drop_cache(slot)
            return
        youngest = busy[-1]
        self.preemptions += 1
        self._held = True  # or it would come straight back and fill the cache again
        job = youngest.job
        youngest.job, youngest.todo = None, []
        self._drop_cache(youngest)
        self.waiting.appendleft(job)
        with self.control.lock:
            self.control.stats.running -= 1
            self.control.stats.waiting += 1

    def _drop_cache(self, slot: Slot) -> None:
        self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.cached = []
        if self.guesser is not None:
            self.guesser.forget(slot.seq_id)

    # -- tokens out ------------------------------------------------------------------------
    def _sample(self, slot: Slot, row: int) -> None:
        token = self._draw(slot, row)
        if token is not None and self._take(slot, token, row):
            slot.todo = [token]

    def _verify(self, slot: Slot, row: int) -> None:
        """Check the slot's guesses against its sampler's draws at rows row, row + 1, ...

        Every drawn token is the request's (the sampler sees exactly what plain
        decoding would); drawing stops at the first token that is not the next
        guess, after the last guess, or when the request ends. The cells of
        guesses not kept are removed.
        """
        job, guesses = slot.job, slot.guesses
        slot.guesses = []
        verified = len(slot.cached) - len(guesses)  # the pending token and what came before
        kept = checked = 0
        for i in range(len(guesses) + 1):
            token = self._draw(slot, row + i)
            if token is None:
                break
            is_guess = i < len(guesses) and token == guesses[i]
            if i < len(guesses):
                checked += 1
                kept += is_guess
                job.usage.draft_tokens += 1
                job.usage.accepted_draft_tokens += is_guess
            if not self._take(slot, token, row + i):
                break
            if not is_guess:
                slot.todo = [token]
                break
        verified += kept
        if verified < len(slot.cached):
            self.lc.llama_memory_seq_rm(self.mem, slot.seq_id, verified, -1)
            del slot.cached[verified:]
        job.spec.record(checked, kept, self.config.speculation)
        with self.control.lock:
            self.control.stats.spec_draft_tokens += checked
            self.control.stats.spec_accepted_tokens += kept

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
        self._emit(job, TokenEvent(job.rid, scan.text, [token], logprobs))
        if scan.stopped:
            self._finish(job, "stop", slot)
        elif job.usage.completion_tokens >= job.limit:
            self._finish(job, "length", slot)
        else:
            return True
        return False

    def _piece(self, token: int) -> bytes:
        """The bytes of one token as text (control tokens such as <eos> give b"")."""
        return token_piece(self.lc, self.model.vocab, token)

    def _emit(self, job: Job, event: Event) -> None:
        """Queue an event for the request's loop; `_deliver` hands them over after the step."""
        self._outbox.setdefault(job.loop, []).append((job, event))

    def _deliver(self) -> None:
        """One wake-up per event loop per step, however many of its requests got a token.

        A loop that is gone (its client's program ended) cannot take events: its
        requests are aborted at the next step.
        """
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(job.events, event) for job, event in items])
            except RuntimeError:
                with self.control.lock:
                    self.control.aborted.update(job.rid for job, _ in items if job.rid in self.control.active)

    def _finish(self, job: Job, reason: str, slot: Slot | None = None, error: str | None = None) -> None:
        """End a request: flush held-back text, free its slot (its cache stays), send the finish event."""
        now = time.perf_counter()
        if reason in ("stop", "length") and job.stream is not None:
            # text held back because it might have begun a stop string is part of the
            # answer when the output ends otherwise; after a stop string flush() gives nothing
            tail = job.stream.flush()
            if tail:
                self._emit(job, TokenEvent(job.rid, tail, []))
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if slot is not None:
            slot.job, slot.todo = None, []
            slot.last_used = time.monotonic()
            self._held = False
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
        self._emit(job, FinishEvent(job.rid, reason, usage, job.timings, error, matched))  # type: ignore[arg-type]

    def _fail_all(self, message: str) -> None:
        """After an unexpected failure: end every running request with an error and start from a clean cache."""
        for slot in self.slots.busy():
            self._finish(slot.job, "error", slot, error=message)
        self.lc.llama_memory_clear(self.mem, True)
        for slot in self.slots.slots:
            slot.cached, slot.todo, slot.guesses = [], [], []
        if self.guesser is not None:
            self.guesser.clear()

    def _publish_stats(self) -> None:
        cells = self.slots.cells_in_use()
        with self.control.lock:
            stats = self.control.stats
            stats.kv_used_ratio = cells / self.config.n_ctx
            stats.prefix_cache_hits = self._reuse_hits
            stats.prefix_cache_tokens = self._reused_tokens_total
            if self._prompt_tokens_total:
                stats.prefix_cache_hit_rate = self._reused_tokens_total / self._prompt_tokens_total


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    """Runs on a request's event loop: each event into its request's queue."""
    for events, event in items:
        events.put_nowait(event)
