"""`localllm fit MODEL`: the plan for an installed model, a file, or one still on the hub.

Exit status: 0 when the model fits, 1 when it does not (the plan and its
reasons are printed either way), 1 with one line for a bad value, 2 for usage.
"""

from __future__ import annotations

import argparse
import sys

from localllm.core.errors import ModelNotInstalled
from localllm.fit.machine import HardwareWishes, hypothetical, probe
from localllm.fit.planner import Plan, Wishes, plan_fit
from localllm.fit.render import text
from localllm.fit.settings import FitSettings
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo


def cmd_fit(args: argparse.Namespace) -> int:
    from localllm.cli.output import EXIT_ERROR, EXIT_OK, print_json

    settings = FitSettings.from_env()
    hw = hypothetical(probe(), HardwareWishes(args.vram, args.ram, args.gpus, args.compute_capability, args.gpu_name))
    name, info, sizes, notes = target(args.model, hw, settings)
    plan = plan_fit(info, hw, Wishes(args.ctx, args.parallel, args.backend), settings, quant_sizes=sizes)
    plan.reasons[:0] = notes
    if args.json:
        print_json(plan.to_dict())
    else:
        print(text(plan, info, name, hw))
    sys.stdout.flush()
    return EXIT_OK if plan.fits else EXIT_ERROR


def target(ref: str, hw: Hardware, settings: FitSettings) -> tuple[str, ModelInfo, dict[str, int] | None, list[str]]:
    """(display name, ModelInfo, other quants' sizes, notes) for MODEL: installed, a path, or on the hub."""
    from localllm.store.bundled import resolve_installing
    from localllm.store.store import ModelStore

    try:
        model = resolve_installing(ModelStore(), ref, allow_paths=True)  # `fit starter` on a fresh home, as `run`
        return model.name, model.info(), None, []
    except ModelNotInstalled:
        pass
    from localllm.fit.hub_model import hub_model
    from localllm.store.refs import parse_ref

    remote = hub_model(ref, parse_ref(ref), hw, settings)
    what = "config and safetensors headers" if remote.info.format == "safetensors" else "GGUF header"
    notes = [f"not downloaded: planned from the hub's listing and the {what} of {remote.ref.name}"]
    name = remote.ref.name
    if remote.choice is not None:
        notes.append(f"pull would fetch {remote.choice.quant}: {remote.choice.reason}")
        name = f"{name} ({remote.ref.quant})"
    return name, remote.info, remote.sizes or None, notes


def installed_plans(hw: Hardware) -> dict[str, Plan]:
    """The plan of every installed model on `hw` (for `localllm info`); models whose facts cannot be read are left out."""
    from localllm.core.errors import LocalLLMError
    from localllm.store.store import ModelStore

    plans = {}
    settings = FitSettings.from_env()
    store = ModelStore()
    for manifest in store.list():
        try:
            info = store.resolve(manifest.name).info()
            plans[manifest.name] = plan_fit(info, hw, Wishes(), settings)
        except (LocalLLMError, OSError, ValueError):
            continue
    return plans
