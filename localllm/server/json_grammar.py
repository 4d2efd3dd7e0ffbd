"""JSON Schemas to llama.cpp grammars (GBNF), for `response_format`, Ollama's `format` and tool calls.

The conversion itself is llama-cpp-python's `json_schema_to_gbnf` (pure Python;
nothing here touches an engine). What this module adds:

* self-contained schemas: `$ref`s expanded and patterns anchored
  (json_schema_prep), so references still resolve once a schema is nested;
* limits, because a schema comes from a client: its size, nesting, and the
  repetition counts (`maxItems`, `{n}` in patterns) that the converter expands
  into grammar text, so `{"minItems": 10**9}` is a 400, not an exhausted server;
* every converter failure becomes one BadRequest line that names the field;
* composition: a JSON grammar renamed and wrapped in literal text, which is how
  a tool call's `<tool_call>{...}</tool_call>` is forced.

The converter's whitespace rule is `" "?`, so a small model cannot stall in
endless newlines inside the object and the JSON can always be closed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from localllm.core.errors import BadRequest
from localllm.server.json_schema_prep import prepare_schema

MAX_SCHEMA_CHARS = 64 * 1024
MAX_DEPTH = 32
MAX_REPEAT = 1000  # largest minItems/maxItems/minLength/... and {n} in a pattern
_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_BRACES = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# The converter's string character admits raw control characters (a newline inside a string),
# which JSON forbids; they are allowed only escaped, as in llama.cpp's own converter.
_JSON_CHAR = re.compile(r'^char ::= \[\^"\\\\\] \|', flags=re.MULTILINE)
_JSON_CHAR_STRICT = r'char ::= [^"\\\x7F\x00-\x1F] |'



def checked_schema(schema: Any, field: str) -> dict[str, Any]:
    """`schema` within the limits, self-contained and with anchored patterns (json_schema_prep)."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{field} must be a JSON Schema object")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise BadRequest(f"{field} is larger than {MAX_SCHEMA_CHARS} characters")
    _check_limits(schema, field, 0)
    return prepare_schema(schema, field)


def schema_grammar(schema: Any, field: str) -> str:
    """A grammar whose `root` accepts exactly the JSON that `schema` describes."""
    return prepared_schema_grammar(checked_schema(schema, field), field)


def prepared_schema_grammar(schema: dict[str, Any], field: str) -> str:
    """The grammar of a schema `checked_schema` returned (or one built from such schemas)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise BadRequest(f"{field} is nested too deeply") from None
    except Exception as exc:  # the converter asserts and raises on what it does not support
        detail = re.sub(r"\s+", " ", str(exc)).strip()[:200] or type(exc).__name__
        raise BadRequest(f"{field} cannot be turned into a grammar: {detail}") from None
    if not re.search(r"^root ::= \S", grammar, flags=re.MULTILINE):
        raise BadRequest(f"{field} allows no JSON value at all")
    return _JSON_CHAR.sub(lambda _: _JSON_CHAR_STRICT, grammar)


def json_object_grammar() -> str:
    """Any JSON object: OpenAI's `json_object` mode and Ollama's `format: "json"`."""
    return schema_grammar(ANY_OBJECT, "response_format")


def _check_limits(node: Any, field: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BadRequest(f"{field} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, dict):
        for key in _REPEAT_KEYS:
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT):
                raise BadRequest(f"{field}: {key} must be an integer from 0 to {MAX_REPEAT}")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for low, high in _BRACES.findall(pattern):
                if int(low) > MAX_REPEAT or (high and int(high) > MAX_REPEAT):
                    raise BadRequest(f"{field}: repetitions in a pattern are limited to {MAX_REPEAT}")
        for value in node.values():
            _check_limits(value, field, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_limits(value, field, depth + 1)


# -- composition ----------------------------------------------------------------

# A rule name, a quoted literal, or a character class: literals and classes are kept verbatim.
_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|(?<![\w-])root(?![\w-])')


def rename_root(grammar: str, new_name: str) -> str:
    """The same grammar with its `root` rule called `new_name` (literals untouched)."""
    return _TOKENS.sub(lambda m: new_name if m.group(0) == "root" else m.group(0), grammar)


def literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'
