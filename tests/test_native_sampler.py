"""The native engine's batched sampler: llama.cpp's chain order, per-row settings, keyed draws, logprobs.

The batched chain is held against a per-row reference: the sampler as it was
before batching (one sequence at a time, in Python), kept here verbatim.
Draws are checked for their distribution with a chi-square test over a fixed
set of seeds (deterministic: it cannot flake) and for not depending on the
batch, here and through the engine on the starter model.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import math
from collections import Counter

import pytest
import torch

from localllm.core.requests import SamplingParams
from native.sampler import SampleOutput, Sampler, sample
from native.sampling_chain import Row, Settings, apply_penalties, candidates, make_row
from native.sampling_rng import Stream, mix32, mix32_int, row_key, uniforms
from native.sequence import Sequence

# -- the per-row reference (the sampler before batching) -------------------------------------


def reference_penalties(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    window = history if p.repeat_last_n < 0 else history[len(history) - p.repeat_last_n :]
    if not window or p.repeat_last_n == 0:
        return logits
    ids, counts = torch.tensor(window).unique(return_counts=True)
    logits = logits.clone()
    picked = logits[ids]
    if p.repeat_penalty != 1.0:
        picked = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
    picked = picked - counts.to(picked.dtype) * p.frequency_penalty - p.presence_penalty
    logits[ids] = picked
    return logits


def reference_filter(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    k = p.top_k if 0 < p.top_k < logits.numel() else logits.numel()
    values, ids = torch.topk(logits, k)
    if p.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        keep = int((before < p.top_p).sum())
        values, ids = values[: max(keep, 1)], ids[: max(keep, 1)]
    if p.min_p > 0:
        probs = torch.softmax(values, dim=-1)
        keep = int((probs >= p.min_p * probs[0]).sum())
        values, ids = values[: max(keep, 1)], ids[: max(keep, 1)]
    return values, ids


def reference_probs(logits: torch.Tensor, p: SamplingParams, history: list[int] = ()) -> dict[int, float]:
    values, ids = reference_filter(reference_penalties(logits, list(history), p), p)
    return dict(zip(ids.tolist(), torch.softmax(values.double() / p.temperature, dim=-1).tolist()))


# -- helpers ------------------------------------------------------------------------------------


def seq(params: SamplingParams, generated: list[int] = (), name: str = "s") -> Sequence:
    s = Sequence(name, [0], params, 100)
    s.token_ids.extend(generated)
    return s


def kept(logits: torch.Tensor, rows: list[Row]) -> list[list[int]]:
    """The candidate ids each row keeps after top-k, top-p and min-p, best first."""
    s = Settings.of(rows, logits.shape[-1], logits.device)
    c = candidates(logits, rows, s)
    return [ids[keep].tolist() for ids, keep in zip(c.ids, c.keep)]


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw})


PROBS = logits_from_probs([0.5, 0.2, 0.15, 0.1, 0.05])


def chi_square_threshold(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at upper tail 1e-4, by the Wilson-Hilferty approximation (good for df >= 3)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: Counter, expected: dict[int, float], n: int) -> tuple[float, int]:
    """Pearson's statistic; cells expecting fewer than 5 draws are pooled into one."""
    stat, df, small_obs, small_exp = 0.0, -1, 0, 0.0
    for cell, p in expected.items():
        if n * p < 5:
            small_obs, small_exp = small_obs + counts.get(cell, 0), small_exp + n * p
            continue
        stat += (counts.get(cell, 0) - n * p) ** 2 / (n * p)
        df += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        df += 1
    return stat, df


# -- the filters: as the per-row sampler ----------------------------------------------------------


