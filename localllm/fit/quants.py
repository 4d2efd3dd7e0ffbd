"""Quants: which is better, how big another quant of a model would be, and which to pull.

`pull NAME` without a quant asks the planner: on a GPU, the best quant (up to
Q8_0) whose plan runs entirely on it at the full automatic context; without
one, the catalog's default quant (CPU speed is memory bandwidth, so a bigger
quant is slower) or, when that does not fit, the best smaller one that does.
One header is read from the hub; the other quants' sizes come from the
repository listing, their layers scaled from that header.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localllm.core.errors import DoesNotFit
from localllm.fit.planner import Plan, Wishes, context_candidates, plan_fit
from localllm.fit.settings import FitSettings
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo

# Best first. Bits per weight are typical whole-file figures for 7-8B models (llama.cpp's quantize table).
QUANT_LADDER: dict[str, float] = {
    "BF16": 16.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_0": 5.5,
    "Q4_K_M": 4.89, "Q4_K_S": 4.58, "IQ4_XS": 4.25, "IQ4_NL": 4.5, "Q4_0": 4.55,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "IQ3_M": 3.66, "Q3_K_S": 3.5, "IQ3_XS": 3.3, "IQ3_XXS": 3.06,
    "Q2_K": 3.0, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06,
}
AUTO_BEST = "Q8_0"  # automatic choices stop here: 16-bit files double the memory for no visible gain
SUGGESTED = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")  # alternatives worth naming


def rank(quant: str) -> int:
    """Position in the ladder (0 is best); unknown quants sort last."""
    order = list(QUANT_LADDER)
    return order.index(quant.upper()) if quant.upper() in QUANT_LADDER else len(order)


def scaled(info: ModelInfo, size_bytes: int, quant: str) -> ModelInfo:
    """`info` as another quant of `size_bytes`: every weight scaled by the size ratio.

    The shape, KV and vocabulary stay; only the weights change. Exact in
    total, approximate per layer (quantizers keep some tensors at higher precision).
    """
    ratio = size_bytes / info.size_bytes if info.size_bytes else 1.0
    return replace(
        info,
        quantization=quant,
        size_bytes=size_bytes,
        layer_weight_bytes=[int(b * ratio) for b in info.layer_weight_bytes],
        layer_repack_bytes=[int(b * ratio) for b in info.layer_repack_bytes] if quant.startswith(("Q4", "IQ4")) else [],
        token_embd_bytes=int(info.token_embd_bytes * ratio),
        output_bytes=int(info.output_bytes * ratio),
        other_bytes=int(info.other_bytes * ratio),
    )


def smaller_quants(info: ModelInfo, sizes: dict[str, int] | None = None) -> list[tuple[str, ModelInfo]]:
    """Lower quants worth suggesting, best first, as scaled ModelInfos (sizes: real file sizes when known)."""
    current = rank(info.quantization)
    out = []
    if sizes:
        for quant in sorted(sizes, key=rank):
            if rank(quant) > current:
                out.append((quant, scaled(info, sizes[quant], quant)))
        return out
    bpw = info.weight_bytes * 8 / info.parameters if info.parameters else 0
    for quant in SUGGESTED:
        if rank(quant) > current and bpw and QUANT_LADDER[quant] < bpw:
            out.append((quant, scaled(info, int(info.size_bytes * QUANT_LADDER[quant] / bpw), quant)))
    return out


@dataclass
class QuantChoice:
    quant: str
    plan: Plan
    reason: str


def choose_quant(
    info: ModelInfo,
    sizes: dict[str, int],
    default_quant: str,
    hw: Hardware,
    settings: FitSettings | None = None,
) -> QuantChoice:
    """The quant to pull (see the module docstring). `info` is one quant's header; `sizes` every quant's bytes.

    Raises DoesNotFit with the default quant's reasons when nothing fits.
    """
    settings = settings or FitSettings()
    plans = {q: plan_fit(scaled(info, size, q), hw, Wishes(), settings) for q, size in sizes.items()}
    target = context_candidates(info, settings)[0]
    ladder = sorted((q for q in plans if rank(q) >= rank(AUTO_BEST)), key=rank)
    for quant in ladder:
        plan = plans[quant]
        if plan.fits and plan.context_length >= target and plan.device in ("gpu",) + tuple(f"cuda:{g.index}" for g in hw.gpus):
            return QuantChoice(quant, plan, f"{quant} is the best quant that runs entirely on the GPU at context {target}")
    default = next((q for q in plans if q.upper() == default_quant.upper()), None)
    below = [q for q in ladder if rank(q) > rank(default_quant)]
    if default is not None and plans[default].fits and plans[default].context_length >= target:
        return QuantChoice(default, plans[default], f"{default}, the catalog's default, fits at context {target}")
    for quant in below:
        if plans[quant].fits and plans[quant].context_length >= target:
            return QuantChoice(quant, plans[quant], f"{quant} is the best quant below {default_quant} that fits at context {target}")
    for quant in ([default] if default is not None else []) + below:
        if plans[quant].fits:
            plan = plans[quant]
            return QuantChoice(quant, plan, f"{quant} fits at context {plan.context_length}")
    worst = plans[default] if default is not None else plans[max(plans, key=rank)]
    raise DoesNotFit(f"no quant of this model fits here; {default or 'the smallest'}: {worst.reasons[-1]}")


def quant_sizes(files: list) -> dict[str, int]:
    """Bytes of each quant in a repository listing (hub.RemoteFile values; a split GGUF's parts summed).

    A quant with files under several names (two variants of one quant) is left
    out: a pull could not pick one of them by quant either.
    """
    from localllm.store.refs import is_model_gguf, quant_of, split_part

    groups: dict[str, dict[str, int]] = {}
    for f in files:
        if not is_model_gguf(f.path):
            continue
        quant = quant_of(f.path)
        if quant:
            part = split_part(f.path)
            key = part.prefix if part else f.path
            by_name = groups.setdefault(quant, {})
            by_name[key] = by_name.get(key, 0) + f.size
    return {q: next(iter(names.values())) for q, names in groups.items() if len(names) == 1}
