"""Resource limits for rendering untrusted chat templates.

jinja2's sandbox stops a template from reaching Python internals, but not
from spending time or memory: ``{{ (9**20000000) % 10 }}`` computes for
20 s and ``'x' * 300000000`` allocates gigabytes, each as one C-level step
that nothing can interrupt. So every render runs under a :class:`Budget`:

* a deadline (``TIME_LIMIT_S``), checked wherever Python code of the sandbox
  runs: each call, attribute or item lookup, operator, filter, test, loop
  step and output chunk;
* a cap on the size of any one value (``MAX_CHARS`` characters or bytes,
  ``MAX_ITEMS`` list items, ``MAX_INT_BITS`` bits), checked *before* an
  operation that could build a bigger one (``*``, ``**``, ``+``, ``~``,
  ``%`` and ``str.format``, padding, ``replace``, ``join``, ``tojson``...),
  since afterwards the memory is already gone;
* an allowance of work (``MAX_WORK``): the characters every such operation
  and every ``{{ ... }}`` builds, plus a fixed cost per loop step, so that
  many values that are each under the cap (a ``map`` over a big list, output
  buffered by a macro) still end;
* the rendered text itself is at most ``MAX_CHARS`` characters.

Anything over budget raises :class:`OverBudget`; the budget then stays
tripped, so a check that something swallows still ends the render at the
next one.
"""

from __future__ import annotations

import functools
import math
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

from jinja2 import nodes
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

TIME_LIMIT_S = 2.0
# Twice what a million-token context holds at ~4 characters per token.
MAX_CHARS = 8_000_000
MAX_ITEMS = 1_000_000  # list items: sorting a million is well under a second
MAX_INT_BITS = 100_000
MAX_WORK = 8 * MAX_CHARS
LOOP_STEP_COST = 8  # a loop step counts as this many characters of work
MAX_JSON_INDENT = 32
MAX_ROUND_DIGITS = 64  # round(5, -10**7) computes 10**(10**7)
CLOCK_EVERY = 16  # budget checks per reading of the clock


class OverBudget(Exception):
    """A template that would run too long or build too much."""


@dataclass
class Budget:
    """What one render may still spend."""

    deadline: float
    work_left: int = MAX_WORK
    tripped: str | None = None
    checks: int = 0

    def fail(self, why: str) -> NoReturn:
        if self.tripped is None:
            self.tripped = why
        raise OverBudget(self.tripped)

    def tick(self) -> None:
        """Fail once the render is over time (or already failed).

        The clock is read every CLOCK_EVERY checks: each step between two is
        bounded by the size caps, so the render still ends within a few ms of
        the deadline.
        """
        if self.tripped is not None:
            raise OverBudget(self.tripped)
        self.checks += 1
        if self.checks % CLOCK_EVERY == 0 and time.monotonic() > self.deadline:
            self.fail(f"it ran longer than {TIME_LIMIT_S:g} s")

    def spend(self, size: int, unit: str = "characters") -> None:
        """Account for a value of `size` before it is built."""
        self.tick()
        limit = MAX_ITEMS if unit == "items" else MAX_CHARS
        if size > limit:
            self.fail(f"it would build a value of {size:,} {unit} (limit {limit:,})")
        self.work_left -= size
        if self.work_left < 0:
            self.fail(f"it built more than {MAX_WORK:,} characters in all")


_CURRENT: ContextVar[Budget | None] = ContextVar("template_budget", default=None)


def current() -> Budget:
    """The running render's budget; outside one (constant folding at compile time) only the size caps apply."""
    budget = _CURRENT.get()
    return budget if budget is not None else Budget(deadline=math.inf)


@contextmanager
def rendering(time_limit_s: float = TIME_LIMIT_S) -> Iterator[Budget]:
    """Run the body (one render) under a fresh budget."""
    budget = Budget(deadline=time.monotonic() + time_limit_s)
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def collect_output(chunks: Iterable[str], budget: Budget) -> str:
    """Join a render's output chunks, refusing more than MAX_CHARS in all."""
    out: list[str] = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_CHARS:
            budget.fail(f"its output is longer than {MAX_CHARS:,} characters")
        budget.tick()
        out.append(chunk)
    if time.monotonic() > budget.deadline:
        budget.fail(f"it ran longer than {TIME_LIMIT_S:g} s")
    return "".join(out)


# --- sizes -----------------------------------------------------------------------