def test_top_k_keeps_the_k_best_in_order():
    assert kept(PROBS.unsqueeze(0), [make_row(params(top_k=2), 0, [])]) == [[0, 1]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    rows = [make_row(params(top_p=p), 0, []) for p in (0.7, 0.71, 0.1)]
    assert kept(PROBS.expand(3, -1), rows) == [[0, 1], [0, 1, 2], [0]]  # 0.5 + 0.2 reaches 0.7; at least one


def test_min_p_is_relative_to_the_best():
    assert kept(PROBS.unsqueeze(0), [make_row(params(min_p=0.3), 0, [])]) == [[0, 1, 2]]  # 0.15 >= 0.3 * 0.5


FILTER_GRID = [
    dict(top_k=k, top_p=p, min_p=m)
    for k in (0, 1, 5, 40, 300, 1000)
    for p in (1.0, 0.95, 0.5, 0.05)
    for m in (0.0, 0.05, 0.3, 1.0)
]


@pytest.mark.parametrize("top_ks", [(0, 1, 5, 40, 300, 1000), (1, 5, 40)])
def test_each_row_keeps_what_the_per_row_filter_keeps(top_ks):
    """Rows, each with its own top-k/top-p/min-p, in one batch: the same candidates, in the same order.

    Every other row also has penalties over a window of its own best tokens
    (so they reorder the top). With top-k off somewhere the batch penalises a
    copy of the logits; with small top-ks it merges the window into the best
    k + 17 (the longest window) instead.
    """
    grid = [g for g in FILTER_GRID if g["top_k"] in top_ks]
    gen = torch.Generator().manual_seed(0)
    vocab = 300
    logits = torch.randn(len(grid), vocab, generator=gen) * torch.linspace(0.5, 6, len(grid)).unsqueeze(1)
    penalties = dict(repeat_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.3)
    rows = []
    for i, g in enumerate(grid):
        best = logits[i].topk(30).indices.tolist()
        history = [best[j] for j in range(0, 30, 2)] + [best[0], best[2]] if i % 2 else []
        rows.append(make_row(params(**g, **(penalties if i % 2 else {})), 0, history[: 1 + i % 17]))
    got = kept(logits, rows)
    for i, g in enumerate(grid):
        ref = reference_filter(reference_penalties(logits[i], list(rows[i].window), rows[i].params), rows[i].params)
        assert got[i] == ref[1].tolist(), (i, g)
    assert {len(ids) for ids in got} >= {1, 5, 40}  # the grid covers small and large candidate sets


def test_greedy_rows_take_the_argmax_beside_sampling_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 200, generator=gen) * 3
    history = [list(range(i, i + 10)) for i in range(6)]
    ps = [
        params(temperature=0),
        params(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
        params(temperature=0, repeat_penalty=1.5, frequency_penalty=0.4),
        params(temperature=1.5),
        params(temperature=0, presence_penalty=2.0, repeat_last_n=-1),
        params(temperature=0.3, top_k=3),
    ]
    tokens = sample(logits, [make_row(p, 7, h) for p, h in zip(ps, history)]).to_host()[0]
    for i, p in enumerate(ps):
        if p.temperature == 0:
            assert tokens[i] == int(reference_penalties(logits[i], history[i], p).argmax())
        else:
            assert tokens[i] in reference_probs(logits[i], p, history[i])


def test_greedy_with_penalties_avoids_the_repeated_token():
    tokens = Sampler()(torch.tensor([[3.0, 2.9, 0.0]]), [seq(SamplingParams(temperature=0, repeat_penalty=1.5), [0])]).to_host()[0]
    assert tokens == [1]


def test_temperature_zero_is_argmax_for_the_whole_batch():
    logits = torch.tensor([[0.1, 0.9, 0.0], [5.0, 1.0, 2.0]])
    tokens, logprobs = Sampler()(logits, [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=0))]).to_host()
    assert tokens == [1, 0] and logprobs == [None, None]


# -- penalties ---------------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_penalties(logits, [make_row(params(repeat_penalty=2.0, repeat_last_n=64), 0, [0, 1])])
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties_use_counts_in_the_window():
    row = make_row(params(presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=3), 0, [3, 1, 1, 2])
    assert apply_penalties(torch.zeros(1, 4), [row]).tolist() == [[0.0, -1.0, -0.75, 0.0]]  # window: 1, 1, 2


