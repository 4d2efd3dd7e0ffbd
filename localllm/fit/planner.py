"""The fit planner: ModelInfo x Hardware x wishes -> Plan (backend, weights, GPU layers, context), with reasons.

Policy:
- Every way the model could run here is a candidate (candidates.py): llama.cpp
  with the GGUF's quant, with as many layers on the GPU as fit; the native
  engine in each weight format, on a CUDA GPU with compute capability >= 8.0
  and at least 16 GiB (FitSettings), else on the CPU. Hugging Face folders
  run on the native engine only (llama.cpp reads GGUF only).
- Each candidate is planned for memory, and its decode speed predicted from
  the bytes a token reads and the device's bandwidth (speed.py, bandwidth.py).
- The plan is the fastest candidate the automatic choice may take that fits
  at the largest context: fastest for one request at a time with --parallel
  1, the highest throughput for many.
- Without an asked-for context, the largest multiple of 256 up to the trained
  context, capped at 8192, that fits.
Every number comes from localllm/fit/llamacpp_memory.py and native_memory.py;
the plan keeps their parts so `localllm fit` can show where memory goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from localllm.core.errors import BadRequest
from localllm.fit import machine
from localllm.fit.candidates import (
    Candidate, ask_for, auto_formats, choose, llamacpp_speed, native_formats, native_speed, runner_up,
)
from localllm.fit.llamacpp_memory import LLAMACPP_SWA_FULL, LlamaCppMemory, llamacpp_memory
from localllm.fit.native_memory import WEIGHT_FORMATS, NativeMemory, NativeShape, native_memory
from localllm.fit.quants import smaller_quants
from localllm.fit.settings import FitSettings
from localllm.core.units import gib
from localllm.core.hardware import GPU, Hardware
from localllm.core.modelinfo import ModelInfo

BACKENDS = ("auto", "llamacpp", "native")
NATIVE_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "gemma3"}  # localllm/core/model_config.py
JSON_KEYS = (
    "fits", "backend", "n_gpu_layers", "context_length", "parallel",
    "kv_bytes", "ram_bytes", "vram_bytes", "reasons", "alternatives",
    "weights", "decode_tok_s", "throughput_tok_s", "candidates",
)


@dataclass(frozen=True)
class Wishes:
    """What the user asked for; None and "auto" leave the choice to the planner."""

    context: int | None = None
    parallel: int = 1
    backend: str = "auto"
    weights: str = "auto"  # the native engine's weight format; another than "auto" means the native engine


@dataclass
class Plan:
    fits: bool
    backend: str  # "llamacpp" or "native"
    n_gpu_layers: int  # llama.cpp layers on GPUs, the output layer counted (native on CUDA: all of them)
    context_length: int  # tokens per sequence
    parallel: int  # sequences at once, each with the whole context
    kv_bytes: int
    ram_bytes: int  # what the process will take in RAM
    vram_bytes: int  # what it will take on its GPUs, all together
    reasons: list[str] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)
    device: str = "cpu"  # "cpu" or "cuda:N" (native); "cpu" / "cpu+gpu" / "gpu" (llama.cpp)
    ram_parts: dict[str, int] = field(default_factory=dict)
    vram_parts: dict[str, int] = field(default_factory=dict)
    ram_usable: int = 0
    vram_usable: int = 0
    weights: str = ""  # llama.cpp: the GGUF's quant; native: its weight format (candidates.py)
    decode_tok_s: float = 0.0  # predicted: one request at a time
    throughput_tok_s: float = 0.0  # predicted: `parallel` requests together, all their tokens
    candidates: list[Candidate] = field(default_factory=list, compare=False, repr=False)  # every way it could run here, this plan's among them

    def to_dict(self) -> dict:
        """The JSON shape of `localllm fit --json`: exactly JSON_KEYS."""
        out = {key: getattr(self, key) for key in JSON_KEYS}
        out["decode_tok_s"] = round(self.decode_tok_s, 1)
        out["throughput_tok_s"] = round(self.throughput_tok_s, 1)
        out["candidates"] = [c.to_dict() for c in self.candidates]
        return out


def native_supports(info: ModelInfo) -> bool:
    """Whether the native engine runs the model: a dense model of an architecture it implements."""
    return info.architecture in NATIVE_ARCHITECTURES and not info.is_moe


def plan_fit(
    info: ModelInfo,
    hw: Hardware,
    wishes: Wishes | None = None,
    settings: FitSettings | None = None,
    quant_sizes: dict[str, int] | None = None,
) -> Plan:
    """Plan how to run `info` on `hw`. "Does not fit" is a plan (fits=False, with reasons);
    BadRequest is for wishes that cannot be planned at all (a bad context, an engine that cannot read the model).

    quant_sizes: the bytes of the model's other quants when known (a hub
    listing), for alternatives such as "Q4_K_M fits entirely on the GPU".
    """
    wishes = wishes or Wishes()
    settings = settings or FitSettings()
    _check(info, wishes)
    if wishes.backend == "llamacpp":
        if info.format != "gguf":
            raise BadRequest(f"llama.cpp runs GGUF files only; this model is {info.format}")
        if wishes.weights != "auto":
            raise BadRequest(f"--weights {wishes.weights} is for the native engine; llama.cpp runs the GGUF's own quant")
        plan = _llamacpp(info, hw, wishes, settings, quant_sizes)
        candidate = _llamacpp_candidate(info, hw, plan, wishes, auto=True)
        return _chosen(candidate, [candidate], hw, wishes)
    if wishes.backend == "native" or info.format != "gguf" or wishes.weights != "auto":
        if not native_supports(info):
            raise BadRequest(_native_unsupported(info) + ("; use --backend llamacpp" if info.is_moe else ""))
        candidates = _native_candidates(info, hw, wishes, settings, forced=wishes.backend == "native")
        chosen = choose(candidates) or _fallback(candidates)
        if not chosen.fits and info.format == "gguf" and wishes.backend == "native":
            chosen.plan.alternatives.append("llama.cpp runs the quantized weights in less memory: --backend llamacpp")
        return _chosen(chosen, candidates, hw, wishes)
    llama = _llamacpp_candidate(info, hw, _llamacpp(info, hw, wishes, settings, quant_sizes), wishes, auto=True)
    gpu = machine.native_gpu(hw, settings)
    natives = _native_candidates(info, hw, wishes, settings, forced=False) if native_supports(info) else []
    if gpu is None:
        for c in natives:  # on the CPU only when asked: it lacks llama.cpp's grammars and embeddings
            c.auto = False
    candidates = [llama, *natives]
    chosen = choose(candidates) or llama
    plan = _chosen(chosen, candidates, hw, wishes)
    if chosen is llama:
        native_auto = [c for c in natives if c.auto]
        best = choose(native_auto) or (native_auto[0] if native_auto else None)
        if best is None or not best.fits or best.plan.context_length < llama.plan.context_length:
            plan.reasons[1] = _why_not_native(info, hw, settings, gpu, best.plan if best else None)
    return plan


def _fallback(candidates: list[Candidate]) -> Candidate:
    """When no automatic candidate fits: the first automatic one, to say why."""
    return next(c for c in candidates if c.auto)


def _chosen(chosen: Candidate, candidates: list[Candidate], hw: Hardware, wishes: Wishes) -> Plan:
    """The chosen candidate's plan, with the candidates, its predicted speed and the reasons for the choice."""
    plan = chosen.plan
    plan.weights = chosen.weights
    plan.decode_tok_s = chosen.decode_tok_s
    plan.throughput_tok_s = chosen.throughput_tok_s
    plan.candidates = candidates
    plan.reasons[1:1] = [_choice_reason(chosen, runner_up(candidates, chosen), wishes), _speed_reason(chosen)]
    return plan


