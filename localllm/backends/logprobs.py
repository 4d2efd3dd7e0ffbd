"""Log-probabilities of the sampled token and the top alternatives, from raw logits.

Computed only when a request asks for them: a softmax over a 262k vocabulary
costs about a millisecond per token.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def top_logprobs(ctx, n_vocab: int, token: int, n: int, piece: Callable[[int], bytes], idx: int = -1) -> dict:
    """{"token": id, "text": str, "logprob": float, "top": [{"token", "text", "logprob"}, ...]}.

    `ctx` is a llama_context pointer; `idx` the row of the last batch whose logits to use.
    """
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(n_vocab,))
    shifted = logits - logits.max()
    logsumexp = np.log(np.exp(shifted).sum())
    logp = shifted - logsumexp
    top = np.argpartition(-logp, n)[:n] if n else np.array([], dtype=np.int64)
    top = top[np.argsort(-logp[top])]
    return {
        "token": token,
        "text": _text(piece, token),
        "logprob": float(logp[token]),
        "top": [{"token": int(t), "text": _text(piece, int(t)), "logprob": float(logp[t])} for t in top],
    }


def _text(piece: Callable[[int], bytes], token: int) -> str:
    return piece(token).decode("utf-8", errors="replace")
