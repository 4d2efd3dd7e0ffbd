"""Token log probabilities as OpenAI's chat completions and Responses API both write them.

One entry per generated token: its text, log probability, UTF-8 bytes and the
most likely alternatives at that position (as many as `top_logprobs` asked).
"""

from __future__ import annotations

from typing import Any, Iterable

from localllm.core.requests import TokenEvent


def token_logprobs(tokens: Iterable[TokenEvent]) -> list[dict[str, Any]]:
    out = []
    for event in tokens:
        for lp in event.logprobs or []:
            out.append(
                {
                    "token": lp["text"],
                    "logprob": lp["logprob"],
                    "bytes": list(lp["text"].encode("utf-8")),
                    "top_logprobs": [
                        {"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode("utf-8"))}
                        for t in lp["top"]
                    ],
                }
            )
    return out