def text_size(value: Any, limit: int = MAX_CHARS, indent: int = 0) -> int:
    """Roughly len(str(value)) (or of its JSON), without building it; stops counting past `limit`.

    A list may hold the same big string a million times, so the walk is by
    reference, counting each occurrence; it stops as soon as the count is
    over the limit, which bounds its own cost. Escapes can make the real
    text longer by a small factor; the real output is counted again anyway.
    """
    budget = current()
    total = 0
    steps = 0
    pending: list[tuple[Iterator[Any], int]] = [(iter((value,)), 0)]
    while pending:
        items, depth = pending[-1]
        item = next(items, _END)
        if item is _END:
            pending.pop()
            continue
        steps += 1
        if steps % 4096 == 0:
            budget.tick()
        if indent:
            total += indent * depth + 1
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 30103 // 100000 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            pending.append((_flat_pairs(item), depth + 1))
        elif isinstance(item, Namespace):
            attrs = object.__getattribute__(item, "_Namespace__attrs")
            total += 13 + 4 * len(attrs)
            pending.append((_flat_pairs(attrs), depth + 1))
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            pending.append((iter(item), depth + 1))
        else:
            total += 64  # jinja's own small objects: loops, macros, cyclers
        if total > limit:
            return total
    return total


_END = object()


def _flat_pairs(mapping: Mapping) -> Iterator[Any]:
    for key, value in mapping.items():
        yield key
        yield value


def _length(value: Any) -> int | None:
    try:
        return len(value)
    except Exception:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int)  # bool included: Python repeats by True too


def _sequence_unit(value: Any) -> str | None:
    if isinstance(value, (str, bytes)):
        return "characters"
    if isinstance(value, (list, tuple)):
        return "items"
    return None


# --- operators -------------------------------------------------------------------

_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "*": lambda a, b: a * b,
    "**": lambda a, b: a**b,
    "%": lambda a, b: a % b,
}
INTERCEPTED_BINOPS = frozenset(_BINOPS)


def checked_binop(operator: str, left: Any, right: Any) -> Any:
    """`left <operator> right`, refused when the result would be over budget."""
    budget = current()
    if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept quick
        budget.spend(len(left) + len(right))
        return left + right
    budget.tick()
    if operator == "*":
        _check_multiply(budget, left, right)
    elif operator == "**":
        _check_power(budget, left, right)
    elif operator == "+":
        unit = _sequence_unit(left)
        if unit is not None and _sequence_unit(right) == unit:
            budget.spend(len(left) + len(right), unit)
    elif operator == "%" and isinstance(left, (str, bytes)):
        _check_percent_format(budget, left, right)
    return _BINOPS[operator](left, right)


def _check_multiply(budget: Budget, left: Any, right: Any) -> None:
    for seq, times in ((left, right), (right, left)):
        unit = _sequence_unit(seq)
        if unit is not None and _is_int(times):
            budget.spend(len(seq) * max(int(times), 0), unit)
            return
    if _is_int(left) and _is_int(right):
        bits = int(left).bit_length() + int(right).bit_length()
        if bits > MAX_INT_BITS:
            budget.fail(f"it would build a number of {bits:,} bits (limit {MAX_INT_BITS:,})")


def _check_power(budget: Budget, base: Any, exponent: Any) -> None:
    if _is_int(base) and _is_int(exponent) and exponent > 0 and abs(base) > 1:
        bits = int(exponent) * int(base).bit_length()
        if bits > MAX_INT_BITS:
            budget.fail(f"it would build a number of about {bits:,} bits (limit {MAX_INT_BITS:,})")


# One printf-style conversion: %[(key)][flags][width][.precision][length]type
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _check_percent_format(budget: Budget, fmt: str | bytes, args: Any) -> None:
    """`fmt % args`: the text, every width and precision, and the arguments once per conversion."""
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    padding = 0
    fields = 0
    for width, precision, kind in _PERCENT_SPEC.findall(text):
        if width == "*" or precision == "*":
            budget.fail("it uses a '*' width in a format string")
        padding += int(width or 0) + int(precision or 0)
        fields += kind != "%"
    _spend_format(budget, len(text), padding, fields, args)