def test_penalties_per_row_equal_the_per_row_reference():
    """Rows with different windows (repeats, the whole history, none) and knobs; rows without penalties untouched."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=gen) * 4
    cases = [
        (params(repeat_penalty=1.3, repeat_last_n=8), [1, 2, 2, 2, 7, 1, 9, 9, 9, 9, 3]),
        (params(frequency_penalty=0.7, presence_penalty=-0.4, repeat_last_n=-1), [5] * 20 + [6, 7]),
        (params(repeat_penalty=0.8, frequency_penalty=-0.3), [49, 0, 49]),
        (params(repeat_penalty=1.3, repeat_last_n=0), [1, 2, 3]),  # window 0: off
        (params(), [4, 4, 4]),  # no penalties
        (params(repeat_penalty=2.0), []),  # nothing generated yet
    ]
    rows = [make_row(p, 0, h) for p, h in cases]
    out = apply_penalties(logits, rows)
    for i, (p, h) in enumerate(cases):
        assert torch.allclose(out[i], reference_penalties(logits[i], h, p), atol=1e-6), i
    assert logits is not out and torch.equal(out[3:], logits[3:])


# -- draws: the filtered distribution, keyed by (seed, position) ------------------------------------


def python_lowbias32(x: int) -> int:
    """The mixer in plain Python integers: the tensor version's split multiplications must agree."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_the_random_numbers_are_uniform_and_the_mixer_is_a_bijection():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537  # spread over 32 bits
    assert mix32(x).unique().numel() == x.numel() and int(mix32(x).max()) < 2**32
    sample_in = torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(3)).tolist() + [0, 2**32 - 1]
    assert mix32(torch.tensor(sample_in)).tolist() == [python_lowbias32(v) for v in sample_in] == list(map(mix32_int, sample_in))
    u = uniforms(torch.tensor([row_key(3, 0, Stream.DRAW)]), torch.arange(100_000).unsqueeze(0))[0]
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    stat = float(((counts - 5000) ** 2 / 5000).sum())
    assert 0 < float(u.min()) and float(u.max()) < 1 and stat < chi_square_threshold(19)


@pytest.mark.parametrize("by", ["seeds", "positions"])
def test_draws_follow_the_filtered_softmax(by):
    """4000 draws over fixed seeds (or one seed, 4000 positions) against the exact filtered distribution."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(60, generator=gen) * 2
    p = params(temperature=0.7, top_k=12, top_p=0.9, min_p=0.02)
    n = 4000
    if by == "seeds":
        rows = [Row(p, seed, 5, ()) for seed in range(n)]
    else:
        rows = [Row(p, 12345, position, ()) for position in range(n)]
    tokens = sample(logits.expand(n, -1), rows).to_host()[0]
    expected = reference_probs(logits, p)
    assert len(expected) >= 5 and set(tokens) <= set(expected)
    stat, df = chi_square(Counter(tokens), expected, n)
    assert stat < chi_square_threshold(df), (stat, df)
    # the test has power: the same draws fail against a nearby wrong answer (no temperature)
    wrong = reference_probs(logits, SamplingParams(**{**vars(p), "temperature": 1.0}))
    stat, df = chi_square(Counter(tokens), wrong, n)
    assert stat > chi_square_threshold(df)


def test_seeded_draws_do_not_depend_on_the_batch():
    """A row's token depends on its logits, settings, seed and position only: not its neighbours or place."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 1000, generator=gen) * 2
    default = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
    mine = [make_row(default, 42, list(range(position))) for position in range(30)]

    def alone(position: int) -> int:
        return sample(logits[:1], [mine[position]]).to_host()[0][0]

    solo = [alone(i) for i in range(30)]
    assert len(set(solo)) > 3  # it does draw
    others = [make_row(params(temperature=1.3), 7, [1, 2]), make_row(params(temperature=0), 8, []),
              make_row(SamplingParams(temperature=0.5, top_k=2, repeat_penalty=1.4), 9, [5, 5])]
    for i in range(30):
        batch = [others[0], mine[i], others[2]] if i % 2 else [others[1], others[0], others[2], mine[i]]
        rows = logits[[1, 0, 2]] if i % 2 else logits[[2, 1, 2, 0]]
        at = 1 if i % 2 else 3
        assert sample(rows, batch).to_host()[0][at] == solo[i]  # top-k 0 beside it makes the batch sort everything
    assert [alone(i) for i in range(30)] == solo  # and again: nothing is consumed
    other_seed = [sample(logits[:1], [Row(default, 43, i, mine[i].window)]).to_host()[0][0] for i in range(30)]
    assert other_seed != solo