def _choice_reason(chosen: Candidate, other: Candidate | None, wishes: Wishes) -> str:
    if other is None or not other.auto:
        if other is not None and other.metric() > chosen.metric():
            return (
                f"{chosen.label}: {chosen.metric():,.0f} tok/s predicted; {other.label} would be faster "
                f"({other.metric():,.0f} tok/s) but is not chosen for you: {ask_for(other, chosen)}"
            )
        return f"{chosen.label}: the only way to run it {'as asked' if wishes.backend != 'auto' else 'here'}"
    if wishes.parallel == 1:
        return (
            f"{chosen.label}: {chosen.decode_tok_s:,.0f} tok/s predicted vs {other.label} {other.decode_tok_s:,.0f} tok/s "
            f"for one request at a time (a token reads {_gb(chosen.speed.read_bytes)} against {_gb(other.speed.read_bytes)})"
        )
    return (
        f"{chosen.label}: {chosen.throughput_tok_s:,.0f} tok/s predicted for {wishes.parallel} parallel requests vs "
        f"{other.label} {other.throughput_tok_s:,.0f} tok/s (a step reads the weights once for all of them; "
        f"one request alone: {chosen.decode_tok_s:,.0f} vs {other.decode_tok_s:,.0f} tok/s)"
    )


def _speed_reason(chosen: Candidate) -> str:
    parts = "; ".join(
        f"{_gb(s.weight_bytes + s.kv_bytes)} at {s.device.describe()} x {s.efficiency.bandwidth:.2f} "
        f"({'measured' if s.efficiency.source.startswith('measured') else 'a guess'})"
        for s in chosen.speed.shares
    )
    return f"predicted decode {chosen.decode_tok_s:,.1f} tok/s: a token reads {parts} (KV at half the context)"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _llamacpp_candidate(info: ModelInfo, hw: Hardware, plan: Plan, wishes: Wishes, *, auto: bool) -> Candidate:
    return Candidate("llamacpp", info.quantization or "gguf", plan, llamacpp_speed(info, plan, hw), auto, wishes.parallel)