def check_brace_format(budget: Budget, fmt: str, args: Any) -> None:
    """`fmt.format(...)`: as for %, with widths read from each field's spec."""
    padding = 0
    fields = 0
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format will say what is wrong
    for _literal, field_name, spec, _conversion in parsed:
        if field_name is None:
            continue
        fields += 1
        if spec and "{" in spec:
            budget.fail("it uses a nested field in a format spec")
        padding += sum(int(n) for n in re.findall(r"\d+", spec or ""))
    _spend_format(budget, len(fmt), padding, fields, args)


def _spend_format(budget: Budget, fmt_len: int, padding: int, fields: int, args: Any) -> None:
    if padding > MAX_CHARS:
        budget.spend(padding)
    args_size = text_size(args) if fields else 0
    budget.spend(fmt_len + padding + min(fields * args_size, MAX_CHARS + 1))


def checked_concat(*parts: Any) -> str:
    """jinja's ``~``: str() of each part, joined, once the total is known to be within budget."""
    budget = current()
    size = sum(len(p) if isinstance(p, str) else text_size(p) for p in parts)
    budget.spend(size)
    return "".join(p if isinstance(p, str) else str(p) for p in parts)


def metered_iter(iterable: Any) -> Iterator[Any]:
    """A for loop's iterable, charging each step to the budget."""
    budget = current()
    for item in iterable:
        budget.spend(LOOP_STEP_COST)
        yield item


def checked_output(value: Any) -> Any:
    """jinja's `finalize`: each ``{{ value }}``, buffered by a macro or block set or not, is charged."""
    current().spend(len(value) if isinstance(value, str) else text_size(value))
    return value


# --- method calls on strings -----------------------------------------------------


