"""Random numbers for sampling that depend only on (seed, token position, candidate id).

A stateful generator per request makes a draw depend on how many numbers the
request used before, and a batched draw would need one generator call per
row. Instead every random number here is a hash of where it is used: the
request's seed, the position of the token in the completion, a stream (the
plain draw, the draft model's guesses, speculative acceptance tests) and the
candidate token id. A seeded request therefore draws the same tokens alone or
in any batch, at any batch position, and speculative decoding can check a
guess with exactly the number plain decoding would use there.

The hash is Chris Wellons' "lowbias32" 32-bit mixer, applied in a chain: a
row's key from position, stream and the two halves of the seed (on the host,
in Python: they are known there), then the candidate id with that key (on the
device, in int64 tensor ops that never leave int64's range, so exact on any
device). It is a bijection of 32-bit values per key, so the candidates of one
draw get distinct numbers. Nothing here reads a tensor back to the host.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_MASK32 = 0xFFFFFFFF


class Stream(IntEnum):
    """Independent uses of randomness at one (seed, position)."""

    DRAW = 0x6A09E667  # the token plain decoding draws (speculative checks reuse it)
    DRAFT = 0x3C6EF372  # a draft model's guess
    ACCEPT = 0xA54FF53A  # rejection sampling: is the draft's guess kept?
    RESIDUAL = 0x510E527F  # rejection sampling: the replacement for a rejected guess


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32): 16-bit halves keep every product below 2^49."""
    low = (x & 0xFFFF) * c
    high = ((x >> 16) * c) & 0xFFFF  # only the low 16 bits survive the shift below
    return (low + (high << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijection of [0, 2^32) with good avalanche; int64 in, int64 out."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """The same mixer on a Python int (row keys are made on the host, where seed and position are known)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int, position: int, stream: Stream) -> int:
    """A row's 32-bit key from its seed (< 2^64), the token's position and the stream."""
    key = mix32_int((position & _MASK32) ^ int(stream))
    key = mix32_int(key ^ (seed & _MASK32))
    return mix32_int(key ^ ((seed >> 32) & _MASK32))


def uniforms(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """U(0, 1) in float64 per candidate: keys (R,) and ids (R, K) int64 -> (R, K), never exactly 0 or 1."""
    key = keys.unsqueeze(-1)
    bits = mix32((mix32((ids & _MASK32) ^ key) + key) & _MASK32)
    return (bits.double() + 0.5) * (1.0 / 2**32)


def gumbels(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise per candidate: argmax(log p + noise) is a draw from p (the Gumbel-max trick)."""
    return -torch.log(-torch.log(uniforms(keys, ids)))
