"""`localllm fit` output: a short table of where memory goes, then the reasons."""

from __future__ import annotations

from localllm.fit.planner import Plan
from localllm.fit.settings import FitSettings
from localllm.core.units import gib, human_count
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo


def verdict(plan: Plan) -> str:
    """One line: does it fit, on what, at which context."""
    where = {
        "cpu": "on the CPU",
        "gpu": f"all {plan.n_gpu_layers} layers on the GPU",
        "cpu+gpu": f"{plan.n_gpu_layers} layers on the GPU, the rest on the CPU",
    }.get(plan.device, f"on {plan.device}")
    seqs = f", {plan.parallel} sequences" if plan.parallel > 1 else ""
    word = "fits" if plan.fits else "does not fit"
    return f"{word}: {plan.backend}, {where}, context {plan.context_length}{seqs}"


def speed(plan: Plan) -> str:
    """The chosen plan's predicted speed and, briefly, the runner-up's."""
    from localllm.fit.candidates import runner_up

    chosen = next((c for c in plan.candidates if c.plan is plan), None)
    if chosen is None:
        return f"{plan.decode_tok_s:,.1f} tok/s predicted"
    def said(c) -> str:
        if plan.parallel > 1:
            return f"{c.throughput_tok_s:,.0f} tok/s for {plan.parallel} requests ({c.decode_tok_s:,.1f} alone)"
        return f"{c.decode_tok_s:,.1f} tok/s"
    line = f"{chosen.label}, {said(chosen)} predicted"
    other = runner_up(plan.candidates, chosen)
    if other is not None:
        line += f"; runner-up {other.label}, {said(other)}" + ("" if other.auto else " if asked for")
    return line


def badge(plan: Plan) -> str:
    """A few characters for a table cell (the TUI's FIT column)."""
    if not plan.fits:
        return "too large"
    if plan.device == "gpu" or plan.device.startswith("cuda"):
        return f"GPU {plan.context_length // 1024}k" if plan.context_length >= 1024 else "GPU"
    if plan.device == "cpu+gpu":
        return f"GPU+CPU {plan.n_gpu_layers}L"
    return f"CPU {plan.context_length // 1024}k" if plan.context_length >= 1024 else "CPU"


def text(plan: Plan, info: ModelInfo, name: str, hw: Hardware) -> str:
    lines = [
        f"model    {name} ({info.quantization}, {human_count(info.parameters)} parameters, {gib(info.size_bytes)})",
        f"machine  {_machine(hw)}",
        f"verdict  {verdict(plan)}",
        *([f"speed    {speed(plan)}"] if plan.candidates else []),
        "",
    ]
    parts = list(dict.fromkeys([*plan.ram_parts, *plan.vram_parts]))
    rows = [["", "RAM", "VRAM"]]
    for part in parts:
        ram, vram = plan.ram_parts.get(part), plan.vram_parts.get(part)
        if not ram and not vram:
            continue
        rows.append([part, gib(ram) if ram else "-", gib(vram) if vram else "-"])
    rows.append(["total", gib(plan.ram_bytes), gib(plan.vram_bytes) if plan.vram_bytes else "-"])
    rows.append(["usable", gib(plan.ram_usable), gib(plan.vram_usable) if plan.vram_usable else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append(f"  {r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}".rstrip())
    lines.append("")
    lines.append("why:")
    lines.extend(f"  - {reason}" for reason in plan.reasons)
    if plan.alternatives:
        lines.append("alternatives:")
        lines.extend(f"  - {alt}" for alt in plan.alternatives)
    return "\n".join(lines)


def _machine(hw: Hardware) -> str:
    ram = f"RAM {gib(hw.ram_available_bytes)} available of {gib(hw.ram_total_bytes)}"
    if not hw.gpus:
        return f"{ram}; no GPU"
    gpus = "; ".join(
        f"GPU {g.index} {g.name} {gib(g.vram_free_bytes)} free of {gib(g.vram_total_bytes)}"
        + (f", compute {g.compute_capability}" if g.compute_capability else "")
        for g in hw.gpus
    )
    return f"{ram}; {gpus}"


def size_badge(size_bytes: int, hw: Hardware, settings: FitSettings | None = None) -> str:
    """A rough badge from a file size alone (a catalog model whose header is not read yet).

    Weights plus a tenth for KV and buffers, plus a fixed share for the
    compute buffer and runtime; the planner's margins apply.
    """
    from localllm.fit.llamacpp_memory import CUDA_CONTEXT_BYTES
    from localllm.fit.machine import llamacpp_gpus, usable_ram, usable_vram
    from localllm.core.units import MIB

    settings = settings or FitSettings()
    need = int(size_bytes * 1.1) + 512 * MIB
    gpus = llamacpp_gpus(hw)
    vram = sum(usable_vram(g, settings) for g in gpus) - CUDA_CONTEXT_BYTES * len(gpus)
    ram = usable_ram(hw, settings)
    if gpus and need <= vram:
        return "GPU"
    if gpus and vram > 0 and need <= vram + ram:
        return "GPU+CPU"
    return "CPU" if need <= ram else "too large"