def check_method_call(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Refuse a str/bytes method call whose result would be over budget; may materialize args.

    Returns the arguments to call with: `join` gets its iterable as a list,
    since a generator can only be read once.
    """
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, (str, bytes)):
        return args
    name = getattr(obj, "__name__", "")
    budget = current()
    n = len(owner)

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        if _is_int(width):
            budget.spend(max(n, int(width)))
    elif name == "expandtabs":
        size = arg(0, "tabsize", 8)
        if _is_int(size):
            budget.spend(n + owner.count("\t" if isinstance(owner, str) else b"\t") * max(int(size), 0))
    elif name == "replace":
        budget.spend(_replaced_size(owner, arg(0, "old"), arg(1, "new"), arg(2, "count", -1)))
    elif name == "join" and args:
        items = _bounded_list(budget, args[0])
        size = max(len(items) - 1, 0) * n
        for item in items:
            size += _length(item) or 0
            if size > MAX_CHARS:
                break
        budget.spend(size)
        return (items, *args[1:])
    elif name in ("split", "rsplit", "splitlines"):
        separator = None if name == "splitlines" else arg(0, "sep")
        pieces = owner.count(separator) + 1 if isinstance(separator, type(owner)) and separator else n // 2 + 1
        limit = arg(0 if name == "splitlines" else 1, "maxsplit", -1)
        if _is_int(limit) and name != "splitlines" and limit >= 0:
            pieces = min(pieces, int(limit) + 1)
        budget.spend(pieces, "items")
    elif name == "translate":
        table = arg(0, "table")
        longest = max((_length(v) or 1 for v in table.values()), default=1) if isinstance(table, Mapping) else 1
        budget.spend(n * longest)
    return args


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(text, (str, bytes)) or type(old) is not type(text) or type(new) is not type(text):
        return len(text) if isinstance(text, (str, bytes)) else 0
    hits = len(text) + 1 if not old else text.count(old)
    if _is_int(count) and count >= 0:
        hits = min(hits, int(count))
    return len(text) + hits * max(len(new) - len(old), 0)


def _bounded_list(budget: Budget, iterable: Any) -> list | tuple:
    """The items of `iterable` (a list or tuple as it is), refusing more than MAX_ITEMS."""
    if isinstance(iterable, (list, tuple)):
        budget.spend(len(iterable), "items")
        return iterable
    size = _length(iterable)
    if size is not None:
        budget.spend(size, "items")
    items = []
    for item in iterable:
        budget.tick()
        items.append(item)
        if len(items) > MAX_ITEMS:
            budget.spend(len(items), "items")
    return items


# --- filters and tests -----------------------------------------------------------

# Filters that turn their value into text (a container's repr can dwarf the container).
_STRINGIFYING = frozenset({
    "capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower",
    "pprint", "replace", "string", "striptags", "title", "trim", "truncate", "upper",
    "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr",
})
# Filters that hold or sort all items at once.
_MATERIALIZING = frozenset({
    "batch", "dictsort", "groupby", "join", "list", "slice", "sort", "sum", "unique",
})


def budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with the budget checks that its name calls for; jinja's pass_context marks are kept."""
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.tick()
        if len(args) > offset:
            value = _check_filter(budget, name, args[offset], args[offset + 1 :], kwargs)
            args = (*args[:offset], value, *args[offset + 1 :])
        result = func(*args, **kwargs)
        if isinstance(result, (str, bytes)):
            budget.spend(len(result))
        return result

    return run


def _check_filter(budget: Budget, name: str, value: Any, rest: tuple, kwargs: dict) -> Any:
    """Refuse a filter call that would be over budget; returns the value to call it with.

    Filters that hold all items get a one-shot iterable as a bounded list.
    """

    def arg(i: int, key: str, default: Any = None) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    def text_length() -> int:
        return len(value) if isinstance(value, (str, bytes)) else text_size(value)

    if name in _STRINGIFYING and not isinstance(value, (str, bytes)):
        budget.spend(text_size(value))
    if name in _MATERIALIZING and not isinstance(value, (str, bytes, Mapping)):
        value = _bounded_list(budget, value)
    elif name in _MATERIALIZING:
        budget.spend(len(value), "items")

    if name == "center":
        width = arg(0, "width", 80)
        if _is_int(width):
            budget.spend(max(text_length(), int(width)))
    elif name == "indent":
        width = arg(0, "width", 4)
        pad = len(width) if isinstance(width, str) else int(width) if _is_int(width) else 0
        lines = value.count("\n") + 1 if isinstance(value, str) else 1
        budget.spend(text_length() + lines * max(pad, 0))
    elif name == "wordwrap":
        wrap = arg(2, "wrapstring", None)
        budget.spend(text_length() * (1 + (len(wrap) if isinstance(wrap, str) else 1)))
    elif name == "replace":
        budget.spend(_replaced_size(value, arg(0, "old"), arg(1, "new"), arg(2, "count", -1)))
    elif name == "format":
        if isinstance(value, str):
            _check_percent_format(budget, value, kwargs or rest)
    elif name == "tojson":
        indent = arg(1, "indent", None)
        if isinstance(indent, str):
            indent_width = len(indent)
        elif indent is None or _is_int(indent):
            indent_width = int(indent or 0)
        else:
            indent_width = MAX_JSON_INDENT + 1
        if indent_width > MAX_JSON_INDENT:
            budget.fail(f"it asks for a JSON indent of {indent!r} (limit {MAX_JSON_INDENT})")
        budget.spend(text_size(value, indent=indent_width))
    elif name == "join":
        separator = arg(0, "d", "")
        sep = len(separator) if isinstance(separator, str) else 0
        budget.spend(text_size(value) + len(value) * sep)
    elif name in ("batch", "slice"):
        count = arg(0, "linecount" if name == "batch" else "slices", 0)
        budget.spend(len(value) + (int(count) if _is_int(count) else 0), "items")
    elif name == "round":
        precision = arg(0, "precision", 0)
        if _is_int(precision) and abs(precision) > MAX_ROUND_DIGITS:
            budget.fail(f"it rounds to {precision} digits (limit {MAX_ROUND_DIGITS})")
    elif name == "sum":
        start = arg(1, "start", 0)
        if not isinstance(start, (int, float)):
            budget.fail("it sums something other than numbers")
    return value


def budgeted_test(func: Callable[..., Any]) -> Callable[..., Any]:
    """A jinja test that first checks the clock (select/reject call tests once per item)."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        current().tick()
        return func(*args, **kwargs)

    return run


# --- the template tree -----------------------------------------------------------


class MeterLoopsAndConcats(NodeTransformer):
    """Rewrite a parsed template so loops and ``~`` go through the budget.

    A for loop's iterable becomes ``environment.metered_iter(iterable)`` and
    ``a ~ b`` becomes ``environment.checked_concat(a, b)``; both are reached
    through the environment, so no template variable can shadow them.
    """

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _environment_call("metered_iter", [node.iter], node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("checked_concat", list(node.nodes), node.lineno)


def _environment_call(method: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    call = nodes.Call(nodes.EnvironmentAttribute(method), args, [], None, None)
    call.set_lineno(lineno, override=True)
    return call
