"""Token log probabilities as OpenAI's chat completions and Responses API (and, without bytes, Ollama) write them.

One entry per generated token: its text, log probability, UTF-8 bytes and the
most likely alternatives at that position (as many as `top_logprobs` asked).
"""

from __future__ import annotations

from typing import Any, Iterable

from localllm.core.requests import TokenEvent


def token_logprobs(tokens: Iterable[TokenEvent], *, with_bytes: bool = True) -> list[dict[str, Any]]:
    """The entries of `tokens`' logprobs; Ollama writes the same ones without `bytes`."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        out: dict[str, Any] = {"token": text, "logprob": logprob}
        if with_bytes:
            out["bytes"] = list(text.encode("utf-8"))
        return out

    return [
        {**entry(lp["text"], lp["logprob"]), "top_logprobs": [entry(t["text"], t["logprob"]) for t in lp["top"]]}
        for event in tokens
        for lp in event.logprobs or []
    ]
