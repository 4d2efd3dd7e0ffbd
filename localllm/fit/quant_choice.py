"""Which quant `pull` fetches for a catalog name that names none.

On a GPU, the best quant (up to Q8_0) whose plan runs entirely on it at the
full automatic context; without one, the catalog's default quant (CPU speed is
memory bandwidth, so a bigger quant is slower) or, when that does not fit, the
best smaller one that does. Every quant is planned from one header (quants.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.core.errors import DoesNotFit
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo
from localllm.core.quant_table import AUTO_BEST, rank
from localllm.fit.planner import Plan, Wishes, context_candidates, plan_fit
from localllm.fit.quants import scaled
from localllm.fit.settings import FitSettings


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
