"""Planning for a model still on the hub: the listing and the header, nothing more; and the quant a pull fetches.

Used by `localllm fit` for catalog names and hf: references (`hub_model`),
and by every front end's pull (`pull_with_plan`): the planner picks the quant
of a catalog name that names none, then hands it down to the store's `pull`.
The store never asks the planner.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo
from localllm.fit.quant_choice import QuantChoice, choose_quant
from localllm.fit.quants import quant_sizes
from localllm.fit.settings import FitSettings
from localllm.store.progress import PullProgress
from localllm.store.pull import hub_listing, plan_files, pull, quant_to_choose
from localllm.store.refs import ModelRef, quant_given
from localllm.store.hub_header import hub_model_info
from localllm.store.store import Manifest, ModelStore

if TYPE_CHECKING:
    from localllm.store.hub import RepoListing


@dataclass
class HubModel:
    ref: ModelRef  # with the quant that was chosen
    info: ModelInfo  # of that quant
    sizes: dict[str, int]  # every quant in the repository
    choice: QuantChoice | None  # set when the planner picked the quant


def hub_model(text: str, model: ModelRef, hw: Hardware, settings: FitSettings | None = None, *, listing: RepoListing | None = None) -> HubModel:
    """Read what the planner needs for `model` from the hub; pick its quant when `text` names none."""
    from localllm.store import hub

    listing = listing or hub.list_files(model.repo, model.revision)
    sizes = quant_sizes(listing.files) if model.kind == "quant" else {}
    choice = None
    if model.catalog is not None and not quant_given(text) and len(sizes) > 1:
        header_quant = model.quant if model.quant in sizes else min(sizes, key=sizes.__getitem__)
        header = plan_files(replace(model, quant=header_quant), listing.files, listing.commit)
        info = hub_model_info(header)
        choice = choose_quant(info, sizes, model.catalog.default_quant, hw, settings)
        model = replace(model, quant=choice.quant)
        if choice.quant != header_quant:
            info = hub_model_info(plan_files(model, listing.files, listing.commit))
        return HubModel(model, info, sizes, choice)
    info = hub_model_info(plan_files(model, listing.files, listing.commit))
    return HubModel(model, info, sizes, None)


def pull_with_plan(
    ref: str,
    *,
    store: ModelStore | None = None,
    hardware: Hardware | None = None,
    notice: Callable[[str], None] | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """The store's `pull`, with the quant the planner picks for `hardware` (default: this machine)
    when `ref` is a catalog name without one that is not installed yet; `notice` hears which and why.
    """
    store = store or ModelStore()
    model = quant_to_choose(ref, store)
    if model is None:
        return pull(ref, store=store, progress=progress, cancel=cancel)
    if progress is not None:
        progress(PullProgress("resolving", None, 0, 0, None, None))  # planning reads the hub first
    listing = hub_listing(model, store)
    quant = None
    if len(quant_sizes(listing.files)) > 1:  # else nothing to choose from
        from localllm.fit.machine import probe

        chosen = hub_model(ref, model, hardware or probe(), listing=listing)
        quant = chosen.ref.quant
        if chosen.choice is not None and notice is not None:
            notice(f"{model.name}: {chosen.choice.reason}")
    return pull(ref, store=store, quant=quant, listing=listing, progress=progress, cancel=cancel)
