"""The vocabulary every layer speaks: sampling parameters, a generation request, its events, engine stats.

A front end builds a `GenerationRequest`, hands it to a backend, and renders the stream of
`TokenEvent`s that ends with exactly one `FinishEvent`. Plain data: nothing here imports
above `localllm.core`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from localllm.core.errors import BadRequest

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults follow llama.cpp's, so results match its tools."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    grammar: str | None = None  # GBNF (llama.cpp's grammar language) with a `root` rule
    # Regular expressions over the generated text; when given, the grammar stays
    # off until one matches (a "lazy" grammar: free text that may contain a forced call).
    grammar_triggers: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        """Raise BadRequest naming the first invalid value; return self when all are valid."""
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        _check(_finite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat_penalty must be > 0")
        _check(self.repeat_last_n >= -1, "repeat_last_n must be >= -1")
        _check(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]")
        _check(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]")
        _check(self.seed is None or 0 <= self.seed < 2**32, "seed must be in [0, 2^32)")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        _check(len(self.stop) <= 16, "at most 16 stop strings")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]")
        _check(self.grammar is None or (isinstance(self.grammar, str) and bool(self.grammar.strip())), "grammar must be non-empty")
        _check(not self.grammar_triggers or self.grammar is not None, "grammar_triggers need a grammar")
        _check(all(isinstance(t, str) and t for t in self.grammar_triggers), "grammar triggers must be non-empty")
        return self


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BadRequest(message)


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str | list[int]  # front ends apply the chat template first
    params: SamplingParams = field(default_factory=SamplingParams)
    # True when a chat template rendered the prompt: its special tokens (<start_of_turn>, ...)
    # are parsed as tokens and no second BOS is added. Raw text is tokenized as plain text.
    templated: bool = False
    # The chat the prompt was rendered from. Local engines run the prompt; the remote backend
    # sends these messages instead, so the upstream applies its own chat template.
    messages: list[dict] | None = None
    # True once a backend's `prepare` checked it and made `prompt` token ids (on a worker thread,
    # off the server's event loop): `generate` then skips that work.
    prepared: bool = False
    # Template variables the front end rendered with (`enable_thinking`, a client's
    # chat_template_kwargs) and the client's `reasoning_effort`: local engines have used
    # them already; the remote backend sends them upstream, whose template renders the chat.
    template_vars: dict | None = None
    reasoning_effort: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV was reused, not recomputed
    draft_tokens: int = 0  # speculative decoding: tokens guessed and verified for this request
    accepted_draft_tokens: int = 0  # of those, the ones the model kept

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds measured on the engine thread, from the moment the request was queued."""

    queued_s: float = 0.0  # waiting for the engine
    prompt_s: float = 0.0  # prompt processing
    ttft_s: float = 0.0  # queued until the first token was sampled
    decode_s: float = 0.0  # first token until the last
    total_s: float = 0.0

    def decode_tokens_per_s(self, completion_tokens: int) -> float:
        """Tokens after the first, over the time after the first (the first is the prompt's)."""
        if completion_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (completion_tokens - 1) / self.decode_s


@dataclass
class TokenEvent:
    request_id: str
    text: str  # may be "" while a partial stop string or UTF-8 sequence is held back
    token_ids: list[int]
    logprobs: list[dict] | None = None


@dataclass
class FinishEvent:
    request_id: str
    reason: FinishReason
    usage: Usage
    timings: Timings
    error: str | None = None  # a one-line message when reason == "error"
    stop_sequence: str | None = None  # the stop string that ended the text, when one did (local engines)


Event = Union[TokenEvent, FinishEvent]


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_used_ratio: float = 0.0
    last_decode_tokens_per_s: float = 0.0
    last_ttft_s: float = 0.0
    requests_finished: int = 0
    # engines with a paged KV cache (native): blocks in use, the pool's size, and the
    # share of prompt tokens served from the prefix cache instead of computed
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    # engines with slots (llama.cpp: --parallel): how many sequences decode together, and
    # how many requests reused a cached prefix and how many prompt tokens that saved
    slots_total: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_tokens: int = 0
    # speculative decoding (native): guessed tokens verified and kept since the model loaded,
    # and the share kept for the last finished request that speculated
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    last_spec_acceptance_rate: float = 0.0
