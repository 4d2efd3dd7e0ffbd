"""Client JSON Schemas made self-contained before they become grammars.

SDKs send schemas the way their generators write them: Pydantic and zod put
nested models under `$defs` and point at them with `$ref`, recursive models
point at themselves, and `pattern` follows JSON Schema's rule that a regular
expression matches anywhere in the string unless it is anchored. The grammar
converter wants none of that: it resolves references against the root of the
schema it is given (so a tool's parameters nested in a call schema lose them)
and only takes `^...$` patterns. `prepare_schema` therefore returns a copy

* with every local `$ref` ("#", "#/$defs/...", "#/definitions/...") replaced by
  what it points at; a reference inside itself is expanded `MAX_REF_DEPTH`
  times, after which the branch that would recurse again is closed (an
  optional property or alternative is dropped, an array gets no items), so a
  tree is at most that deep;
* with each pattern anchored so that it means "contains" where the client did
  not anchor it;
* refusing, by name, each keyword whose constraint the grammar cannot keep
  (`not`, `if`, `patternProperties`, ...): a 400 beats an answer that ignores it.

Annotations (`title`, `description`, `examples`, `default`) pass through. Number
bounds (`minimum`, `maximum`, `multipleOf`) are accepted but not enforced by the
grammar, like `format` values the converter does not know.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from localllm.core.errors import BadRequest

MAX_REF_DEPTH = 5  # times a reference may be expanded inside itself
MAX_NODES = 20_000  # schema objects after expansion: recursion must not blow up the grammar

# Keywords whose constraints the grammar converter would silently drop.
REFUSED_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "$dynamicRef",
    "$recursiveRef",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


class _Closed:
    """A branch cut at the depth limit: no value can go there."""


CLOSED = _Closed()


def prepare_schema(schema: Any, field: str) -> dict[str, Any]:
    """`schema` without references, with anchored patterns; BadRequest names what cannot be kept."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{field} must be a JSON Schema object")
    result = _Expander(schema, field).expand(schema, (), "")
    if result is CLOSED:
        raise BadRequest(f"{field}: its recursive $ref cannot end within {MAX_REF_DEPTH} levels")
    return result


class _Expander:
    def __init__(self, root: dict[str, Any], field: str) -> None:
        self.root = root
        self.field = field
        self.nodes = 0

    def where(self, path: str) -> str:
        return f"{self.field}{path}"

    def expand(self, node: Any, refs: tuple[str, ...], path: str) -> Any:
        if node is True:
            return {}
        if node is False:
            return CLOSED
        if not isinstance(node, dict):
            raise BadRequest(f"{self.where(path)} must be a JSON Schema object or boolean")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise BadRequest(f"{self.field} expands to more than {MAX_NODES} schemas; nest its $refs less")
        if "$ref" in node:
            return self._reference(node, refs, path)
        out: dict[str, Any] = {}
        only_empty = False
        required = node.get("required") if isinstance(node.get("required"), list) else []
        for key, value in node.items():
            at = f"{path}.{key}"
            if key in REFUSED_KEYWORDS or (key == "uniqueItems" and value is True):
                raise BadRequest(f"{self.where(path)}: the JSON Schema keyword '{key}' is not supported")
            if key in ("$defs", "definitions", "$schema", "$id", "$comment"):
                continue
            if key == "properties" and isinstance(value, dict):
                kept = {}
                for name, sub in value.items():
                    expanded = self.expand(sub, refs, f"{at}.{name}")
                    if expanded is CLOSED:
                        if name in required:
                            return CLOSED
                        continue
                    kept[name] = expanded
                out[key] = kept
            elif key == "additionalProperties" and isinstance(value, dict):
                expanded = self.expand(value, refs, at)
                out[key] = False if expanded is CLOSED else expanded
            elif key == "items" and isinstance(value, dict):
                expanded = self.expand(value, refs, at)
                if expanded is CLOSED:
                    if (node.get("minItems") or 0) > 0:
                        return CLOSED
                    only_empty = True
                else:
                    out[key] = expanded
            elif key in _SCHEMA_LISTS or (key == "items" and isinstance(value, list)):
                if not isinstance(value, list):
                    raise BadRequest(f"{self.where(at)} must be a list of schemas")
                parts = [self.expand(sub, refs, f"{at}[{i}]") for i, sub in enumerate(value)]
                if key in ("anyOf", "oneOf"):
                    parts = [p for p in parts if p is not CLOSED]
                    if not parts:
                        return CLOSED
                elif any(p is CLOSED for p in parts):
                    return CLOSED
                out[key] = parts
            elif key == "pattern" and isinstance(value, str):
                limit = node.get("maxLength")
                out[key] = contains_pattern(value, limit if isinstance(limit, int) and not isinstance(limit, bool) else None)
            else:
                out[key] = value
        if only_empty:
            return {"const": []}  # the items would recurse past the limit: an empty array only
        return _merge_single_all_of(out)

    def _reference(self, node: dict[str, Any], refs: tuple[str, ...], path: str) -> Any:
        ref = node["$ref"]
        if not isinstance(ref, str):
            raise BadRequest(f"{self.where(path)}.$ref must be a string")
        target = self._lookup(ref, path)
        if refs.count(ref) >= MAX_REF_DEPTH:
            return CLOSED
        expanded = self.expand(target, (*refs, ref), path)
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        if expanded is CLOSED or not siblings:
            return expanded
        others = self.expand(siblings, refs, path)
        if others is CLOSED:
            return CLOSED
        for key, value in others.items():
            if key in expanded and expanded[key] != value and key not in ("description", "title", "default", "examples"):
                raise BadRequest(f"{self.where(path)}: '{key}' next to $ref differs from the referenced schema's")
        return {**others, **expanded}

    def _lookup(self, ref: str, path: str) -> Any:
        if not ref.startswith("#"):
            raise BadRequest(f"{self.where(path)}: $ref '{ref[:100]}' is not a local reference (#/$defs/...)")
        target: Any = self.root
        pointer = ref[1:]
        if pointer and not pointer.startswith("/"):
            raise BadRequest(f"{self.where(path)}: $ref '{ref[:100]}' is not a JSON pointer")
        for part in pointer.split("/")[1:] if pointer else []:
            key = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise BadRequest(f"{self.where(path)}: $ref '{ref[:100]}' points at nothing in the schema")
        return target


