"""Tool calling: offering tools to a model and reading its calls back.

Models write tool calls as text in the format their chat template taught them:

* Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
* Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`
* Llama 3.1: a bare `{"name": ..., "parameters": {...}}`

A template that renders `tools` itself is *native*: it gets the tool list and
the history as they are (arguments as objects, as Hugging Face templates
expect). A template that does not (the built-in ones, base models) gets the
tools described in a system message that asks for the Hermes format, and the
history's calls and results written out in that format; when such a model
gets tools at all is capabilities.py's policy.

When a call is required (`tool_choice: "required"` or a named function) a
grammar forces exactly one well-formed call to a known function with
arguments that match its schema, so even a base model answers with a call. In
`auto` mode a *lazy* grammar does the same from the moment the model opens a
call on its own, and stays out of the way otherwise.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from localllm.core.errors import BadRequest
from localllm.server.json_grammar import checked_schema, literal, prepared_schema_grammar, rename_root


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # text that opens a call ("" for bare JSON)
    end: str  # text that closes one
    args_key: str  # "arguments" or "parameters"


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments")
LLAMA3 = ToolFormat("llama3", "", "", "parameters")


def template_tool_format(template: str | None) -> tuple[ToolFormat, bool]:
    """The call format a chat template uses, and whether it renders tools itself (native)."""
    if not template or not re.search(r"\btools\b", template):
        return HERMES, False
    if "[TOOL_CALLS]" in template:
        return MISTRAL, True
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return LLAMA3, True
    return HERMES, True


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))
    # A call cut by max_tokens: its arguments as far as the model wrote them (OpenAI reports
    # such a call with a `length` finish; Ollama's arguments must be an object, so it gets none).
    partial_arguments: str | None = None

    @property
    def complete(self) -> bool:
        return self.partial_arguments is None

    def openai(self, index: int | None = None) -> dict[str, Any]:
        arguments = json.dumps(self.arguments, ensure_ascii=False) if self.complete else self.partial_arguments
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }
        if index is not None:
            call = {"index": index, **call}
        return call

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    """How one request offers tools and reads calls back."""

    functions: list[dict[str, Any]]  # {"name", "description"?, "parameters"?}
    choice: str  # "none" | "auto" | "required" | "named"
    forced_name: str | None
    parallel: bool
    format: ToolFormat
    native: bool
    # each function's parameters made self-contained (json_schema_prep), for the call grammar
    argument_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    # -- the prompt ----------------------------------------------------------------
    def template_tools(self) -> list[dict[str, Any]] | None:
        """What a native template receives as `tools` (OpenAI's shape, as HF templates expect)."""
        if not self.native:
            return None
        return [{"type": "function", "function": f} for f in self.functions]

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The history as the template should see it: calls and results in the model's format."""
        out = [self._prepare(m) for m in messages]
        if self.native or self.choice == "none":
            return out
        instructions = self._instructions()
        if out and out[0].get("role") == "system":
            first = dict(out[0])
            first["content"] = f"{_text(first.get('content'))}\n\n{instructions}".strip()
            return [first, *out[1:]]
        return [{"role": "system", "content": instructions}, *out]

    def _prepare(self, message: dict[str, Any]) -> dict[str, Any]:
        message = dict(message)
        calls = message.get("tool_calls") or []
        if message.get("role") == "assistant" and calls:
            parsed = [_history_call(c) for c in calls]
            if self.native:
                message["tool_calls"] = [
                    {"id": c.get("id"), "type": "function", "function": {"name": name, "arguments": args}}
                    for c, (name, args) in zip(calls, parsed)
                ]
            else:
                written = "\n".join(
                    f"{HERMES.start}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{HERMES.end}"
                    for n, a in parsed
                )
                message["content"] = f"{_text(message.get('content'))}\n{written}".strip()
                message.pop("tool_calls")
        elif message.get("role") == "tool" and not self.native:
            message["content"] = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
        return message

    def _instructions(self) -> str:
        listed = "\n".join(json.dumps(f, ensure_ascii=False) for f in self.functions)
        return (
            "You can call these functions (JSON Schema of each function's arguments):\n"
            f"{listed}\n\n"
            "To call a function, reply with nothing but:\n"
            f'{HERMES.start}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{HERMES.end}'
        )

    # -- forcing calls -------------------------------------------------------------
    def grammar(self) -> tuple[str | None, list[str]]:
        """(GBNF, lazy triggers): forced calls get a strict grammar, `auto` a lazy one."""
        if self.choice == "none" or (self.choice == "auto" and not self.format.start):
            return None, []
        functions = self.functions
        if self.forced_name is not None:
            functions = [f for f in functions if f["name"] == self.forced_name]
        schemas = [self._call_schema(f) for f in functions]
        call_schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        body = rename_root(prepared_schema_grammar(call_schema, "tools"), "tool-call-json")
        fmt = self.format
        if fmt is MISTRAL:
            call = f'{literal(fmt.start)} "[" tool-call-json ("," " "? tool-call-json)* "]"'
            one = f'{literal(fmt.start)} "[" tool-call-json "]"'
        else:
            call = f'{literal(fmt.start)} "\\n"? tool-call-json "\\n"? {literal(fmt.end)}' if fmt.start else "tool-call-json"
            one = call
        if self.forced:
            root = f"root ::= {one}"
        elif self.parallel:
            root = f'root ::= tool-call ("\\n"? tool-call)*\ntool-call ::= {call}'
        else:
            root = f"root ::= {one}"
        triggers = [] if self.forced else [r"[\s\S]*?(" + re.escape(fmt.start) + r")[\s\S]*"]
        return f"{root}\n{body}", triggers

    def _call_schema(self, function: dict[str, Any]) -> dict[str, Any]:
        params = self.argument_schemas.get(function["name"]) or {"type": "object"}
        return {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, self.format.args_key: params},
            "required": ["name", self.format.args_key],
            "additionalProperties": False,
        }

    # -- reading calls back ----------------------------------------------------------
    def parse(self, text: str, *, cut: bool = False) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) from a finished answer; text that is not a valid call stays content.

        `cut`: max_tokens ended the answer, so a call still open is reported
        as far as it got instead of being left as markup in the content.
        """
        if not self.parses_calls:
            return text, []
        content, calls = _parse_calls(text, self.names, cut)
        return (content if content and content.strip() else None), calls

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self)


class ToolCallStream:
    """Streams an answer's plain text at once and holds back what may be a tool call."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held = ""  # text that may still turn out to open a call
        self._captured: str | None = "" if plan.forced else None  # text from the opening of a call on
        self._plain = not plan.parses_calls

    def feed(self, text: str) -> str:
        """Text that can go to the client now as content."""
        if self._plain:
            return text
        if self._captured is not None:
            self._captured += text
            return ""
        self._held += text
        start = self.plan.format.start
        if not start:  # bare JSON: decided by the first visible character
            stripped = self._held.lstrip()
            if not stripped:
                return ""
            if stripped[0] in "{[":
                self._captured, self._held = self._held, ""
                return ""
            self._plain = True
            out, self._held = self._held, ""
            return out
        at = self._held.find(start)
        if at >= 0:
            out, self._captured, self._held = self._held[:at], self._held[at:], ""
            return out
        keep = _partial_suffix(self._held, start)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    def finish(self, *, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """At the end: (remaining content, calls); `cut` as in ToolPlan.parse."""
        rest = self._held + (self._captured or "")
        self._held, self._captured = "", None
        if not rest:
            return "", []
        if self._plain:
            return rest, []
        content, calls = _parse_calls(rest, self.plan.names, cut)
        return content, calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def _parse_calls(text: str, names: set[str], cut: bool = False) -> tuple[str, list[ToolCall]]:
    """Calls in any of the three formats; everything else is returned as content.

    A call still open at the end of a `cut` answer becomes a partial call
    (or nothing, if not even its name was written), never content.
    """
    if cut:
        text = _without_partial_marker(_without_partial_marker(text, HERMES.start), MISTRAL.start)
    if "<tool_call>" in text:
        calls: list[ToolCall] = []
        kept: list[str] = []
        last = 0
        for m in _HERMES_BLOCK.finditer(text):
            body = m.group(1)
            open_ended = not m.group(0).endswith(HERMES.end)
            if open_ended:  # the answer ended inside the call, perhaps inside its closing tag
                body = _without_partial_marker(body, HERMES.end).rstrip()
            found = _calls_from_json(body, names)
            if found is None and cut and open_ended:
                found = _cut_calls(body, names)
            if found is None:
                continue
            kept.append(text[last : m.start()])
            calls.extend(found)
            last = m.end()
        if calls or last:
            kept.append(text[last:])
            return "".join(kept).strip(), calls
    stripped = text.strip()
    for prefix in ("[TOOL_CALLS]", "<|python_tag|>", ""):
        if prefix and not stripped.startswith(prefix):
            continue
        rest = stripped[len(prefix) :]
        if not prefix and rest[:1] not in ("{", "["):
            break
        found = _calls_from_json(rest, names)
        if found is None and cut:
            found = _cut_calls(rest, names) if (prefix or _NAME.search(rest)) else None
        if found is not None:
            return "", found
        if prefix:
            break
    return text, []


def _without_partial_marker(text: str, marker: str) -> str:
    """`text` less an end that begins `marker` (an answer cut inside `</tool_call>`)."""
    keep = _partial_suffix(text, marker)
    return text[: len(text) - keep] if keep else text


def _cut_calls(text: str, names: set[str]) -> list[ToolCall]:
    """The calls in `text`, which max_tokens cut: whole ones, then the last one as far as it got."""
    decoder = json.JSONDecoder()
    text = text.strip()
    pos = 1 if text.startswith("[") else 0
    calls: list[ToolCall] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return calls
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            fragment = text[pos:]
            name = _NAME.search(fragment)
            if name is not None and name.group(1) in names:
                args = _ARGUMENTS.search(fragment, name.end()) or _ARGUMENTS.search(fragment)
                partial = fragment[args.end() :].rstrip() if args else ""
                calls.append(ToolCall(name.group(1), {}, partial_arguments=partial))
            return calls
        found = _calls_from_json(json.dumps(item), names)
        if found is None:
            return calls
        calls.extend(found)


def _calls_from_json(text: str, names: set[str]) -> list[ToolCall] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(item["name"], args))
    return calls or None