# -- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax_with_the_top_alternatives():
    tokens, logprobs = Sampler()(PROBS.unsqueeze(0), [seq(SamplingParams(temperature=0, logprobs=2))]).to_host()
    lp = logprobs[0]
    assert tokens == [0] and lp.token == 0
    assert lp.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]
    assert lp.top[1][1] == pytest.approx(math.log(0.2), abs=1e-6)


def test_logprobs_for_the_rows_that_ask_before_penalties_and_temperature():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 80, generator=gen) * 3
    ps = [
        params(temperature=0.5, logprobs=3, repeat_penalty=1.5),
        params(temperature=0),
        params(temperature=0, logprobs=0, presence_penalty=1.0),
        params(temperature=2.0, logprobs=5),
    ]
    tokens, logprobs = sample(logits, [make_row(p, 1, [3, 4, 5]) for p in ps]).to_host()
    assert logprobs[1] is None
    for i in (0, 2, 3):
        exact = torch.log_softmax(logits[i].double(), dim=-1)
        lp = logprobs[i]
        assert lp.token == tokens[i] and lp.logprob == pytest.approx(float(exact[tokens[i]]), abs=1e-5)
        best = exact.topk(ps[i].logprobs)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-5)


# -- one wait for the device per step ----------------------------------------------------------------

