"""Which engine runs the loaded model, and why, in the fit planner's own words.

The loaded backend followed a plan (localllm/fit/follow.py); the hardware
screen shows that plan, re-made for the model's context on the app's hardware
facts (for the backend the user named, if it is not the one `auto` picks), so
the words match `localllm fit`, GPU layers included.
"""

from __future__ import annotations

from localllm.backends.base import Backend
from localllm.core.errors import LocalLLMError
from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo


def explain_backend(model: str, backend: Backend, hardware: Hardware | None) -> str:
    name = backend.name
    if name == "remote":
        upstream = getattr(getattr(backend, "options", None), "url", None) or "an upstream server"
        return f"Backend: remote for {model} — decoded by {upstream}, an OpenAI-compatible server"
    info = backend.info
    if not isinstance(info, ModelInfo):
        return f"Backend: {name} for {model}"
    if hardware is None:
        return f"Backend: {name} for {model} (reading the hardware …)"
    from localllm.fit.planner import Wishes, plan_fit
    from localllm.fit.render import verdict
    from localllm.fit.settings import FitSettings

    n_ctx = backend.n_ctx
    settings = FitSettings.from_env()
    try:
        plan = plan_fit(info, hardware, Wishes(context=n_ctx), settings)  # what `auto` picks, with its reasons
        if plan.backend != name:  # the user named another backend: its own plan
            plan = plan_fit(info, hardware, Wishes(context=n_ctx, backend=name), settings)
    except LocalLLMError as exc:
        return f"Backend: {name} for {model} (no plan: {exc})"
    why = "\n".join(f"  · {reason}" for reason in plan.reasons[:2])
    return f"Backend: {name} for {model} — {verdict(plan)}\n{why}"
