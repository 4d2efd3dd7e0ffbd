"""Random numbers for sampling that depend only on (seed, token position, candidate id).

A stateful generator per request makes a draw depend on how many numbers the
request used before, and a batched draw would need one generator call per
row. Instead every random number here is a hash of where it is used: the
request's seed, the position of the token in the completion, a stream (the
plain draw, the draft model's guesses, speculative acceptance tests) and the
candidate token id. A seeded request therefore draws the same tokens alone or
in any batch, at any batch position, and speculative decoding can check a
guess with exactly the number plain decoding would use there.

The hash is Chris Wellons' "lowbias32" 32-bit mixer, written in int64 tensor
ops that never leave int64's range (so it is exact on any device), applied in
a chain: position, then the two halves of the seed, then the candidate id.
It is a bijection of 32-bit values per key, so the candidates of one draw get
distinct numbers. Nothing here reads a tensor back to the host.
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


def row_keys(seeds: torch.Tensor, positions: torch.Tensor, stream: Stream) -> torch.Tensor:
    """One 32-bit key per row from its seed (< 2^63) and position: (R,) int64 each -> (R,) int64."""
    key = mix32((positions & _MASK32) ^ int(stream))
    key = mix32(key ^ (seeds & _MASK32))
    return mix32(key ^ ((seeds >> 32) & _MASK32))


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, stream: Stream) -> torch.Tensor:
    """U(0, 1) in float64 for each candidate: seeds, positions (R,) and ids (R, K) int64 -> (R, K), never 0 or 1."""
    key = row_keys(seeds, positions, stream).unsqueeze(-1)
    bits = mix32(mix32((ids & _MASK32) ^ key) ^ mix32(key ^ 0x9E3779B9))
    return (bits.double() + 0.5) * (1.0 / 2**32)


def gumbels(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Standard Gumbel noise per candidate: argmax(log p + noise) is a draw from p (the Gumbel-max trick)."""
    return -torch.log(-torch.log(uniforms(seeds, positions, ids, stream)))