def _native_candidates(info: ModelInfo, hw: Hardware, wishes: Wishes, settings: FitSettings, *, forced: bool) -> list[Candidate]:
    """The native engine in every weight format its device runs; the automatic ones (or the asked one) first."""
    gpu = machine.native_gpu(hw, settings) or (machine.cuda_gpu(hw) if forced else None)
    formats = native_formats(gpu is not None, gpu.compute_capability if gpu else None)
    if wishes.weights != "auto":
        if wishes.weights not in WEIGHT_FORMATS:
            raise BadRequest(f"--weights is one of auto, {', '.join(WEIGHT_FORMATS)}; not '{wishes.weights}'")
        if wishes.weights not in formats:
            raise BadRequest(f"the native engine cannot run {wishes.weights} weights on {_gpu_name(gpu) if gpu else 'the CPU'}")
        automatic = [wishes.weights]
    else:
        automatic = auto_formats(info, hw, gpu is not None)
    ordered = automatic + [f for f in formats if f not in automatic]
    out = []
    for weights in ordered:
        plan = _native(info, hw, wishes, settings, forced=forced, weights=weights)
        out.append(Candidate("native", weights, plan, native_speed(info, plan, weights, hw), weights in automatic, wishes.parallel))
    return out


def _check(info: ModelInfo, wishes: Wishes) -> None:
    if wishes.backend not in BACKENDS:
        raise BadRequest(f"the planner knows the backends {', '.join(BACKENDS)}, not '{wishes.backend}'")
    if wishes.parallel < 1:
        raise BadRequest("parallel must be at least 1")
    if info.n_layers <= 0 or info.hidden_size <= 0:
        raise BadRequest(f"model '{info.model_name or info.path}' has no known shape to plan with")
    if wishes.context is not None:
        if wishes.context < 16:
            raise BadRequest(f"context size must be at least 16 tokens (got {wishes.context})")
        if info.context_length and wishes.context > info.context_length:
            raise BadRequest(
                f"context size {wishes.context} is larger than the {info.context_length} tokens the model was trained for"
            )