def _merge_single_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    """`{"allOf": [X], "description": ...}` (how Pydantic once wrapped a described $ref) as X itself."""
    parts = schema.get("allOf")
    if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict):
        return schema
    rest = {k: v for k, v in schema.items() if k != "allOf"}
    return {**rest, **parts[0]}


# -- patterns -------------------------------------------------------------------------


# Characters a JSON string holds unescaped (`.` would allow a bare `"`, ending the string).
_TEXT_CHAR = '[^"\\\\\\x00-\\x1F]'
# Text allowed around an unanchored pattern when the schema sets no maxLength: bounded, because a
# small model will otherwise fill an unbounded "anything" with repetition and never reach the pattern.
PATTERN_PADDING = 64


def contains_pattern(pattern: str, max_length: int | None = None) -> str:
    """`pattern` as the converter needs it (`^...$`), keeping JSON Schema's meaning.

    An unanchored alternative may match anywhere, so it gets "any text" on its
    open side(s), alternative by alternative: `[0-9]{3}` becomes
    `^<any>([0-9]{3})<any>$`. The text around it is bounded: together with
    what the pattern matches it stays within `max_length` (when the pattern's
    own length is bounded), or PATTERN_PADDING characters a side.
    """
    pattern = _spell_out_classes(pattern)
    alternatives = _top_level_alternatives(pattern)
    if len(alternatives) == 1 and pattern.startswith("^") and _ends_with_anchor(pattern):
        return pattern
    anchored = []
    for alt in alternatives:
        starts = alt.startswith("^")
        core = alt[1:] if starts else alt
        ends = _ends_with_anchor(core)
        if ends:
            core = core[:-1]
        room = PATTERN_PADDING if max_length is None else max(0, max_length - _longest_match(core))
        before = 0 if starts else (room if ends else room // 2)
        after = 0 if ends else room - before
        group = f"({core})" if core else ""
        anchored.append(_padding(before, starts) + group + _padding(after, ends))
    return "^" + ("(" + "|".join(anchored) + ")" if len(anchored) > 1 else anchored[0]) + "$"


def _padding(limit: int, anchored: bool) -> str:
    if anchored or limit == 0:
        return ""
    return f"{_TEXT_CHAR}{{0,{limit}}}"


def _longest_match(core: str) -> int:
    """The longest string `core` matches, so the text around it keeps within maxLength (0 if unbounded or unknown)."""
    try:
        low, high = re._parser.parse(core).getwidth()  # type: ignore[attr-defined]
    except Exception:
        return 0
    return high if high < 1 << 16 else low


_CLASSES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " \\t\\n\\r"}


def _spell_out_classes(pattern: str) -> str:
    """`\\d`, `\\w`, `\\s` (and `\\D`, `\\W`, `\\S` outside brackets) as bracket classes; the converter lacks them."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            letter = pattern[i + 1]
            ranges = _CLASSES.get(letter.lower())
            if ranges is not None and (letter.islower() or not in_class):
                if in_class:
                    out.append(ranges)
                else:
                    out.append(f"[{'' if letter.islower() else '^'}{ranges}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        out.append(c)
        i += 1
    return "".join(out)


def _ends_with_anchor(text: str) -> bool:
    """Whether `text` ends with an unescaped `$`."""
    if not text.endswith("$"):
        return False
    backslashes = len(text[:-1]) - len(text[:-1].rstrip("\\"))
    return backslashes % 2 == 0


def _top_level_alternatives(pattern: str) -> list[str]:
    """`pattern` split at each `|` outside groups and character classes."""
    parts, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts
