"""The fit planner: how a model runs on a machine, and why (see planner.py).

    plan_fit(info, hardware, Wishes(context=None, parallel=1, backend="auto")) -> Plan

Formulas: llamacpp_memory.py (llama.cpp, per device) and native_memory.py
(the native engine; `predict_native_vram` for GPU checks). machine.py holds
hypothetical hardware (`--vram 12GiB`), quant_choice.py the quant `pull` picks
(hub_model.py: planning a model still on the hub, and `pull_with_plan`),
render.py the `localllm fit` output.
"""

from localllm.fit.machine import HardwareWishes, hypothetical
from localllm.fit.native_memory import NativeMemory, predict_native_vram
from localllm.fit.planner import JSON_KEYS, Plan, Wishes, plan_fit
from localllm.fit.settings import FitSettings

__all__ = [
    "FitSettings",
    "HardwareWishes",
    "JSON_KEYS",
    "NativeMemory",
    "Plan",
    "Wishes",
    "hypothetical",
    "plan_fit",
    "predict_native_vram",
]
