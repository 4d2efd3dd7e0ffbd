"""One llama_decode of a step's tokens: the llama_batch it reads, and an abort that lands mid-prompt.

Each slot's tokens go in at their positions in the slot's sequence. A slot
gets logits once its input is complete: at its last token, or, with guesses,
at its pending token and every guess (one row each, in order), so the engine
can check them one after another.

While a step processes prompts, llama.cpp asks between graph nodes whether
to stop, so an abort lands within milliseconds; pure generation steps are
short and skip the callback (it takes the GIL once per node).
"""

from __future__ import annotations

from localllm.backends.llamacpp_slots import Slot

DECODE_OK, DECODE_NO_KV_SLOT, DECODE_ABORTED = 0, 1, 2  # llama_decode's statuses


class StepBatch:
    def __init__(self, lc, ctx, n_batch: int, control) -> None:
        self.lc, self.ctx = lc, ctx
        self.control = control  # its `aborted` set: read between graph nodes
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self._watch: frozenset[str] = frozenset()  # requests whose prompt the running decode processes
        self._abort_callback = lc.ggml_abort_callback(self._should_abort_compute)
        self._no_abort_callback = lc.ggml_abort_callback(0)  # NULL: no Python call per graph node

    def fill(self, work: list[tuple[Slot, list[int]]]) -> list[tuple[Slot, int]]:
        """Write the step's tokens into the llama_batch; (slot, row) for each slot that gets logits
        (with guesses, the row given is the first of its rows)."""
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

    def decode(self, prompt_rids: frozenset[str]) -> int:
        """One llama_decode; abortable while it processes the prompts of `prompt_rids`."""
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

    def close(self) -> None:
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