def _native_unsupported(info: ModelInfo) -> str:
    if info.is_moe:
        return f"the native engine does not run a mixture of experts ({info.expert_count} experts)"
    return (
        f"the native engine does not run the {info.architecture} architecture "
        f"(it runs {', '.join(sorted(NATIVE_ARCHITECTURES))})"
    )


def _why_not_native(info: ModelInfo, hw: Hardware, settings: FitSettings, gpu: GPU | None, native: Plan | None) -> str:
    bar = f"compute capability >= {settings.native_min_compute_capability:.1f} and >= {gib(settings.native_min_vram_bytes)}"
    if not native_supports(info):
        return f"llama.cpp rather than the native engine: {_native_unsupported(info)}"
    if not hw.gpus:
        return "llama.cpp rather than the native engine: the native engine runs GGUF models only on a CUDA GPU, and none was found"
    if gpu is None:
        return f"llama.cpp rather than the native engine: no GPU meets the native engine's bar ({bar}, with torch's CUDA)"
    if native is not None and native.fits:
        return f"llama.cpp rather than the native engine on {_gpu_name(gpu)}, where only a context of {native.context_length} fits"
    verdict = native.reasons[-1] if native is not None else "it does not fit"
    return f"llama.cpp rather than the native engine on {_gpu_name(gpu)}, where it {verdict}"


# -- context search -------------------------------------------------------------------


def context_candidates(info: ModelInfo, settings: FitSettings) -> list[int]:
    """Automatic contexts, largest first: multiples of the step up to min(trained, cap)."""
    top = min(info.context_length or settings.context_cap, settings.context_cap)
    step = settings.context_step
    if top < step:
        return [top]
    return list(range(top - top % step, 0, -step))


def _search(
    info: ModelInfo, wishes: Wishes, settings: FitSettings, attempt: Callable[[int], Plan]
) -> tuple[Plan, bool]:
    """The plan at the asked context, or at the largest automatic one that fits (else the smallest tried)."""
    if wishes.context is not None:
        return attempt(wishes.context), False
    candidates = context_candidates(info, settings)
    lo, hi = 0, len(candidates) - 1  # fitting is monotone in the context: binary search, largest first
    first = attempt(candidates[0])
    if first.fits:
        return first, True
    best: Plan | None = None
    lo = 1
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = attempt(candidates[mid])
        if plan.fits:
            best, hi = plan, mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best, True
    return attempt(candidates[-1]) if len(candidates) > 1 else first, True


# -- llama.cpp ------------------------------------------------------------------------


def _llamacpp(info: ModelInfo, hw: Hardware, wishes: Wishes, settings: FitSettings, quant_sizes: dict[str, int] | None) -> Plan:
    gpus = machine.llamacpp_gpus(hw)
    ram_usable = machine.usable_ram(hw, settings)
    vram_usable = sum(machine.usable_vram(g, settings) for g in gpus)

    def attempt(context: int) -> Plan:
        mem = _most_layers(info, context, wishes.parallel, len(gpus), vram_usable)
        return _llamacpp_plan(info, mem, context, wishes.parallel, ram_usable, vram_usable)

    plan, automatic = _search(info, wishes, settings, attempt)
    plan.reasons = _llamacpp_reasons(info, hw, plan, settings, gpus, automatic)
    plan.alternatives = _llamacpp_alternatives(info, plan, wishes, settings, len(gpus), vram_usable, ram_usable, quant_sizes)
    return plan


def _most_layers(info: ModelInfo, context: int, parallel: int, n_gpus: int, vram_usable: int) -> LlamaCppMemory:
    """llama.cpp's memory with the most layers whose VRAM fits (VRAM grows with every layer: binary search)."""
    def mem(k: int) -> LlamaCppMemory:
        return llamacpp_memory(info, context=context, parallel=parallel, n_gpu_layers=k, n_gpus=n_gpus)

    if not n_gpus:
        return mem(0)
    lo, hi = 0, info.n_layers + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mem(mid).vram_bytes <= vram_usable:
            lo = mid
        else:
            hi = mid - 1
    return mem(lo)


