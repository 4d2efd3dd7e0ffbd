"""SamplingParams from a request's fields, the same way on every API that has them.

OpenAI's, Anthropic's and the Responses API all take `temperature` and
`top_p` (and some more knobs); a field left out keeps the engine's default,
`top_p: 0` means only the most likely token (greedy), and an invalid value is
a 400 naming it.
"""

from __future__ import annotations

from typing import Any

from localllm.core.errors import BadRequest
from localllm.core.requests import SamplingParams
from localllm.server.errors import APIError


def sampling_params(max_tokens: int | None, temperature: float | None, top_p: float | None, **fields: Any) -> SamplingParams:
    """Checked SamplingParams; each of `fields` (top_k, seed, stop, ...) is applied unless it is None."""
    params = SamplingParams(max_tokens=max_tokens)
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        if top_p == 0:
            params.temperature = 0.0  # only the most likely token remains: greedy
        else:
            params.top_p = top_p
    for name, value in fields.items():
        if value is not None:
            setattr(params, name, value)
    try:
        return params.validate()
    except BadRequest as exc:
        raise APIError(400, str(exc)) from None
