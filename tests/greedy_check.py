"""Comparing greedy outputs computed under different batch shapes on llama.cpp.

llama.cpp's CPU kernels pick different code paths for different batch shapes
(repacked Q4_K matrix-matrix vs matrix-vector products, tiled attention for
many query rows), and the model quantizes its activations to 8 bits between
layers, so the same token computed alone, beside other sequences, or as part
of a longer prompt chunk gets logits that differ by a few hundredths of a nat
(benchmarks/llamacpp_batch_exactness.py measures it). Greedy outputs are then
identical until the first near-tie, where they may part. These helpers check
exactly that: same tokens, or a parting where the reference's two best choices
were close.
"""

from __future__ import annotations

# Measured drift of one token's logprob between batch shapes: up to ~0.25 nats, so two
# candidates' gap may move by up to ~0.5; garbage (a wrong sequence's cache, a wrong
# position) parts from the reference where it was sure, by several nats.
NEAR_TIE_NATS = 0.75


def greedy_ids(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


def assert_same_or_near_tie(reference_events, tokens: list[int], what: str, tolerance: float = NEAR_TIE_NATS) -> int:
    """`tokens` follow the reference's greedy tokens, or part from them only at a near-tie.

    `reference_events` are TokenEvents with logprobs (top >= 2). Returns how
    many leading tokens are identical.
    """
    reference = [(e.token_ids[0], e.logprobs[0]) for e in reference_events if e.token_ids]
    for i, (token, (ref_token, lp)) in enumerate(zip(tokens, reference)):
        if token == ref_token:
            continue
        alternatives = {t["token"]: t["logprob"] for t in lp["top"]}
        assert token in alternatives, f"{what}: token {i} ({token}) is not among the reference's top choices {alternatives}"
        gap = lp["logprob"] - alternatives[token]
        assert gap <= tolerance, f"{what}: parted at token {i} where the reference preferred its choice by {gap:.3f} nats"
        return i
    return min(len(tokens), len(reference))