def _history_call(call: Any) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of a call in the history; arguments arrive as a JSON string (OpenAI) or object (Ollama)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest("each tool call in the history needs function.name")
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise BadRequest(f"the arguments of tool call '{function['name']}' are not valid JSON") from None
    if not isinstance(args, dict):
        raise BadRequest(f"the arguments of tool call '{function['name']}' must be a JSON object")
    return function["name"], args


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    *,
    parallel: bool,
    template: str | None,
) -> ToolPlan | None:
    """Check the request's tools and choice; None when the request offers no tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools")
        return None
    functions = []
    argument_schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"tools[{i}]: only tools of type 'function' are supported")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"tools[{i}].function.name is required")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", function["name"]):
            raise BadRequest(f"tools[{i}].function.name must be 1-128 letters, digits, '_', '.', ':' or '-'")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON Schema object")
        entry = {"name": function["name"]}
        if function.get("description"):
            entry["description"] = str(function["description"])
        entry["parameters"] = params or {"type": "object", "properties": {}}
        functions.append(entry)
        argument_schemas[entry["name"]] = checked_schema(entry["parameters"], f"tools[{i}].function.parameters")
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise BadRequest("tools: function names must be unique")
    choice, forced_name = _choice(tool_choice, set(names))
    fmt, native = template_tool_format(template)
    plan = ToolPlan(functions, choice, forced_name, parallel, fmt, native, argument_schemas)
    plan.grammar()  # schemas that cannot become grammars are a 400 now, not a failure later
    return plan


def _choice(tool_choice: Any, names: set[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names function '{name}', which is not among the tools")
        return "named", name
    raise BadRequest("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
