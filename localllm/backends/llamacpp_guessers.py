"""Where the llama.cpp engine's speculative guesses come from (llamacpp_speculative.py checks them).

- `NgramGuesser`, prompt lookup: the tokens that followed the latest earlier
  copy of the request's last 4..6 tokens (engine_kit/ngram.py, numba);
- `DraftGuesser`, a small GGUF sharing the model's vocabulary: its own context
  with one sequence per slot, greedy guesses (with the request's repetition
  penalties, which the model's sampler applies too), k decode steps for all
  guessing slots together.

Both answer `guess` for a batch of `GuessRequest`s and follow the slots'
caches (`copy_prefix`, `forget`, `clear`), so a draft's context mirrors what
each slot holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from localllm.core.requests import SamplingParams
from localllm.backends.llamacpp_slots import common_prefix
from localllm.core.errors import BadRequest
from localllm.core.speculation import SpeculationOptions


@dataclass
class GuessRequest:
    seq_id: int  # the slot's sequence
    history: list[int]  # every token of the request so far; the last one is not in the model's cache yet
    k: int  # the most guesses wanted
    params: SamplingParams | None = None  # the request's sampling (a draft applies its penalties)
    n_generated: int = 0  # how many of history's tokens the model generated (what penalties count)


class NgramGuesser:
    """Prompt lookup over each request's own tokens; keeps nothing between steps."""

    def __init__(self, min_n: int, max_n: int) -> None:
        from localllm.engine_kit.ngram import lookup  # numpy and (when installed) numba; no torch

        self._lookup = lookup
        self.min_n, self.max_n = min_n, max_n
        lookup([1, 2, 1, 2], 1, 1, 2)  # numba compiles (or loads its cache) now, not during someone's first request

    def guess(self, requests: list[GuessRequest]) -> list[list[int]]:
        return [self._lookup(r.history, r.k, self.min_n, self.max_n) for r in requests]

    def forget(self, seq_id: int) -> None:
        pass

    def copy_prefix(self, source: int, target: int, n: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Feed:
    index: int  # into the requests
    tokens: list[int]  # what this sequence runs in the draft step
    wants_logits: bool  # its history is complete after this step: its last row gives a guess


class DraftGuesser:
    """A small model's greedy guesses. Its context mirrors the slots: sequence i follows slot i.

    Each sequence holds a prefix of its request's tokens (`held`), plus at
    most the guesses of the last step; before guessing it drops what differs
    from the request's history and runs the rest (the prompt, the first
    time, in chunks of the step budget), then guesses k tokens in k - 1 more
    decode steps, all guessing sequences together.
    """

    def __init__(self, lc, internals, path: str, *, target, n_ctx: int, n_parallel: int, n_batch: int,
                 n_threads: int, n_gpu_layers: int, verbose: bool) -> None:
        self.lc = lc
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.model = internals.LlamaModel(path_model=path, params=params, verbose=verbose)
        try:
            check_same_vocabulary(lc, target, self.model)
            ctx_params = lc.llama_context_default_params()
            ctx_params.n_ctx = n_ctx
            ctx_params.n_batch = ctx_params.n_ubatch = n_batch
            ctx_params.n_seq_max = n_parallel
            ctx_params.kv_unified = True
            ctx_params.swa_full = True  # prefixes copied between slots stay whole
            ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
            ctx_params.no_perf = True
            self.ctx = internals.LlamaContext(model=self.model, params=ctx_params, verbose=verbose)
        except BaseException:
            self.model.close()
            raise
        self.mem = lc.llama_get_memory(self.ctx.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch
        self.n_vocab = self.model.n_vocab()
        self.held: list[list[int]] = [[] for _ in range(n_parallel)]

    def guess(self, requests: list[GuessRequest]) -> list[list[int]]:
        guesses: list[list[int]] = [[] for _ in requests]
        feeds = self._catch_up(requests)
        rows = self._decode([(requests[f.index].seq_id, f.tokens, f.wants_logits) for f in feeds]) if feeds else None
        if rows is None:
            return guesses
        guessing = [f.index for f in feeds if f.wants_logits]
        for row, i in zip(rows, guessing):
            guesses[i].append(self._pick(row, requests[i], guesses[i]))
        while True:  # one more draft step per further guess, every sequence that still wants one
            more = [i for i in guessing if len(guesses[i]) < requests[i].k]
            rows = self._decode([(requests[i].seq_id, [guesses[i][-1]], True) for i in more]) if more else None
            if rows is None:
                return guesses
            for row, i in zip(rows, more):
                guesses[i].append(self._pick(row, requests[i], guesses[i]))

    def _catch_up(self, requests: list[GuessRequest]) -> list[_Feed]:
        """Line each sequence up with its history; what each runs in the first draft step."""
        feeds: list[_Feed] = []
        budget = self.n_batch
        for index, request in enumerate(requests):
            held = self.held[request.seq_id]
            keep = min(common_prefix(held, request.history), len(request.history) - 1)  # the last token must run
            if keep < len(held):
                self.lc.llama_memory_seq_rm(self.mem, request.seq_id, keep, -1)
                del held[keep:]
            todo = request.history[keep:]
            if budget <= 0 or request.k <= 0:
                continue
            run = todo[:budget]
            budget -= len(run)
            feeds.append(_Feed(index, run, wants_logits=len(run) == len(todo)))
        return feeds

    def _decode(self, feeds: list[tuple[int, list[int], bool]]) -> list[int] | None:
        """One llama_decode of (sequence, tokens, logits at its last token).

        Returns the batch rows that have logits, in order; None (and a clean
        cache) if the decode failed.
        """
        batch, i = self.batch, 0
        rows: list[int] = []
        for seq_id, tokens, wants_logits in feeds:
            start = len(self.held[seq_id])
            for j, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = wants_logits and j == len(tokens) - 1
                if batch.logits[i]:
                    rows.append(i)
                i += 1
        batch.n_tokens = i
        if self.lc.llama_decode(self.ctx.ctx, batch) != 0:  # full, or failed: start again from nothing
            self.clear()
            return None
        for seq_id, tokens, _ in feeds:
            self.held[seq_id].extend(tokens)
        return rows

    def _pick(self, row: int, request: GuessRequest, guesses: list[int]) -> int:
        """The draft's most likely token after the batch's `row`, after the request's penalties."""
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx.ctx, row), shape=(self.n_vocab,))
        params = request.params
        if params is None or not _penalises(params):
            return int(logits.argmax())
        generated = request.history[len(request.history) - request.n_generated:] + guesses
        return int(penalised(logits, generated, params).argmax())

    def forget(self, seq_id: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq_id, -1, -1)
        self.held[seq_id] = []

    def copy_prefix(self, source: int, target: int, n: int) -> None:
        """The target slot took `n` tokens of the source slot's cache: the draft does the same, as far as it holds them."""
        self.forget(target)
        n = min(n, len(self.held[source]))
        if n > 0:
            self.lc.llama_memory_seq_cp(self.mem, source, target, 0, n)
            self.held[target] = self.held[source][:n]

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        self.held = [[] for _ in self.held]

    def close(self) -> None:
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()
        self.model.close()


