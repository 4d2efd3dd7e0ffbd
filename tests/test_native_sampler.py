"""The native engine's sampler: llama.cpp's chain order, penalties, seeds and logprobs."""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import math

import pytest
import torch

from localllm.core.requests import SamplingParams
from native.sampler import Sampler, apply_penalties, filter_candidates
from native.sequence import Sequence


def seq(params: SamplingParams, generated: list[int] = (), name: str = "s") -> Sequence:
    s = Sequence(name, [0], params, 100)
    s.token_ids.extend(generated)
    return s


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


PROBS = logits_from_probs([0.5, 0.2, 0.15, 0.1, 0.05])


def test_top_k_keeps_the_k_best_in_order():
    values, ids = filter_candidates(PROBS, SamplingParams(top_k=2, top_p=1.0, min_p=0.0))
    assert ids.tolist() == [0, 1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    _, ids = filter_candidates(PROBS, SamplingParams(top_k=0, top_p=0.7, min_p=0.0))
    assert ids.tolist() == [0, 1]  # 0.5 + 0.2 reaches 0.7
    _, ids = filter_candidates(PROBS, SamplingParams(top_k=0, top_p=0.71, min_p=0.0))
    assert ids.tolist() == [0, 1, 2]
    _, ids = filter_candidates(PROBS, SamplingParams(top_k=0, top_p=0.1, min_p=0.0))
    assert ids.tolist() == [0]  # at least one survives


def test_min_p_is_relative_to_the_best():
    _, ids = filter_candidates(PROBS, SamplingParams(top_k=0, top_p=1.0, min_p=0.3))
    assert ids.tolist() == [0, 1, 2]  # 0.15 >= 0.3 * 0.5, 0.1 is not


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_penalties(logits, [0, 1], SamplingParams(repeat_penalty=2.0, repeat_last_n=64))
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_presence_and_frequency_penalties_use_counts_in_the_window():
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=3)
    out = apply_penalties(logits, [3, 1, 1, 2], params)  # window: the last 3 -> 1, 1, 2
    assert out.tolist() == [0.0, -1.0, -0.75, 0.0]


def test_greedy_with_penalties_avoids_the_repeated_token():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0, repeat_penalty=1.5)
    tokens, _ = Sampler()(logits, [seq(params, [0])])
    assert tokens == [1]


def test_seeded_draws_repeat_and_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=s) for s in (1, 2, 3)]

    def draws(rows: list[int], n: int = 20) -> list[list[int]]:
        seqs = [seq(params[r], name=str(r)) for r in rows]
        out = [[] for _ in rows]
        for _ in range(n):
            tokens, _ = Sampler()(logits[rows], seqs)
            for i, t in enumerate(tokens):
                out[i].append(t)
        return out

    together = draws([0, 1, 2])
    assert together[1] == draws([1])[0]
    assert together[2] == draws([2, 0])[0]
    assert together[0] != together[1]


def test_temperature_zero_is_argmax_for_the_whole_batch():
    logits = torch.tensor([[0.1, 0.9, 0.0], [5.0, 1.0, 2.0]])
    tokens, logprobs = Sampler()(logits, [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=0))])
    assert tokens == [1, 0] and logprobs == [None, None]


def test_logprobs_are_the_models_log_softmax_with_the_top_alternatives():
    tokens, logprobs = Sampler()(PROBS.unsqueeze(0), [seq(SamplingParams(temperature=0, logprobs=2))])
    lp = logprobs[0]
    assert tokens == [0] and lp.token == 0
    assert lp.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]
    assert lp.top[1][1] == pytest.approx(math.log(0.2), abs=1e-6)