def _llamacpp_plan(info: ModelInfo, mem: LlamaCppMemory, context: int, parallel: int, ram_usable: int, vram_usable: int) -> Plan:
    fits = mem.ram_bytes <= ram_usable and mem.vram_bytes <= vram_usable
    all_on_gpu = mem.n_gpu_layers == info.n_layers + 1
    device = "gpu" if all_on_gpu else ("cpu+gpu" if mem.n_gpu_layers else "cpu")
    return Plan(
        fits, "llamacpp", mem.n_gpu_layers, context, parallel, mem.kv_bytes, mem.ram_bytes, mem.vram_bytes,
        device=device, ram_parts=dict(mem.ram), vram_parts=dict(mem.vram), ram_usable=ram_usable, vram_usable=vram_usable,
    )


def _llamacpp_reasons(
    info: ModelInfo, hw: Hardware, plan: Plan, settings: FitSettings, gpus: list[GPU], automatic: bool
) -> list[str]:
    total_layers = info.n_layers + 1
    reasons = []
    if not gpus:
        if hw.gpus and not hw.llama_cpp.cuda:
            reasons.append("llama.cpp on the CPU: this llama-cpp-python is a CPU build, so no layer goes to the GPU")
        else:
            reasons.append("llama.cpp on the CPU: no GPU")
    elif plan.n_gpu_layers == total_layers:
        reasons.append(f"llama.cpp with all {total_layers} layers (the output layer counted) on {_gpus_name(gpus)}")
    elif plan.n_gpu_layers:
        reasons.append(
            f"llama.cpp with {plan.n_gpu_layers} of {total_layers} layers on {_gpus_name(gpus)} (as many as fit), the rest on the CPU"
        )
    else:
        reasons.append(f"llama.cpp on the CPU: not even the output layer fits in the usable VRAM of {_gpus_name(gpus)}")
    reasons.append(_context_reason(info, plan, settings, automatic))
    if info.sliding_window and info.sliding_window_layers and LLAMACPP_SWA_FULL:
        reasons.append(
            f"llama.cpp keeps the {len(info.sliding_window_layers)} sliding-window layers at the full context too "
            "(its full-size window cache, which reusing a long chat's prompt needs), so the KV cache is "
            f"{gib(plan.kv_bytes)} for {plan.context_length * plan.parallel} tokens"
        )
    else:
        reasons.append(f"KV cache: {gib(plan.kv_bytes)} for {plan.context_length * plan.parallel} tokens (f16)")
    if plan.vram_parts:
        buffer = plan.vram_parts.get("compute buffer", 0)
        reasons.append(
            f"llama.cpp reserves a {gib(buffer)} compute buffer on the GPU (the logits of a 512-token micro-batch are "
            f"{gib(info.vocab_size * 512 * 4)} alone)"
        )
    elif gpus:
        reasons.append(
            f"a GPU build of llama.cpp pins its CPU compute buffer, so all of it counts: {gib(plan.ram_parts.get('compute buffer', 0))}"
        )
    else:
        reasons.append(
            "on the CPU only the compute buffer's touched pages count: activations, masks and the last token's logits, "
            f"{gib(plan.ram_parts.get('compute buffer', 0))} (the reserved logits of a whole micro-batch stay untouched)"
        )
    reasons.append(_memory_reason(plan, settings, hw))
    return reasons


