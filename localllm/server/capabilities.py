"""What a model can do, read from the chat template it really uses, and what that means for tools.

Clients such as Open WebUI and oterm ask `/api/show` what a model supports and
adapt: they offer tools, a thinking toggle or image upload only where the
model lists them. So the list must be honest, and it is the same fact the
server acts on when a request brings tools:

* `tools` only when the template renders tool definitions itself
  (tools.template_tool_format). The built-in templates never do.
* `thinking` when the template speaks of `<think>` or takes `enable_thinking`.
* `embedding` for models made to embed; `completion` for every other model.
* `vision` never: our GGUF models take text only.

Tools sent to a model whose template cannot take them (TOOLS POLICY):

* Ollama's /api/chat refuses them as Ollama does, a 400 saying the model
  does not support tools; Ollama's clients know that answer.
* OpenAI's chat, Responses and Anthropic's Messages APIs mark tools optional
  with `tool_choice` "auto" (or no tool_choice): the tools are dropped with a
  line in the server log and the request is answered as a plain chat. Writing
  the tool list into the prompt instead made an Open WebUI chat (36 tools)
  grow from 16 to about 6,400 tokens and answer with the tool list.
* A required call (`tool_choice` "required" or a named function) is kept: the
  grammar forces a well-formed call whatever the template, and the tools are
  described in a system message (ToolPlan.prepare_messages).
"""

from __future__ import annotations

import dataclasses
import logging

from localllm.core.chat_template import builtin_template
from localllm.core.modelinfo import ModelInfo
from localllm.core.reasoning import template_reasons
from localllm.server.errors import APIError
from localllm.server.tools import ToolPlan, template_tool_format

log = logging.getLogger("localllm.server")

# End-of-turn tokens a template may close a reply with; the engines end a reply on them
# (llama.cpp counts them among a vocabulary's end-of-generation tokens).
_TURN_ENDS = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>")


def used_template(info: ModelInfo) -> str:
    """The chat template the model is rendered with: its own, else the built-in for its architecture.

    "" for a model that has none, and for an embedding model, which never renders a chat.
    """
    if info.is_embedding_model:
        return ""
    if info.chat_template and info.chat_template.strip():
        return info.chat_template
    builtin = builtin_template(info.architecture)
    return builtin[1] if builtin else ""


def supports_tools(template: str | None) -> bool:
    """Whether a template renders tool definitions itself (and so was made for tool calls)."""
    return template_tool_format(template)[1]


def capabilities(info: ModelInfo) -> list[str]:
    """Ollama's capability names for a model, in Ollama's order."""
    if info.is_embedding_model:
        return ["embedding"]
    template = used_template(info)
    found = ["completion"]
    if supports_tools(template):
        found.append("tools")
    if template_reasons(template) or info.reasoning:  # the catalog's word: gpt-oss reasons without <think> tags
        found.append("thinking")
    return found


def stop_tokens(info: ModelInfo) -> list[str]:
    """The tokens a reply ends on, as a Modelfile's `PARAMETER stop` lines show them."""
    template = used_template(info)
    stops = [info.eos_token] if info.eos_token else []
    stops += [t for t in _TURN_ENDS if t in template and t not in stops]
    return stops


# -- the tools policy -------------------------------------------------------------------


def refuse_unsupported_tools(plan: ToolPlan | None, model: str) -> ToolPlan | None:
    """Ollama's answer to tools for a model whose template cannot take them: a 400."""
    if plan is not None and not plan.native:
        raise APIError(400, f"{model} does not support tools", param="tools")
    return plan


def drop_optional_tools(plan: ToolPlan | None, model: str) -> ToolPlan | None:
    """OpenAI-style APIs: optional tools the template cannot take are dropped; a required call is kept.

    The plan stays, as `tool_choice: "none"`, so tool calls and results already in the
    history are still written out for the model to read.
    """
    if plan is None or plan.native or plan.choice != "auto":
        return plan
    log.warning(
        "request for '%s': its %d tools were dropped, the model's chat template has no tool support"
        " (tool_choice 'required' or a named function still forces a call)",
        model,
        len(plan.functions),
    )
    return dataclasses.replace(plan, choice="none", forced_name=None)