def _penalises(params: SamplingParams) -> bool:
    return params.repeat_last_n != 0 and (
        params.repeat_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0
    )


def penalised(logits: np.ndarray, generated: list[int], params: SamplingParams) -> np.ndarray:
    """Logits after llama.cpp's penalties over the last repeat_last_n generated tokens (-1: all of them).

    Each token seen c times: a positive logit divided by repeat_penalty, a
    negative one multiplied, then c x frequency_penalty and presence_penalty
    subtracted.
    """
    window = generated if params.repeat_last_n < 0 else generated[len(generated) - params.repeat_last_n:]
    if not window:
        return logits
    ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    out = logits.copy()
    seen = out[ids]
    seen = np.where(seen > 0, seen / params.repeat_penalty, seen * params.repeat_penalty)
    out[ids] = seen - counts * params.frequency_penalty - params.presence_penalty
    return out


def check_same_vocabulary(lc, target, draft) -> None:
    """A draft's guesses are token ids: they mean something only if both models number tokens the same way."""
    n_target, n_draft = target.n_vocab(), draft.n_vocab()
    if n_target != n_draft:
        raise BadRequest(f"the draft model has {n_draft} tokens in its vocabulary and the model {n_target}; they must share one")
    for name in ("llama_vocab_bos", "llama_vocab_eos"):
        if getattr(lc, name)(target.vocab) != getattr(lc, name)(draft.vocab):
            raise BadRequest("the draft model's special tokens differ from the model's; they must share a vocabulary")
    for token in range(0, n_target, max(1, n_target // 512)):  # a spread of ids, both ends included
        for tid in (token, n_target - 1 - token):
            if _text(lc, target.vocab, tid) != _text(lc, draft.vocab, tid):
                raise BadRequest(f"the draft model's token {tid} differs from the model's; they must share a vocabulary")


def _text(lc, vocab, token: int) -> bytes:
    return lc.llama_vocab_get_text(vocab, token) or b""


def make_guesser(options: SpeculationOptions, lc, internals, *, target, n_ctx: int, n_parallel: int,
                 n_batch: int, n_threads: int, verbose: bool):
    if options.method == "ngram":
        return NgramGuesser(options.ngram_min, options.ngram_max)
    return DraftGuesser(lc, internals, str(options.draft), target=target, n_ctx=n_ctx, n_parallel=n_parallel,
                        n_batch=n_batch, n_threads=n_threads, n_gpu_layers=options.draft_n_gpu_layers, verbose=verbose)
