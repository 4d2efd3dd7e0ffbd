"""LLMEngine: add requests, step, abort. The loop every front end drives.

A step is: the scheduler picks sequences and token counts, the model runner
runs them as one batch, the sampler picks a token for every sequence that
reached its last token, and sequences that are done leave and return their
blocks. Everything is synchronous and single-threaded; the backend
(localllm/backends/native.py) runs it on its engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from localllm.core.context_checks import check_prompt, generation_limit
from localllm.core.errors import BadRequest, DoesNotFit
from localllm.core.requests import SamplingParams
from localllm.core.speculation import SpeculationOptions

from .block_manager import BlockManager
from .draft import DraftModelProposer
from .loader import LoadedWeights
from .model_runner import ModelRunner, RunnerOptions
from .sampler import Sampler, TokenLogprobs
from .scheduler import Scheduled, Scheduler
from .sequence import Sequence, Status
from .speculative import NgramProposer, Proposer, Speculator, verify_rows
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineOptions:
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # compute dtype; None: what `weights` implies (with "auto" a float format in it)
    weights: str = "auto"  # linear weights: auto|float32|bfloat16|int8|int4|fp8 (loader.resolve_precision)
    n_ctx: int | None = None  # None: min(4096, the model's trained context)
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None  # None: 256 on CPU, 8192 on CUDA
    block_size: int = 16
    kv_cache_bytes: int | None = None  # KV budget (CPU: the budget, CUDA: a cap; see model_runner)
    gpu_memory_utilization: float = 0.90
    prefix_caching: bool = True
    pack_output: bool = True  # CPU: the output projection in oneDNN's layout (see layers/linear.py)
    threads: int | None = None  # CPU threads for torch
    load_tokenizer: bool = True
    verbose: bool = False
    speculation: SpeculationOptions | None = None  # speculative decoding (speculative.py); None: off


@dataclass
class StepOutput:
    request_id: str
    token: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None  # "stop" (end of generation token) or "length"; None while running


@dataclass
class EngineCounters:
    steps: int = 0
    tokens_computed: int = 0  # tokens run through the model (prompts, recomputes, decodes)
    tokens_generated: int = 0
    requests_finished: int = 0


class LLMEngine:
    def __init__(
        self, model_path: Path | str | LoadedWeights, options: EngineOptions | None = None, *,
        shares_gpu_with: ModelRunner | None = None,  # a draft's target, waiting to size both pools (model_runner.share_gpu)
    ) -> None:
        o = options or EngineOptions()
        if not isinstance(model_path, LoadedWeights):
            model_path = Path(model_path)
        self.options = o
        if o.threads:
            torch.set_num_threads(o.threads)
        device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if o.dtype is not None and o.dtype not in DTYPES:
            raise BadRequest(f"dtype must be one of {', '.join(DTYPES)}")
        self.tokenizer: Tokenizer | None = load_tokenizer(model_path, verbose=o.verbose) if o.load_tokenizer else None
        self.runner = _make_runner(model_path, o, device, DTYPES[o.dtype] if o.dtype else None, shares_gpu_with)
        self.config = self.runner.config
        self.n_ctx = self.runner.options.n_ctx
        # A draft on the GPU loads before our pool is sized, so one budget is split between both.
        draft = _draft_engine(o.speculation.validate().draft, self) if self.runner.awaits_partner else None
        groups = self.runner.kv_groups  # one pool, or a second for sliding-window layers (core/kv_sizing.py)
        self.blocks = BlockManager(
            [g.num_blocks for g in groups], o.block_size, prefix_caching=o.prefix_caching, windows=[g.window for g in groups]
        )
        budget = self.runner.options.max_num_batched_tokens
        self.scheduler = Scheduler(self.blocks, max_num_seqs=o.max_num_seqs, max_num_batched_tokens=budget)
        self.sampler = Sampler()
        self.eos_ids = set(self.config.eos_token_ids) | (self.tokenizer.eog_ids if self.tokenizer else set())
        self.sequences: dict[str, Sequence] = {}
        self.counters = EngineCounters()
        self.speculator = make_speculator(o.speculation, self, draft)

    # -- requests ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.sequences:
            raise BadRequest(f"request id '{request_id}' is already in use")
        check_prompt(len(prompt), self.n_ctx)
        if max(prompt) >= self.config.vocab_size or min(prompt) < 0:
            raise BadRequest("the prompt holds token ids outside the vocabulary")
        limit = generation_limit(len(prompt), self.n_ctx, params.max_tokens)
        seq = Sequence(request_id, prompt, params, limit)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks go back to the pool. False if unknown."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        if self.speculator is not None:
            self.speculator.release(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        if self.speculator is not None:  # guesses join the step as extra tokens (speculative.py)
            self.speculator.propose(scheduled, self.scheduler.max_num_batched_tokens - sum(i.n_tokens for i in scheduled))
        samplers = [item for item in scheduled if item.samples]
        if any(item.n_draft for item in scheduled):
            logits = self.runner.run(scheduled, logit_rows=verify_rows(scheduled))
            picks = self.speculator.verify(logits, samplers, self.sampler)
        else:
            logits = self.runner.run(scheduled)
            # the sampler returns tensors; to_host is the step's one wait for the device
            tokens, logprobs = self.sampler(logits, [item.seq for item in samplers]).to_host() if samplers else ([], [])
            picks = [([token], [lp]) for token, lp in zip(tokens, logprobs)]
        self.counters.steps += 1
        outputs: list[StepOutput] = []
        finished: list[tuple[Sequence, str]] = []
        picked = iter(picks)
        for item in scheduled:
            seq, samples = item.seq, item.samples
            self.counters.tokens_computed += item.n_tokens
            if item.n_draft:  # guesses leave; the verified ones come back below
                del seq.token_ids[-item.n_draft :]
            seq.num_computed += item.n_tokens - item.n_draft
            reason = None
            if samples:
                new_tokens, logprobs = next(picked)
                reason = self._append(seq, new_tokens, logprobs, outputs)
            if item.n_draft and not reason:
                self.blocks.shrink(seq, seq.num_tokens)  # blocks that held only rejected guesses
            self.blocks.commit(seq)  # only verified tokens are counted as computed, so only they are hashed
            if reason:
                finished.append((seq, reason))
        for seq, reason in finished:
            self._finish(seq, reason)
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list, outputs: list[StepOutput]) -> str | None:
        """Add a step's new tokens to a sequence; why it finished, if it did.

        All but the last token are guesses the model accepted: their K/V were
        computed in this step, so they count as computed.
        """
        for i, (token, lp) in enumerate(zip(tokens, logprobs)):
            seq.token_ids.append(token)
            if i < len(tokens) - 1:
                seq.num_computed += 1
            self.counters.tokens_generated += 1
            reason = None
            if token in self.eos_ids:
                reason = "stop"
            elif seq.num_completion >= seq.max_tokens:
                reason = "length"
            outputs.append(StepOutput(seq.request_id, token, lp, reason))
            if reason:
                return reason
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        self.scheduler.remove(seq)
        self.sequences.pop(seq.request_id, None)
        self.counters.requests_finished += 1
        if self.speculator is not None:
            self.speculator.release(seq)

    # -- conveniences for tests and benchmarks -----------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; their generated token ids, in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{id(self)}-{i}-{self.counters.steps}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.sequences for rid in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].append(out.token)
        return [results[rid] for rid in ids]

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int], *, chunk: int | None = None, last: int | None = None) -> torch.Tensor:
        """Logits at the prompt's positions (the `last` ones, or all), through the paged cache.

        Positions served by the prefix cache are not computed; their rows are
        NaN. Runs alone (only on an idle engine); its blocks are freed after,
        but full ones stay in the prefix cache.
        """
        if self.scheduler.has_work():
            raise RuntimeError("prompt_logits runs only on an idle engine")
        seq = Sequence(f"score-{self.counters.steps}", prompt, SamplingParams(max_tokens=1), 1)
        if not self.blocks.allocate(seq, chunk):
            raise BadRequest("the prompt does not fit in the KV cache")
        first = len(prompt) - (last or len(prompt))  # first position whose logits are wanted
        skipped = max(seq.num_computed, first)
        parts = []
        try:
            while seq.num_computed < seq.num_tokens:
                start = seq.num_computed
                n = min(chunk or seq.num_tokens, seq.num_tokens - start)
                self.blocks.slide(seq)  # sliding groups: drop what the window left, take the chunk's blocks
                if not self.blocks.can_grow(seq, start + n):
                    raise BadRequest("the prompt does not fit in the KV cache")
                self.blocks.grow(seq, start + n)
                rows = [i for i in range(n) if start + i >= first]
                parts.append(self.runner.run([Scheduled(seq, n)], logit_rows=rows))
                seq.num_computed += n
                self.blocks.commit(seq)
        finally:
            self.blocks.free(seq)
        logits = torch.cat(parts)
        if skipped > first:  # answered from the cache: no logits
            gap = torch.full((skipped - first, logits.shape[1]), float("nan"), device=logits.device)
            logits = torch.cat([gap, logits])
        return logits

    def kv_bytes_used(self) -> int:
        """Bytes of KV cache the blocks in use hold, across every group."""
        return sum(n * b for n, b in zip(self.blocks.used_per_group(), self.runner.group_block_bytes))

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_bytes_used": self.kv_bytes_used(),  # what sequences hold now (sliding layers: their windows)
            "kv_bytes_total": self.runner.kv_cache_bytes,
            "prefix_cache_hit_rate": self.blocks.hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }

    def close(self) -> None:
        """Let go of the draft, the tokenizer, and the model with its KV pools and CUDA graphs (their memory is freed)."""
        if self.speculator is not None:
            self.speculator.close()
            self.speculator = None
        if self.tokenizer is not None:
            self.tokenizer.close()
            self.tokenizer = None
        self.sequences.clear()
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def _make_runner(
    path: Path | LoadedWeights, o: EngineOptions, device: str, dtype: torch.dtype | None,
    partner: ModelRunner | None = None,
) -> ModelRunner:
    on_gpu = device.startswith("cuda")
    budget = o.max_num_batched_tokens or (8192 if on_gpu else 256)
    runner_options = RunnerOptions(
        device=device,
        dtype=dtype,
        weights=o.weights,
        block_size=o.block_size,
        n_ctx=o.n_ctx or 0,
        max_num_seqs=o.max_num_seqs,
        max_num_batched_tokens=max(budget, o.max_num_seqs),
        kv_cache_bytes=o.kv_cache_bytes,
        gpu_memory_utilization=o.gpu_memory_utilization,
        pack_output=o.pack_output,
        defer_cache=on_gpu and o.speculation is not None and o.speculation.method == "draft",
    )
    if o.speculation is not None and o.speculation.enabled:  # each sequence checks its guesses too
        runner_options.max_logit_rows = min(o.max_num_seqs * (1 + o.speculation.native_num_tokens),
                                            runner_options.max_num_batched_tokens)
    return ModelRunner(path, runner_options, partner=partner)


def make_speculator(
    options: SpeculationOptions | None, engine: LLMEngine, draft: LLMEngine | None = None
) -> Speculator | None:
    """The engine's speculator for `options` (None when off). Here both proposers are known:
    a draft model runs as a second LLMEngine that this module builds (or built already: `draft`)."""
    if options is None or not options.enabled:
        return None
    options.validate()
    if options.method == "ngram":
        proposer: Proposer = NgramProposer(options.ngram_min, options.ngram_max)
    else:
        proposer = DraftModelProposer(draft or _draft_engine(options.draft, engine), engine)
    return Speculator(options, proposer, engine.blocks)


def _draft_engine(path: Path | str, target: LLMEngine) -> LLMEngine:
    """The draft model on the target's device, dtype, context and batch shape."""
    o = target.options
    try:
        return LLMEngine(
            path,
            EngineOptions(
                device=str(target.runner.device),
                dtype=next(name for name, dtype in DTYPES.items() if dtype == target.runner.dtype),
                n_ctx=target.n_ctx,
                max_num_seqs=o.max_num_seqs,
                max_num_batched_tokens=target.runner.options.max_num_batched_tokens,
                block_size=o.block_size,
                prefix_caching=False,  # mirrors hold guesses; nothing of theirs is worth sharing
                pack_output=o.pack_output,
                load_tokenizer=target.tokenizer is not None,
                verbose=o.verbose,
            ),
            shares_gpu_with=target.runner if target.runner.awaits_partner else None,
        )
    except BadRequest as exc:
        raise BadRequest(f"the draft model cannot run beside the target: {exc}") from None
    except DoesNotFit as exc:  # on a GPU both pools come from one budget: they do not fit together
        raise DoesNotFit(f"the draft model does not fit beside the target: {exc}") from None