READS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class ReadCounter:
    """Counts calls that bring a tensor's values to the host (on CUDA each one waits for the device)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return counted


def test_the_sampler_reads_nothing_and_to_host_reads_once(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 500, generator=gen)
    seqs = [
        seq(SamplingParams(seed=1, logprobs=2), [1, 2, 3]),
        seq(SamplingParams(temperature=0), [4]),
        seq(SamplingParams(temperature=0.7, top_k=0, repeat_penalty=1.2, frequency_penalty=0.5), [9, 9]),
        seq(SamplingParams(temperature=0, presence_penalty=0.3, logprobs=0), [1]),
        seq(SamplingParams(temperature=1.2, top_p=0.5, min_p=0.1, seed=3, logprobs=4)),
    ]
    reads = ReadCounter(monkeypatch)
    out = Sampler()(logits, seqs)
    assert isinstance(out, SampleOutput) and isinstance(out.tokens, torch.Tensor)
    assert reads.count == 0
    tokens, logprobs = out.to_host()
    assert reads.count == 1
    assert len(tokens) == 5 and [lp is not None for lp in logprobs] == [True, False, False, True, True]


def test_an_engine_step_converts_the_samplers_tensors_once(starter_engine, monkeypatch):
    """Every step with sampling rows: the sampler returns tensors without reading them; one to_host per step."""
    e = starter_engine
    calls: list[tuple[int, int]] = []  # per step: (reads inside the sampler, reads inside to_host)
    reads = ReadCounter(monkeypatch)
    sampler_call, to_host = Sampler.__call__, SampleOutput.to_host

    def counted_call(self, logits, seqs):
        before = reads.count
        out = sampler_call(self, logits, seqs)
        calls.append((reads.count - before, -1))
        return out

    def counted_to_host(self):
        before = reads.count
        result = to_host(self)
        calls[-1] = (calls[-1][0], reads.count - before)
        return result

    monkeypatch.setattr(Sampler, "__call__", counted_call)
    monkeypatch.setattr(SampleOutput, "to_host", counted_to_host)
    prompts = [e.tokenizer.encode(text, add_bos=True, special=False) for text in ("The sea", "Once upon a time")]
    out = e.generate(prompts, [SamplingParams(seed=1, max_tokens=5, logprobs=2), SamplingParams(temperature=0, max_tokens=4)])
    assert [len(o) for o in out] == [5, 4]
    assert len(calls) == 5 and all(c == (0, 1) for c in calls), calls


def test_the_chain_traces_as_one_graph_without_host_reads():
    """What a CUDA graph needs: one traced graph (a host read that steers Python breaks it) of fixed shapes."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 1000, generator=gen) * 3
    rows = [
        make_row(SamplingParams(seed=1, repeat_penalty=1.2, frequency_penalty=0.2, logprobs=2), 1, [1, 2, 3, 2]),
        make_row(SamplingParams(temperature=0, presence_penalty=0.5), 2, [int(logits[1].argmax())]),
        make_row(SamplingParams(top_k=7, top_p=0.5, min_p=0.1, logprobs=0), 3, [4]),
        make_row(SamplingParams(temperature=1.4, top_k=0), 4, []),
    ]

    def step(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = sample(x, rows)
        return out.tokens, out.logprobs.chosen, out.logprobs.top_ids

    shapes: list = []

    def backend(graph: torch.fx.GraphModule, example_inputs):
        for node in graph.graph.nodes:
            value = node.meta.get("example_value")
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
        return graph.forward

    traced = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    for got, want in zip(traced(logits), step(logits)):
        assert torch.equal(got, want)
    assert len(shapes) > 50 and all(isinstance(d, int) for shape in shapes for d in shape)  # no shape waits on values


# -- the engine: a seeded request gives the same text in any batch ------------------------------------


@pytest.fixture(scope="module")
def starter_engine(starter_gguf):
    from native.engine import EngineOptions, LLMEngine

    # float32: its batched matrix products give each row the logits it gets alone; in bfloat16 a row's
    # rounding depends on the batch's shape, so "the same text in any batch" holds only up to that rounding
    e = LLMEngine(starter_gguf, EngineOptions(device="cpu", threads=1, n_ctx=256, max_num_seqs=8, weights="float32"))
    yield e
    e.close()


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_batches(starter_engine):
    e = starter_engine
    encode = lambda text: e.tokenizer.encode(text, add_bos=True, special=False)  # noqa: E731
    mine = (encode("Write a short story about a lighthouse keeper."), SamplingParams(temperature=1.0, seed=1234, max_tokens=16))
    others = [
        (encode("List three colours:"), SamplingParams(temperature=0.8, seed=5, max_tokens=12)),
        (encode("def fibonacci(n):"), SamplingParams(temperature=0, max_tokens=16)),
        (encode("The capital of France is"), SamplingParams(temperature=1.5, top_k=0, repeat_penalty=1.3, max_tokens=20)),
        (encode("Hello"), SamplingParams(temperature=0.6, top_p=0.5, max_tokens=8)),
    ]
    alone = e.generate([mine[0]], mine[1])[0]
    assert len(alone) == 16
    for batch, at in ((others[:1] + [mine], 1), ([mine] + others, 0), (others[1:3] + [mine] + others[3:], 2)):
        out = e.generate([p for p, _ in batch], [sp for _, sp in batch])
        assert out[at] == alone, (len(batch), at)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16)
    first, second = e.generate([mine[0]] * 2, [unseeded, unseeded])
    assert first != alone and second != first  # each unseeded request draws its own seed
