"""Other quants of a model: their sizes in a hub listing, and a header scaled to another quant.

The planner names smaller quants as alternatives (planner.py) and picks the
quant a pull fetches (quant_choice.py) from these, without reading every
quant's header: one header is read, the others' layers scaled from it.
"""

from __future__ import annotations

from dataclasses import replace

from localllm.core.modelinfo import ModelInfo
from localllm.core.quant_table import QUANT_BITS, SUGGESTED, rank
from localllm.store.refs import is_model_gguf, quant_of, split_part


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
        if rank(quant) > current and bpw and QUANT_BITS[quant] < bpw:
            out.append((quant, scaled(info, int(info.size_bytes * QUANT_BITS[quant] / bpw), quant)))
    return out


def quant_sizes(files: list) -> dict[str, int]:
    """Bytes of each quant in a repository listing (hub.RemoteFile values; a split GGUF's parts summed).

    A quant with files under several names (two variants of one quant) is left
    out: a pull could not pick one of them by quant either.
    """
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
