"""Embeddings for the batched llama.cpp engine: pooled hidden states, many inputs per `llama_decode`.

Why a second context rather than toggling `llama_set_embeddings` on the chat one:

* The chat context's pooling type is fixed when it is made (none for a chat
  model), so it can only hand out per-token states; a context made with
  `embeddings` on and a pooling type gets llama.cpp's own pooled vector per
  sequence (`llama_get_embeddings_seq`): mean for chat models, the model's own
  (CLS, last token, mean) for embedding models.
* A sequence must be pooled within one ubatch, and non-causal models (BERT)
  need every token of an input in it; the chat context's ubatch is sized for
  streaming, this one is sized for whole inputs.
* Embedding inputs never take cells or sequence ids from the chat cache, so
  no prompt cache is evicted and no stream is preempted, and a chat step never
  returns pooled rows instead of logits.

Both contexts are made from the same `llama_model`: the weights are in memory
once. This context is made on the first embedding request (chat-only use pays
nothing) and only the engine thread touches it; its cache is cleared after
every decode, since no input is continued.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import time
from dataclasses import dataclass, field
from typing import Any

from localllm.core.errors import BackendError

MAX_EMBED_CONTEXT = 4096  # tokens per decode, and so the longest input (a compute buffer grows with its square)
MAX_EMBED_SEQUENCES = 64  # inputs pooled together in one decode
POOLING_MEAN, POOLING_RANK = 1, 4


@dataclass
class EmbedJob:
    """One embedding request: token lists in, unit vectors out through `future`."""

    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)
    vectors: list[list[float] | None] = field(default_factory=list)
    next_input: int = 0  # inputs before it are in a decode already

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)

    @property
    def scheduled(self) -> bool:
        return self.next_input >= len(self.inputs)


def embed_context_size(n_ctx: int) -> int:
    """The longest input the embedding context takes: the chat context's size, at most MAX_EMBED_CONTEXT."""
    return min(n_ctx, MAX_EMBED_CONTEXT)


def pooling_for(model_pooling: int | None) -> int:
    """The model's own pooling when the GGUF names one (an embedding model), else mean pooling."""
    if model_pooling == POOLING_RANK:
        raise BackendError("this model is a reranker: its pooled output is a score, not an embedding")
    return model_pooling if model_pooling and model_pooling > 0 else POOLING_MEAN


def normalized(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values] if norm > 0 else values


class Embedder:
    """The embedding context and the jobs waiting for it; called only on the engine thread."""

    def __init__(self, lc: Any, internals: Any, model: Any, *, n_ctx: int, n_threads: int, pooling: int | None, verbose: bool) -> None:
        self.lc, self.internals, self.model = lc, internals, model
        self.n_ctx = embed_context_size(n_ctx)
        self.n_threads, self.verbose = n_threads, verbose
        self.pooling = pooling
        self.jobs: list[EmbedJob] = []
        self.ctx = None
        self.batch = None

    @property
    def pending(self) -> bool:
        return bool(self.jobs)

    def add(self, job: EmbedJob) -> None:
        self.jobs.append(job)

    def _open(self) -> None:
        lc = self.lc
        params = lc.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_ctx  # an input is pooled within one ubatch
        params.n_seq_max = MAX_EMBED_SEQUENCES
        params.kv_unified = True  # one pool of cells: one long input or many short ones
        params.embeddings = True
        params.pooling_type = pooling_for(self.pooling)
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        self.ctx = self.internals.LlamaContext(model=self.model, params=params, verbose=self.verbose)
        self.mem = lc.llama_get_memory(self.ctx.ctx)
        self.batch = lc.llama_batch_init(self.n_ctx, 0, 1)
        n_out = getattr(lc, "llama_model_n_embd_out", None)
        self.width = n_out(self.model.model) if n_out is not None else lc.llama_model_n_embd(self.model.model)

    def step(self, budget: int) -> None:
        """One decode of queued inputs, up to `budget` tokens (always at least one input)."""
        self.jobs = [j for j in self.jobs if not j.future.cancelled()]
        if not self.jobs:
            return
        if self.ctx is None:
            try:
                self._open()
            except Exception as exc:
                self.fail_all(f"could not make an embedding context: {exc}")
                return
        work = self._pick(budget)
        try:
            self._decode(work)
        except Exception as exc:
            for job, _ in work:
                _settle(job, error=BackendError(f"embedding failed: {exc}"))
            self.jobs = [j for j in self.jobs if j not in {job for job, _ in work}]
            return
        for job in {id(j): j for j, _ in work}.values():
            if job.scheduled and all(v is not None for v in job.vectors):
                self.jobs.remove(job)
                _settle(job, result=job.vectors)

    def _pick(self, budget: int) -> list[tuple[EmbedJob, int]]:
        """(job, input index) pairs for one decode: oldest jobs first, whole inputs only."""
        work: list[tuple[EmbedJob, int]] = []
        used = 0
        for job in self.jobs:
            while not job.scheduled and len(work) < MAX_EMBED_SEQUENCES:
                size = len(job.inputs[job.next_input])
                if work and used + size > budget:
                    return work
                work.append((job, job.next_input))
                job.next_input += 1
                used += size
        return work

    def _decode(self, work: list[tuple[EmbedJob, int]]) -> None:
        lc, batch = self.lc, self.batch
        i = 0
        for seq, (job, index) in enumerate(work):
            for pos, token in enumerate(job.inputs[index]):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True  # every row is an output: pooling reads them all
                i += 1
        batch.n_tokens = i
        try:
            status = lc.llama_decode(self.ctx.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            for seq, (job, index) in enumerate(work):
                pointer = lc.llama_get_embeddings_seq(self.ctx.ctx, seq)
                if not pointer:
                    raise RuntimeError("llama.cpp gave no pooled embedding")
                values = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[: self.width]
                job.vectors[index] = normalized(values)
        finally:
            if self.mem:
                lc.llama_memory_clear(self.mem, True)

    def fail_all(self, message: str) -> None:
        for job in self.jobs:
            _settle(job, error=BackendError(message))
        self.jobs = []

    def close(self) -> None:
        for job in self.jobs:
            _settle(job, error=BackendError("the model was unloaded"))
        self.jobs = []
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None


def _settle(job: EmbedJob, *, result: Any = None, error: BaseException | None = None) -> None:
    """Hand a job's outcome to its event loop (a loop that is gone has nobody waiting)."""

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
