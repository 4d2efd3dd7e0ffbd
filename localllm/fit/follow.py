"""`run`, `chat` and `serve` follow the plan: backend, weight format, GPU layers, context (and a CPU KV budget) come from it.

A backend named with --backend is planned for as asked, and refused (with the
plan's reasons) when it cannot fit; so is `auto` when nothing fits, rather
than loading into an out-of-memory crash or a swap storm.

llama.cpp's context is what the backend calls n_ctx: the KV cache all its
slots share (llama.cpp's unified cache), so its memory depends on n_ctx
alone and one sequence is planned for. The native engine gets the plan's
context; on the CPU also the plan's KV budget (`parallel` full contexts,
sliding-window layers holding their windows), on CUDA it sizes its pool from
the memory left free, like vLLM, so more sequences can share the cache.

A draft model for speculative decoding is planned in what the model leaves
(RAM and each GPU's free memory less the model's plan; margins stay free),
on the same backend and context; if it does not fit, loading is refused
rather than let the second model push the first out of memory. On llama.cpp
the draft gets GPU layers of its own from its plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from localllm.core.hardware import GPU

from localllm.core.errors import DoesNotFit
from localllm.fit.machine import probe
from localllm.fit.planner import Plan, Wishes, plan_fit
from localllm.fit.settings import FitSettings
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo


def follow_plan(
    name: str, info: ModelInfo, options: Any, *, hardware: Hardware | None = None, parallel: int = 1,
    draft: ModelInfo | None = None,
) -> Any:
    """LoadOptions with the planner's choices filled in where the user left them open; raises DoesNotFit."""
    hardware = hardware or probe()
    settings = FitSettings.from_env()
    asked_weights = getattr(options, "weights", "auto")
    plan = plan_fit(info, hardware, Wishes(options.n_ctx, parallel, options.backend, asked_weights), settings)
    if not plan.fits:
        raise DoesNotFit(refusal(name, plan, options.backend))
    chosen = replace(options, backend=plan.backend, n_ctx=options.n_ctx or plan.context_length * plan.parallel)
    if plan.backend == "native" and hasattr(options, "weights"):
        chosen = replace(chosen, weights=plan.weights)  # the format the plan's memory and speed are for
    if draft is not None:
        draft_plan = plan_draft(draft, plan, hardware, settings, chosen.n_ctx)
        if not draft_plan.fits:
            raise DoesNotFit(
                f"the draft model '{options.speculation.draft}' does not fit beside '{name}': {draft_plan.reasons[-1]}; "
                "`localllm fit` explains"
            )
        chosen = replace(chosen, speculation=replace(chosen.speculation, draft_n_gpu_layers=draft_plan.n_gpu_layers))
    if plan.backend == "llamacpp":
        return replace(chosen, n_gpu_layers=plan.n_gpu_layers)
    if plan.device == "cpu" and options.kv_cache_bytes is None:
        # On the CPU a block counts once touched, and the engine prefers never-used blocks, so a pool
        # larger than the plan's would end up in RAM: give it exactly the planned one.
        chosen = replace(chosen, kv_cache_bytes=plan.kv_bytes)
    return chosen  # on CUDA the engine sizes its pool from what the device has free


def plan_draft(draft: ModelInfo, plan: Plan, hardware: Hardware, settings: FitSettings, n_ctx: int) -> Plan:
    """The draft's plan on what `plan` leaves of `hardware`: same backend and context, the same margins kept free."""
    rest = replace(hardware, ram_available_bytes=max(0, hardware.ram_available_bytes - plan.ram_bytes),
                   gpus=_gpus_less(hardware.gpus, plan.vram_bytes))
    return plan_fit(draft, rest, Wishes(n_ctx, 1, plan.backend), settings)


def _gpus_less(gpus: list[GPU], used: int) -> list[GPU]:
    """The GPUs with `used` bytes taken, first GPU first."""
    left = []
    for gpu in gpus:
        take = min(used, gpu.vram_free_bytes)
        used -= take
        left.append(replace(gpu, vram_free_bytes=gpu.vram_free_bytes - take))
    return left


def refusal(name: str, plan: Plan, asked: str) -> str:
    """One line: who cannot run what, the deciding reason, and what would fit."""
    who = "no backend can" if asked == "auto" else f"--backend {asked} cannot"
    line = f"{who} run '{name}' here: {plan.reasons[-1]}"
    if plan.alternatives:
        line += f"; {'; '.join(plan.alternatives)}"
    if len(plan.reasons) > 1 and plan.reasons[0] not in line:
        line += f" ({plan.reasons[0]})"
    return line + "; `localllm fit` explains"
