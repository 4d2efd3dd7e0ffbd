"""Speculative decoding's settings: one type for the one `--speculative` flag, read by both local engines.

The flags (`--speculative`, `--draft`, `--num-speculative-tokens`) become one
`SpeculationOptions` at the front end; load options, the server's settings
and both engines carry it unchanged. What the engines share (the method, the
draft, prompt lookup's n-gram sizes, the guess count the user asked for) are
plain fields. Where the engines really differ, because each was tuned on its
own costs, the difference is a named part: `llamacpp` (each request sizes its
own guesses and stops when it keeps too few) and `native` (a fixed number of
guesses a step, stopped on a moving average).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from localllm.core.errors import BadRequest

METHODS = ("off", "ngram", "draft")


@dataclass
class LlamaCppGuessing:
    """How the llama.cpp engine sizes each request's guesses (backends/llamacpp_speculative.py says why)."""

    most_tokens: int = 15  # the most guesses a request grows to, unless --num-speculative-tokens says
    start_tokens: int = 3  # a request's guesses in its first step (1 + 3 rows: llama.cpp's kernels like pairs)
    max_generating: int = 4  # guess only while at most this many sequences generate
    min_acceptance: float = 0.5  # a request stops guessing when it has kept less than this share ...
    min_steps: int = 4  # ... after this many checks
    min_acceptance_beside_others: float = 0.9  # with other sequences generating, guess only above this share


@dataclass
class NativeGuessing:
    """How the native engine guesses (native/speculative.py says why): k guesses a step, checked every step."""

    num_tokens: int = 4  # k, unless --num-speculative-tokens says
    min_acceptance: float = 0.3  # a request stops guessing when its moving average falls below this ...
    min_steps: int = 8  # ... after this many verification steps
    ema_weight: float = 0.2  # weight of the newest step in the moving average


@dataclass
class SpeculationOptions:
    method: str = "off"  # off | ngram | draft
    num_tokens: int | None = None  # --num-speculative-tokens; None: each engine's own default (below)
    draft: Path | str | None = None  # method "draft": a model sharing the target's vocabulary (a name until opened, then its file)
    draft_n_gpu_layers: int = 0  # llama.cpp: the draft's layers on GPUs (its own fit plan); native runs it beside the target
    # Prompt lookup matches the last ngram_max .. ngram_min tokens. Shorter matches recur in any
    # prose (", and the") and what followed them rarely holds: replaying the starter's outputs
    # (copying, prose, a story, code), min 2 guessed often and lost; min 4 kept the copying gain.
    ngram_min: int = 4
    ngram_max: int = 6
    llamacpp: LlamaCppGuessing = field(default_factory=LlamaCppGuessing)
    native: NativeGuessing = field(default_factory=NativeGuessing)

    @classmethod
    def from_flags(cls, method: str | None, draft: str | None, num_tokens: int | None) -> "SpeculationOptions":
        """What the flags ask for: a --draft alone means --speculative draft (validate checks the combination)."""
        return cls(method or ("draft" if draft else "off"), num_tokens=num_tokens, draft=draft)

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @property
    def llamacpp_most_tokens(self) -> int:
        return self.num_tokens if self.num_tokens is not None else self.llamacpp.most_tokens

    @property
    def native_num_tokens(self) -> int:
        return self.num_tokens if self.num_tokens is not None else self.native.num_tokens

    def validate(self) -> "SpeculationOptions":
        if self.method not in METHODS:
            raise BadRequest(f"speculative must be one of: {', '.join(METHODS)}")
        if self.num_tokens is not None and not 1 <= self.num_tokens <= 16:
            raise BadRequest("the number of speculative tokens must be in [1, 16]")
        if self.method == "draft" and not self.draft:
            raise BadRequest("speculative decoding with a draft model needs --draft MODEL")
        if self.method != "draft" and self.draft:
            raise BadRequest("--draft needs --speculative draft")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise BadRequest("n-gram sizes need 1 <= min <= max")
        return self
