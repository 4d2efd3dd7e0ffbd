"""Prompt lookup: guess the next tokens by finding the last few tokens earlier in the text.

Copying is common in what people ask of a model (quote this, fix that code,
summarise with the source's own words): when the last n tokens of a request
already occurred earlier in it, the tokens that followed them then are a good
guess for what follows now. The search is a plain scan from the end, compiled
with numba (a 4,000-token history is scanned in microseconds; in Python it
would take milliseconds per step). Without numba the same function runs as
Python: correct, only slower.
"""

from __future__ import annotations

import numpy as np

try:  # numba is in the `native` extra; the fallback keeps the engine usable without it
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    def njit(*args, **kwargs):
        return (lambda f: f) if not args or not callable(args[0]) else args[0]


@njit(cache=True, nogil=True)
def find_continuation(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[int, int]:
    """Where the text continued after its most recent earlier copy of its last n tokens.

    Tries n from max_n down to min_n (a longer match is better evidence);
    for each n, scans backwards so the most recent occurrence wins. Returns
    (start, length) of up to k tokens that followed the occurrence, or (0, 0).
    """
    total = tokens.shape[0]
    for n in range(max_n, min_n - 1, -1):
        if n > total - 1:
            continue
        tail = total - n  # the pattern is tokens[tail:]
        for start in range(tail - 1, -1, -1):  # candidate occurrences tokens[start:start+n], latest first
            matched = True
            for j in range(n):
                if tokens[start + j] != tokens[tail + j]:
                    matched = False
                    break
            if matched:
                follow = start + n
                return follow, min(k, total - follow)
    return 0, 0


def lookup(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier copy of the last min_n..max_n tokens."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    start, length = find_continuation(tokens, min_n, max_n, k)
    return tokens[start : start + length].tolist()
