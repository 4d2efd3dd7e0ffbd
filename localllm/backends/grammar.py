"""Grammar-constrained sampling on llama.cpp, without paying for the grammar on every token.

A GBNF grammar (llama.cpp's grammar language) decides which tokens may come
next. Checking all 262,144 tokens of a large vocabulary against the grammar
costs several decode steps of a small model (docs/MEASUREMENTS.md).
So we do what llama.cpp's own tools do: sample from the unconstrained chain
first, ask the grammar about that one token, and only when the grammar refuses
it, mask the whole vocabulary and sample again. Most tokens of a JSON answer
are accepted on the first try.

A *lazy* grammar (`triggers`: regular expressions over the generated text) is
inactive until a trigger matches, then constrains the text from the start of
the trigger's first capture group (or of the whole match) onwards. That is how a
free-form answer may contain a tool call whose JSON is still forced to be valid.

Every token handed to the grammar's `accept` is one the grammar allows: llama.cpp
aborts the process on a token its grammar cannot take.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from localllm.core.errors import BadRequest

GRAMMAR_ROOT = b"root"


class GrammarDeadEnd(RuntimeError):
    """The grammar allows no token at all; generation cannot go on."""


def init_grammar(llama_cpp, vocab, grammar: str, triggers: list[str] | None = None):
    """A llama.cpp grammar sampler (a raw pointer the caller frees), or BadRequest if it does not parse."""
    text = grammar.encode("utf-8")
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*[t.encode("utf-8") for t in triggers])
        no_tokens = (llama_cpp.llama_token * 0)()
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            vocab, text, GRAMMAR_ROOT, patterns, len(triggers), no_tokens, 0
        )
    else:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text, GRAMMAR_ROOT)
    if not sampler:
        raise BadRequest("the grammar does not parse (GBNF with a 'root' rule expected)")
    return sampler


def check_grammar(llama_cpp, vocab, grammar: str, triggers: list[str] | None = None) -> None:
    """Raise BadRequest before a request is queued if its grammar cannot be used."""
    llama_cpp.llama_sampler_free(init_grammar(llama_cpp, vocab, grammar, triggers))


class GrammarSampler:
    """A sampler chain plus a grammar, sampled "chain first, grammar on refusal".

    Offers the `sample(ctx, idx)` / `close()` pair of llama-cpp-python's
    LlamaSampler, so the decode loop does not care which one it holds.
    """

    def __init__(self, llama_cpp, chain, vocab, n_vocab: int, grammar: str, triggers: list[str] | None = None):
        self._llama_cpp = llama_cpp
        self._chain = chain  # llama-cpp-python's LlamaSampler; we own it now
        self._grammar = init_grammar(llama_cpp, vocab, grammar, triggers)
        self._n_vocab = n_vocab
        data_type = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._all = np.zeros(n_vocab, dtype=data_type)
        self._all_array = self._token_array(self._all)
        self._one = np.zeros(1, dtype=data_type)
        self._one_array = self._token_array(self._one)

    def _token_array(self, data: np.ndarray):
        lc = self._llama_cpp
        return lc.llama_token_data_array(
            data=data.ctypes.data_as(lc.llama_token_data_p), size=len(data), selected=-1, sorted=False
        )

    def sample(self, ctx, idx: int = -1) -> int:
        lc = self._llama_cpp
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx.ctx, idx), shape=(self._n_vocab,))
        token = self._pick(logits, constrained=False)
        if not self._allows(token):
            token = self._pick(logits, constrained=True)
            if not self._allows(token):
                raise GrammarDeadEnd("the grammar allows no further token")
        lc.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
        return token

    def _pick(self, logits: np.ndarray, *, constrained: bool) -> int:
        """Run the chain over all logits (masked by the grammar when constrained); the chosen id."""
        lc, array = self._llama_cpp, self._all_array
        self._all["id"] = self._ids
        self._all["logit"] = logits
        self._all["p"] = 0.0
        array.size, array.selected, array.sorted = self._n_vocab, -1, False
        if constrained:
            lc.llama_sampler_apply(self._grammar, ctypes.byref(array))
        lc.llama_sampler_apply(self._chain.sampler, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def _allows(self, token: int) -> bool:
        """Whether the grammar, in its current state, accepts `token` next."""
        self._one[0] = (token, 0.0, 0.0)
        array = self._one_array
        array.size, array.selected, array.sorted = 1, -1, False
        self._llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return not math.isinf(float(self._one[0]["logit"]))

    def close(self) -> None:
        if self._grammar is not None:
            self._llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        self._chain.close()