def _llamacpp_alternatives(
    info: ModelInfo,
    plan: Plan,
    wishes: Wishes,
    settings: FitSettings,
    n_gpus: int,
    vram_usable: int,
    ram_usable: int,
    quant_sizes: dict[str, int] | None,
) -> list[str]:
    alternatives: list[str] = []
    total_layers = info.n_layers + 1
    if n_gpus and plan.n_gpu_layers < total_layers:
        fits_gpu = [
            c for c in context_candidates(info, settings)
            if c < plan.context_length
            and llamacpp_memory(info, context=c, parallel=wishes.parallel, n_gpu_layers=total_layers, n_gpus=n_gpus).vram_bytes <= vram_usable
        ]
        if fits_gpu:
            alternatives.append(f"context {fits_gpu[0]} fits fully on the GPU")
        for quant, scaled in smaller_quants(info, quant_sizes):
            mem = llamacpp_memory(scaled, context=plan.context_length, parallel=wishes.parallel, n_gpu_layers=total_layers, n_gpus=n_gpus)
            if mem.vram_bytes <= vram_usable:
                alternatives.append(f"{quant} (~{gib(scaled.weight_bytes)}) fits entirely on the GPU at context {plan.context_length}")
                break
    if not plan.fits:
        smaller = [c for c in context_candidates(info, settings) if c < plan.context_length]
        for c in smaller:
            mem = _most_layers(info, c, wishes.parallel, n_gpus, vram_usable)
            if mem.ram_bytes <= ram_usable:
                alternatives.append(f"context {c} fits" + (f" with {mem.n_gpu_layers} layers on the GPU" if mem.n_gpu_layers else ""))
                break
        if wishes.parallel > 1:
            mem = _most_layers(info, plan.context_length, 1, n_gpus, vram_usable)
            if mem.ram_bytes <= ram_usable:
                alternatives.append(f"parallel 1 fits at context {plan.context_length}")
        for quant, scaled in smaller_quants(info, quant_sizes):
            mem = _most_layers(scaled, plan.context_length, wishes.parallel, n_gpus, vram_usable)
            if mem.ram_bytes <= ram_usable:
                alternatives.append(f"{quant} (~{gib(scaled.weight_bytes)}) fits at context {plan.context_length}")
                break
    return alternatives


# -- the native engine ----------------------------------------------------------------


def _native(info: ModelInfo, hw: Hardware, wishes: Wishes, settings: FitSettings, *, forced: bool, weights: str) -> Plan:
    """The native engine with `weights`: on the GPU that meets its bar (or, forced, any CUDA GPU), else on the CPU."""
    shape = NativeShape.from_info(info)
    gpu = machine.native_gpu(hw, settings) or (machine.cuda_gpu(hw) if forced else None)
    ram_usable = machine.usable_ram(hw, settings)
    vram_usable = machine.usable_vram(gpu, settings) if gpu else 0
    device = f"cuda:{gpu.index}" if gpu else "cpu"

    def attempt(context: int) -> Plan:
        mem = native_memory(
            shape, device=device, context=context, parallel=wishes.parallel, file_bytes=info.size_bytes, weights=weights,
        )
        ram = native_ram(info, mem)
        vram = mem.total_bytes if gpu else 0
        fits = ram <= ram_usable and vram <= vram_usable
        layers = info.n_layers + 1 if gpu else 0
        plan = Plan(
            fits, "native", layers, context, wishes.parallel, mem.kv_bytes, ram, vram,
            device=device, ram_usable=ram_usable, vram_usable=vram_usable,
        )
        if gpu:
            plan.vram_parts = dict(mem.parts)
            plan.ram_parts = {"loading (transient)": ram}
        else:
            plan.ram_parts = dict(mem.parts)
        return plan

    plan, automatic = _search(info, wishes, settings, attempt)
    plan.reasons = _native_reasons(info, hw, plan, settings, gpu, automatic, weights)
    if not plan.fits:
        smaller = [c for c in context_candidates(info, settings) if c < plan.context_length]
        for c in smaller:
            if attempt(c).fits:
                plan.alternatives.append(f"context {c} fits")
                break
    return plan


def native_ram(info: ModelInfo, mem: NativeMemory) -> int:
    """The process's RAM for the native engine: on the CPU everything; on CUDA the runtime and the load's buffer.

    The loader streams: it reads, dequantizes and places a slice of rows at a
    time on the device, handing the file's mapped pages back as it goes, so
    the host holds only its working buffer (mem.loading_buffer) beside torch
    and the CUDA libraries, never the weights.
    """
    if mem.device == "cpu":
        return mem.total_bytes  # loading builds the weights where they stay; its leftovers are a part
    from localllm.fit.llamacpp_memory import CUDA_HOST_BYTES
    from localllm.fit.native_memory import TORCH_CPU_RUNTIME_BYTES

    return mem.loading_buffer + TORCH_CPU_RUNTIME_BYTES + CUDA_HOST_BYTES


