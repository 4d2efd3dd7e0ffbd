"""Turn a chat (a list of messages) into the prompt text a model was trained on.

Models ship their format as a Hugging Face style Jinja template in the GGUF
metadata key ``tokenizer.chat_template``. That template comes from whoever
made the file, so it is untrusted code: it is rendered in jinja2's immutable
sandbox, and every failure, including an attempt to leave the sandbox,
becomes a one-line :class:`TemplateError` that names the model.

Models without a template fall back to a built-in one chosen by architecture.
The built-ins are Jinja too and go through the same sandbox, so there is one
rendering path. They are deliberately small:

* content may be a string, ``None`` or a list of parts; only the text of
  ``{"type": "text"}`` parts is used (joined without a separator);
* ``role: "tool"`` results render as a user turn (Gemma, Mistral), as an
  ``ipython`` turn (Llama 3) or as a ``tool`` turn (ChatML);
* tool *definitions* (``tools=``) and assistant ``tool_calls`` are not
  rendered by the built-ins; models that do tool calling ship a template.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import Template, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localllm.core import template_budget
from localllm.core.errors import BadRequest, NoChatTemplate, TemplateError

ROLES = ("system", "user", "assistant", "tool")
_MAX_REASON = 300  # characters of a failure's reason kept in its one-line message

BUILTIN_FAMILIES: dict[str, str] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    # GGUF files of Llama 2 and Mistral-family models also say "llama"; their
    # own files normally carry a template, so the default is the newest format.
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "qwen2moe": "chatml",
    "qwen3moe": "chatml",
    "mistral": "mistral",
    "mistral3": "mistral",
}

# Shared by the built-ins: the plain text of a message's content.
_TEXT_OF = r"""
{%- macro text_of(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is iterable and content is not mapping -%}
    {%- for part in content if part is mapping and part['type'] == 'text' -%}
      {{- part['text'] -}}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
"""

# Gemma has no system or tool role: system text goes in front of the next user
# turn (or becomes a user turn of its own if none follows); tool results are
# user turns. Content is trimmed as in Google's own template.
_GEMMA = _TEXT_OF + r"""
{{- bos_token -}}
{%- set ns = namespace(prefix='') -%}
{%- for message in messages -%}
  {%- set content = text_of(message['content']) | trim -%}
  {%- if message['role'] == 'system' -%}
    {%- set ns.prefix = ns.prefix + content + '\n\n' -%}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<start_of_turn>model\n' + content + '<end_of_turn>\n' -}}
  {%- else -%}
    {{- '<start_of_turn>user\n' + ns.prefix + content + '<end_of_turn>\n' -}}
    {%- set ns.prefix = '' -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.prefix -%}
  {{- '<start_of_turn>user\n' + ns.prefix | trim + '<end_of_turn>\n' -}}
{%- endif -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

# Llama 3: every role gets a header; tool results use Llama 3.1's "ipython".
_LLAMA3 = _TEXT_OF + r"""
{{- bos_token -}}
{%- for message in messages -%}
  {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
  {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}
  {{- text_of(message['content']) | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# ChatML: every role, "tool" included, is a turn of its own; no BOS.
_CHATML = _TEXT_OF + r"""
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\n' -}}
  {{- text_of(message['content']) + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Mistral [INST]: one BOS at the start, as in Mistral's own template. System
# text is folded into the next user turn like Gemma; tool results are user
# turns. The prompt already ends in "[/INST]", so there is no generation prompt.
_MISTRAL = _TEXT_OF + r"""
{{- bos_token -}}
{%- set ns = namespace(prefix='') -%}
{%- for message in messages -%}
  {%- set content = text_of(message['content']) -%}
  {%- if message['role'] == 'system' -%}
    {%- set ns.prefix = ns.prefix + content + '\n\n' -%}
  {%- elif message['role'] == 'assistant' -%}
    {{- content + eos_token -}}
  {%- else -%}
    {{- '[INST] ' + ns.prefix + content + ' [/INST]' -}}
    {%- set ns.prefix = '' -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.prefix -%}
  {{- '[INST] ' + ns.prefix | trim + ' [/INST]' -}}
{%- endif -%}
"""

_BUILTIN_TEXT: dict[str, str] = {
    "gemma": _GEMMA,
    "llama3": _LLAMA3,
    "chatml": _CHATML,
    "mistral": _MISTRAL,
}


def builtin_template(architecture: str) -> tuple[str, str] | None:
    """The (family, template text) used for an architecture, or None."""
    family = BUILTIN_FAMILIES.get(architecture.lower())
    return None if family is None else (family, _BUILTIN_TEXT[family])


def template_source(model_template: str | None, architecture: str) -> str | None:
    """Where a model's template would come from: "model", "builtin:<family>" or None."""
    if model_template and model_template.strip():
        return "model"
    builtin = builtin_template(architecture)
    return None if builtin is None else f"builtin:{builtin[0]}"


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template plus what it needs to render: tokens and a name for errors."""

    source: str  # "model" or "builtin:<family>"
    text: str
    model_name: str
    bos_token: str = ""
    eos_token: str = ""

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt for `messages`; any failure is a TemplateError naming the model."""
        validate_messages(messages)
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,  # like HF's template kwargs, may override the tokens
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools or None,
        }
        try:
            template = _compile(self.text)
            with template_budget.rendering() as budget:
                return template_budget.collect_output(template.generate(context), budget)
        except Exception as error:  # the template is untrusted: contain everything
            raise _describe(error, self.model_name) from None


def resolve_template(
    model_template: str | None,
    architecture: str,
    *,
    model_name: str,
    bos_token: str | None,
    eos_token: str | None,
) -> ChatTemplate:
    """The model's own template, else the architecture's built-in one."""
    source = template_source(model_template, architecture)
    if source is None:
        raise NoChatTemplate(model_name, architecture)
    if source == "model":
        text = model_template or ""
    else:
        text = _BUILTIN_TEXT[source.removeprefix("builtin:")]
    return ChatTemplate(
        source=source,
        text=text,
        model_name=model_name,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )


def validate_messages(messages: Any) -> None:
    """Reject malformed chats as BadRequest before a template sees them."""
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{i}] must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"messages[{i}].role must be a string")
        if role not in ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string, a list or null")
        if isinstance(content, list) and not all(isinstance(p, Mapping) for p in content):
            raise BadRequest(f"messages[{i}].content parts must be objects")


# --- the sandbox -------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every step charged to the render's budget.

    Reaching for an unsafe attribute fails at once: jinja2 would hand back an
    undefined value that prints as "", which hides the attempt; failing makes
    hostile templates visible to the user. Calls, lookups, the operators that
    can build big values, loops and ``~`` (see template_budget's tree
    rewrite) all check the budget first.
    """

    intercepted_binops = template_budget.INTERCEPTED_BINOPS
    metered_iter = staticmethod(template_budget.metered_iter)
    checked_concat = staticmethod(template_budget.checked_concat)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return template_budget.checked_binop(operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        template_budget.current().tick()
        args = template_budget.check_method_call(obj, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        template_budget.current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        template_budget.current().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Any:
        """str.format and format_map, refused when their result would be over budget."""
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        text = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = template_budget.current()
            budget.tick()
            template_budget.check_brace_format(budget, text, (args, kwargs) if not is_map else args)
            return formatter(*args, **kwargs)

        return checked


class _Generation(Extension):
    """Accept HF's ``{% generation %}`` marker (for training masks); render its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: Any) -> NoReturn:
    """Templates call this to reject a chat, e.g. roles that do not alternate."""
    if not isinstance(message, str):
        template_budget.current().spend(template_budget.text_size(message))
    raise TemplateError(str(message)[:_MAX_REASON])


def _strftime_now(fmt: str) -> str:
    """HF helper: templates put today's date into system prompts."""
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's tojson: plain JSON, unlike jinja2's HTML-escaping default."""
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _make_environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[loopcontrols, _Generation],
        finalize=template_budget.checked_output,
    )
    env.filters["tojson"] = _tojson
    env.filters = {
        name: template_budget.budgeted_filter(name, f) for name, f in env.filters.items()
    }
    env.tests = {name: template_budget.budgeted_test(t) for name, t in env.tests.items()}
    del env.globals["lipsum"]  # lipsum(n=10**6) writes a million paragraphs; no chat needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@functools.lru_cache(maxsize=32)
def _compile(text: str) -> Template:
    """Parse a template once; the same text is rendered for every request.

    The parsed tree is rewritten so its loops and ``~`` are metered.
    """
    tree = template_budget.MeterLoopsAndConcats().visit(_ENV.parse(text))
    return _ENV.from_string(tree)


def _describe(error: Exception, model_name: str) -> TemplateError:
    """One line that says which model's template failed and why."""
    if isinstance(error, template_budget.OverBudget):
        what = "is over its budget"
        why = str(error)
    elif isinstance(error, SecurityError):
        what = "tried to leave the sandbox"
        why = str(error)
    elif isinstance(error, TemplateSyntaxError):
        what = "failed"
        why = f"syntax error on line {error.lineno}: {error.message or error}"
    elif isinstance(error, TemplateError):  # raise_exception() from the template
        what = "failed"
        why = str(error)
    else:
        what = "failed"
        why = f"{type(error).__name__}: {error}"
    why = re.sub(r"\s+", " ", why[: _MAX_REASON * 2]).strip()
    if len(why) > _MAX_REASON:
        why = why[: _MAX_REASON - 3] + "..."
    return TemplateError(f"chat template of '{model_name}' {what}: {why}")
