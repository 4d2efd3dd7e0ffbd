"""A request's sampler on llama.cpp: its own chain, so requests in one batch never share state.

Each chain keeps its request's history (penalties) and random state (seed), which is
why a seeded request gives the same text alone or beside others, as long as the
logits it sees are the same.
"""

from __future__ import annotations

from localllm.core.requests import SamplingParams
from localllm.backends.grammar import GrammarSampler

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: pick a random seed


def build_sampler(internals, llama_cpp, model, params: SamplingParams, n_ctx: int):
    """The request's sampler: its chain, wrapped with its grammar when it has one.

    Both offer `sample(ctx, idx)` (idx: the row of the batch whose logits to use) and `close()`.
    n_ctx is what repeat_last_n = -1 means: the whole context.
    """
    chain = build_chain(internals, llama_cpp, model, params, n_ctx)
    if params.grammar is None:
        return chain
    return GrammarSampler(llama_cpp, chain, model.vocab, model.n_vocab(), params.grammar, params.grammar_triggers)


def build_chain(internals, llama_cpp, model, params: SamplingParams, n_ctx: int):
    """A llama.cpp sampler chain in llama.cpp's own order: penalties, top-k, top-p, min-p, temperature."""
    sampler = internals.LlamaSampler()
    if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        # -1 means the whole context (as in llama.cpp's tools and Ollama); the C sampler itself
        # treats a negative window as 0, which would switch the penalties off
        last_n = params.repeat_last_n if params.repeat_last_n >= 0 else n_ctx
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
