"""Planning for a model that is not downloaded yet: the hub's listing and the GGUF header, nothing more.

Used by `localllm fit` for catalog names and hf: references, and by `pull`,
which asks the planner which quant to fetch when the name carries none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localllm.fit.quants import QuantChoice, choose_quant, quant_sizes
from localllm.fit.settings import FitSettings
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo
from localllm.store.refs import ModelRef


@dataclass
class RemoteModel:
    ref: ModelRef  # with the quant that was chosen
    info: ModelInfo  # of that quant
    sizes: dict[str, int]  # every quant in the repository
    choice: QuantChoice | None  # set when the planner picked the quant


def quant_given(text: str) -> bool:
    """False for a catalog name without a quant (`qwen2.5:7b`), where the planner may choose one."""
    from localllm.store.catalog import default_catalog

    found = default_catalog().lookup(text.strip())
    return found is None or found[1] is not None


def remote_model(text: str, model: ModelRef, hw: Hardware, settings: FitSettings | None = None, *, listing=None) -> RemoteModel:
    """Read what the planner needs for `model` from the hub; pick its quant when `text` names none."""
    from localllm.store import hub
    from localllm.store.pull import plan_files
    from localllm.store.remote_info import remote_model_info

    listing = listing or hub.list_files(model.repo, model.revision)
    sizes = quant_sizes(listing.files) if model.kind == "quant" else {}
    choice = None
    if model.catalog is not None and not quant_given(text) and len(sizes) > 1:
        header_quant = model.quant if model.quant in sizes else min(sizes, key=sizes.__getitem__)
        header = plan_files(replace(model, quant=header_quant), listing.files, listing.commit)
        info = remote_model_info(header)
        choice = choose_quant(info, sizes, model.catalog.default_quant, hw, settings)
        model = replace(model, quant=choice.quant)
        if choice.quant != header_quant:
            info = remote_model_info(plan_files(model, listing.files, listing.commit))
        return RemoteModel(model, info, sizes, choice)
    info = remote_model_info(plan_files(model, listing.files, listing.commit))
    return RemoteModel(model, info, sizes, None)