def _native_reasons(
    info: ModelInfo, hw: Hardware, plan: Plan, settings: FitSettings, gpu: GPU | None, automatic: bool, weights: str
) -> list[str]:
    reasons = []
    held = f"{weights} weights ({gib(plan.vram_parts.get('weights', 0) or plan.ram_parts.get('weights', 0))})"
    if gpu:
        reasons.append(
            f"the native engine on {_gpu_name(gpu)}: it holds the whole model in {held} plus the KV cache for the context"
            if plan.fits
            else f"the native engine on {_gpu_name(gpu)} needs the whole model in {held} plus its KV cache"
        )
    else:
        why = "this model is a Hugging Face folder, which llama.cpp cannot read" if info.format != "gguf" else "as asked"
        reasons.append(f"the native engine on the CPU with {held} ({why}; no CUDA GPU for it here)")
    reasons.append(_context_reason(info, plan, settings, automatic))
    if gpu:
        reasons.append(
            f"loading streams the weights to the GPU a slice at a time: {gib(plan.ram_bytes)} of RAM "
            "(torch, the CUDA libraries and the loader's working buffer)"
        )
    if info.sliding_window and info.sliding_window_layers:
        reasons.append(
            "the native engine keeps only the window's blocks for the sliding-window layers, so the KV cache is "
            f"{gib(plan.kv_bytes)} for {plan.context_length * plan.parallel} tokens"
        )
    else:
        reasons.append(f"KV cache: {gib(plan.kv_bytes)} for {plan.context_length * plan.parallel} tokens")
    reasons.append(_memory_reason(plan, settings, hw))
    return reasons


# -- shared wording ---------------------------------------------------------------------


def _context_reason(info: ModelInfo, plan: Plan, settings: FitSettings, automatic: bool) -> str:
    trained = info.context_length
    if not automatic:
        return f"context {plan.context_length} tokens as asked (trained for {trained})"
    top = min(trained or settings.context_cap, settings.context_cap)
    if plan.context_length == top:
        cap = f"the default cap of {settings.context_cap}" if trained > settings.context_cap else "the trained context"
        return f"context {plan.context_length} tokens: {cap}" + (
            f" (trained for {trained}; ask for more with --ctx)" if trained > settings.context_cap else ""
        )
    if plan.fits:
        return f"context {plan.context_length} tokens: the largest multiple of {settings.context_step} up to {top} that fits"
    return f"no context fits: even {plan.context_length} tokens needs more memory than there is"


def _memory_reason(plan: Plan, settings: FitSettings, hw: Hardware) -> str:
    margin_ram = int(settings.ram_margin_fraction * hw.ram_total_bytes)
    parts = [
        f"needs {gib(plan.ram_bytes)} of RAM of {gib(plan.ram_usable)} usable "
        f"({gib(hw.ram_available_bytes)} available less a {settings.ram_margin_fraction:.0%} margin of {gib(margin_ram)})"
    ]
    if plan.vram_bytes or plan.vram_usable:
        parts.append(
            f"{gib(plan.vram_bytes)} of VRAM of {gib(plan.vram_usable)} usable (free less {gib(settings.vram_margin_bytes)} per GPU)"
        )
    verdict = "fits" if plan.fits else "does not fit"
    return f"{verdict}: " + " and ".join(parts)


def _gpu_name(gpu: GPU) -> str:
    cc = f", compute {gpu.compute_capability}" if gpu.compute_capability else ""
    return f"GPU {gpu.index} ({gpu.name}, {gib(gpu.vram_total_bytes)}{cc})"


def _gpus_name(gpus: list[GPU]) -> str:
    if len(gpus) == 1:
        return _gpu_name(gpus[0])
    return f"{len(gpus)} GPUs ({gib(sum(g.vram_total_bytes for g in gpus))} in all)"

