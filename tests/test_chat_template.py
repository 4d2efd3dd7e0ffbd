"""Chat templates: exact built-in formats, model templates, and the sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from localllm.cli.error_words import cli_message
from localllm.core.chat_template import (
    BUILTIN_FAMILIES,
    ChatTemplate,
    _compile,
    builtin_template,
    resolve_template,
    template_source,
    validate_messages,
)
from localllm.core.errors import BadRequest, TemplateError

CHAT = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]
NO_SYSTEM = CHAT[1:]

# family -> (an architecture using it, bos, eos)
FAMILIES = {
    "gemma": ("gemma3", "<bos>", "<eos>"),
    "llama3": ("llama", "<|begin_of_text|>", "<|eot_id|>"),
    "chatml": ("qwen2", "", "<|im_end|>"),
    "mistral": ("mistral", "<s>", "</s>"),
}

WITH_SYSTEM = {
    "gemma": (
        "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "mistral": "<s>[INST] S\n\nHi [/INST]Hello</s>[INST] Bye [/INST]",
}

WITHOUT_SYSTEM = {
    "gemma": (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "mistral": "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]",
}

# A user part list and a tool result, with add_generation_prompt=False.
PARTS_AND_TOOL = [
    {"role": "user", "content": [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "b"},
    ]},
    {"role": "assistant", "content": None},
    {"role": "tool", "content": "R"},
]
TOOL_EXPECTED = {
    "gemma": (
        "<bos><start_of_turn>user\nab<end_of_turn>\n"
        "<start_of_turn>model\n<end_of_turn>\n"
        "<start_of_turn>user\nR<end_of_turn>\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nab<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\nR<|eot_id|>"
    ),
    "chatml": (
        "<|im_start|>user\nab<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"
        "<|im_start|>tool\nR<|im_end|>\n"
    ),
    "mistral": "<s>[INST] ab [/INST]</s>[INST] R [/INST]",
}

CHATML_LIKE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def builtin(family: str) -> ChatTemplate:
    arch, bos, eos = FAMILIES[family]
    return resolve_template(None, arch, model_name="m", bos_token=bos, eos_token=eos)


def model(text: str, name: str = "hostile.gguf") -> ChatTemplate:
    return ChatTemplate(source="model", text=text, model_name=name)


# --- built-ins -----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builtin_with_system(family: str) -> None:
    assert builtin(family).render(CHAT, add_generation_prompt=True) == WITH_SYSTEM[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builtin_without_system(family: str) -> None:
    got = builtin(family).render(NO_SYSTEM, add_generation_prompt=True)
    assert got == WITHOUT_SYSTEM[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builtin_content_parts_and_tool_results(family: str) -> None:
    got = builtin(family).render(PARTS_AND_TOOL, add_generation_prompt=False)
    assert got == TOOL_EXPECTED[family]


def test_gemma_system_without_user_turn_becomes_user_turn() -> None:
    got = builtin("gemma").render([{"role": "system", "content": "S"}])
    assert got == "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_trims_content_like_googles_template() -> None:
    got = builtin("gemma").render([{"role": "user", "content": "  Hi \n"}])
    assert got == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_builtin_families_cover_the_documented_architectures() -> None:
    expected = {
        "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
        "llama": "llama3",
        "qwen2": "chatml", "qwen3": "chatml", "qwen2moe": "chatml", "qwen3moe": "chatml",
        "mistral": "mistral", "mistral3": "mistral",
    }
    assert BUILTIN_FAMILIES == expected
    for arch, family in expected.items():
        found = builtin_template(arch)
        assert found is not None and found[0] == family and found[1]
    assert builtin_template("bert") is None


# --- sources and resolution ------------------------------------------------------


def test_template_source() -> None:
    assert template_source(None, "gemma3") == "builtin:gemma"
    assert template_source("", "qwen3") == "builtin:chatml"
    assert template_source(CHATML_LIKE, "gemma3") == "model"
    assert template_source(CHATML_LIKE, "bert") == "model"
    assert template_source(None, "bert") is None


def test_resolve_prefers_the_model_template() -> None:
    t = resolve_template(CHATML_LIKE, "gemma3", model_name="m", bos_token="<bos>", eos_token=None)
    assert (t.source, t.text, t.bos_token, t.eos_token) == ("model", CHATML_LIKE, "<bos>", "")


def test_resolve_builtin() -> None:
    t = resolve_template(None, "gemma3", model_name="m", bos_token=None, eos_token=None)
    assert t.source == "builtin:gemma"
    assert t.text == builtin_template("gemma3")[1]


def test_resolve_without_any_template_raises() -> None:
    with pytest.raises(TemplateError) as info:
        resolve_template(None, "bert", model_name="enc", bos_token=None, eos_token=None)
    assert str(info.value) == "model 'enc' (architecture 'bert') has no chat template and no built-in one"
    assert cli_message(info.value) == (
        "model 'enc' (architecture 'bert') has no chat template and no built-in one; use --raw"
    )


# --- model templates -------------------------------------------------------------


def test_model_template_renders() -> None:
    t = model(CHATML_LIKE, "qwen")
    assert t.render(NO_SYSTEM[:1]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = t.render(NO_SYSTEM[:1], add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"


def test_variables_tools_and_extra_kwargs() -> None:
    t = ChatTemplate("model", "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ flag }}",
                     "m", bos_token="<s>", eos_token="</s>")
    assert t.render([], flag="on") == "<s>|</s>|True|on"
    assert model("{{ tools[0].name }}").render([], tools=[{"name": "f"}]) == "f"


def test_trim_blocks_and_loop_controls() -> None:
    text = "{% for i in range(5) %}\n  {% if i == 3 %}{% break %}{% endif %}\n{{ i }}\n{% endfor %}"
    assert model(text).render([]) == "0\n1\n2\n"


def test_generation_marker_is_accepted() -> None:
    assert model("{% generation %}x{% endgeneration %}").render([]) == "x"


def test_raise_exception_becomes_template_error() -> None:
    t = model("{{ raise_exception('Conversation roles must alternate') }}", "mix")
    with pytest.raises(TemplateError) as info:
        t.render(CHAT)
    assert str(info.value) == "chat template of 'mix' failed: Conversation roles must alternate"


def test_syntax_error_names_the_model() -> None:
    with pytest.raises(TemplateError) as info:
        model("{% for m in messages %}{{ m }", "broken").render(CHAT)
    message = str(info.value)
    assert message.startswith("chat template of 'broken' failed: syntax error")
    assert "\n" not in message


def test_undefined_helper_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="chat template of 'm' failed: .*'nope' is undefined"):
        model("{{ nope() }}", "m").render([])


def test_tojson_is_like_hugging_faces() -> None:
    data = [{"role": "user", "content": "héllo <b>&"}]
    assert model("{{ messages | tojson }}").render(data) == json.dumps(data, ensure_ascii=False)
    indented = model("{{ messages | tojson(indent=2) }}").render(data)
    assert indented == json.dumps(data, ensure_ascii=False, indent=2)


def test_strftime_now() -> None:
    before = datetime.now().strftime("%Y-%m-%d")
    got = model("{{ strftime_now('%Y-%m-%d') }}").render([])
    after = datetime.now().strftime("%Y-%m-%d")
    assert got in {before, after}


def test_huge_loop_still_renders() -> None:
    text = (
        "{% set ns = namespace(n=0) %}"
        "{% for i in range(100000) %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}"
    )
    assert model(text).render([]) == "100000"


def test_compiled_once_per_text() -> None:
    text = "{{ 'cache-probe' }}"
    model(text).render([])
    hits = _compile.cache_info().hits
    model(text, "other").render([])
    assert _compile.cache_info().hits == hits + 1


# --- the sandbox -----------------------------------------------------------------


HOSTILE = [
    "{{ self.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ messages[0]['content'].__class__.__base__ }}",
    "{{ (lambda_ | default(joiner)).__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}",
    "{% set x = messages[0].update({'role': 'x'}) %}",
    "{{ messages.pop() }}",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_templates_are_refused(text: str) -> None:
    chat = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError) as info:
        model(text, "evil").render(chat)
    assert str(info.value).startswith("chat template of 'evil' tried to leave the sandbox: ")
    assert chat == [{"role": "user", "content": "Hi"}]


def test_shell_escape_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    text = "{{ cycler.__init__.__globals__.os.system('touch " + str(target) + "') }}"
    with pytest.raises(TemplateError, match="tried to leave the sandbox"):
        model(text).render([])
    assert not target.exists()


def test_format_string_escape_is_refused() -> None:
    with pytest.raises(TemplateError, match="tried to leave the sandbox"):
        model("{{ '{0.__class__}'.format(messages) }}").render([])


# --- message validation ----------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "not a list",
    {"role": "user"},
    ["not an object"],
    [{"content": "no role"}],
    [{"role": 3, "content": "x"}],
    [{"role": "developer", "content": "x"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": {"type": "text"}}],
    [{"role": "user", "content": ["bare string part"]}],
])
def test_validate_messages_rejects(bad: object) -> None:
    with pytest.raises(BadRequest):
        validate_messages(bad)


def test_validate_messages_accepts() -> None:
    validate_messages([])
    validate_messages(CHAT + PARTS_AND_TOOL)


def test_render_validates_messages() -> None:
    with pytest.raises(BadRequest):
        builtin("chatml").render([{"role": "wizard", "content": "x"}])


# --- budgets: time, value sizes, output -------------------------------------------

# Each renders for a long time or builds gigabytes without the budget.
BOMBS = {
    "huge power": "{{ (9**20000000) % 10 }}",
    "huge repeat": "{{ 'x' * 300000000 }}",
    "huge list repeat": "{{ ([0] * 300000000) | length }}",
    "huge JSON indent": "{{ messages | tojson(indent=100000000) }}",
    "huge range": "{{ range(10**9) | list | length }}",
    "nested loops that print nothing": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "doubling with ~": (
        "{% set ns = namespace(s='x') %}"
        "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
    ),
    "doubling with +": (
        "{% set ns = namespace(s='x') %}"
        "{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}"
    ),
    "join filter of one string many times": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000000) | join }}",
    "str.join of one string many times": "{% set s = 'x' * 1000000 %}{{ ''.join([s] * 1000000) }}",
    "printing a list of one string many times": "{% set s = 'x' * 1000000 %}{{ [s] * 1000000 }}",
    "padding every item": "{{ range(100000) | map('center', 80000) | list | length }}",
    "a macro buffering nested loops": (
        "{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}x"
        "{% endfor %}{% endfor %}{% endmacro %}{{ m() }}"
    ),
    "a block set buffering big output": (
        "{% set s = 'x' * 8000000 %}{% set b %}{% for i in range(100000) %}{{ s }}"
        "{% endfor %}{% endset %}{{ b | length }}"
    ),
    "str.format width": "{{ '{:>100000000}'.format(1) }}",
    "printf width": "{{ '%100000000d' % 1 }}",
    "format filter width": "{{ '%100000000d' | format(1) }}",
    "replace": "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}",
    "replace filter": "{% set s = 'x' * 100000 %}{{ s | replace('x', s) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "exponential macro recursion": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
    "summing lists": "{{ ([[1] * 10000] * 10000) | sum(start=[]) }}",
    "sorting millions": "{% set s = 'x' * 4000000 %}{{ s | list | sort | length }}",
    "output over the cap": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "rounding to a huge precision": "{{ 5 | round(-10000000) }}",
    "splitting into millions": "{{ ('a ' * 4000000).split() | length }}",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_template_bombs_end_with_a_clear_error_in_bounded_time_and_memory(name: str) -> None:
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(TemplateError) as info:
            model(BOMBS[name], "bomb.gguf").render([{"role": "user", "content": "Hi"}])
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    # jinja's own sandbox already refuses ranges over 100,000 items; everything else is ours
    why = "failed: OverflowError: Range too big" if name == "huge range" else "is over its budget: "
    assert message.startswith(f"chat template of 'bomb.gguf' {why}"), message
    assert "\n" not in message and len(message) < 400
    assert elapsed < 5, f"{name}: {elapsed:.1f} s"
    assert peak < 150 * 2**20, f"{name}: {peak / 2**20:.0f} MiB"


def test_big_but_sane_templates_still_render() -> None:
    content = "y" * 1_000_000
    chat = [{"role": "user", "content": content}] * 3
    assert len(builtin("chatml").render(chat)) == 3 * (len(content) + len("<|im_start|>user\n<|im_end|>\n")) + len(
        "<|im_start|>assistant\n"
    )
    assert model("{{ 'ab' * 3 }}|{{ 2 ** 10 }}|{{ '%5d' % 7 }}|{{ '{:>4}'.format(1) }}").render([]) == (
        "ababab|1024|    7|   1"
    )
    assert model("{{ [1, 2] + [3] }}|{{ 'a' ~ 1 ~ none }}|{{ 'x'.center(5) }}").render([]) == "[1, 2, 3]|a1None|  x  "


# Loops (loop.*, else, recursive), macros with caller, filter and set blocks, and the filters and
# operators the budget wraps: each must render exactly as without the budget.
JINJA_FEATURES = r"""{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}{{ loop.cycle('a','b') }}{% else %}none{% endfor %}
{% for x in [] %}x{% else %}empty{% endfor %}
{% set tree = [{'n': 'a', 'c': [{'n': 'b', 'c': []}]}] %}{% for node in tree recursive %}{{ node.n }}({{ loop(node.c) }}){% endfor %}
{% macro box(t) %}[{{ t }}|{{ caller() }}]{% endmacro %}{% call box('x') %}inner{% endcall %}
{% filter upper %}shout {{ messages[0].content[:10] }}{% endfilter %}
{% set b %}{% for m in messages %}{{ m.role ~ ':' ~ m.content[:10] }};{% endfor %}{% endset %}{{ b | length }}{{ b }}
{{ messages | map(attribute='role') | join(',') }} {{ messages | selectattr('role', 'eq', 'user') | list | length }}
{{ '%s-%d' | format('a', 3) }} {{ '{}+{}'.format(1, 2) }} {{ (messages | tojson(indent=2))[:20] }} {{ 'abc' | center(9) }}|{{ 'a\nb' | indent(2, true) }}
{{ range(5) | sum }} {{ [3,1,2] | sort | join }} {{ {'b':1,'a':2} | dictsort }} {{ 'x' * 3 }} {{ 2 ** 8 }} {{ [1] + [2] }} {{ 'a' + 'b' }} {{ 7 % 3 }}
{% for a, b in [(1, 2), (3, 4)] %}{{ a + b }}{% endfor %} {{ namespace(x=1).x }} {{ 'hello world' | wordwrap(5) }} {{ 'a b' | replace(' ', '_') }}
{{ messages | batch(2) | list | length }} {{ messages | slice(2) | list | length }} {{ messages | groupby('role') | list | length }} {{ 'AbC' | lower }}
"""


def _reference_render(text: str, chat: list[dict], **variables: object) -> str:
    """The same template through jinja2's plain immutable sandbox, with no budget."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from localllm.core.chat_template import _Generation, _raise_exception, _strftime_now, _tojson

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    context = {"add_generation_prompt": True, "tools": None, **variables, "messages": chat}
    return env.from_string(text).render(context)


def _real_templates() -> dict[str, str]:
    from llama_cpp import llama_chat_format as formats

    from server_harness import TOOL_TEMPLATE

    return {
        "jinja features": JINJA_FEATURES,
        "gemma turns with tools (the server tests')": TOOL_TEMPLATE,
        "chatml": formats.CHATML_CHAT_TEMPLATE,
        "llama 3": formats.LLAMA3_INSTRUCT_CHAT_TEMPLATE,
        "mistral": formats.MISTRAL_INSTRUCT_CHAT_TEMPLATE,
        "mixtral": formats.MIXTRAL_INSTRUCT_CHAT_TEMPLATE,
        **{f"built-in {family}": builtin(family).text for family in sorted(FAMILIES)},
    }


def test_real_templates_render_as_without_the_budget() -> None:
    """llama-cpp-python's ChatML, Llama 3 and Mistral templates and ours, budgeted and not."""
    chats = [NO_SYSTEM, NO_SYSTEM[:1], [{"role": "user", "content": "é " * 50_000}]]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    for name, text in _real_templates().items():
        for chat in chats:
            expected = _reference_render(text, chat, **tokens)
            got = ChatTemplate("model", text, name, **tokens).render(chat)
            assert got == expected, name
        expected = _reference_render(text, NO_SYSTEM, **tokens | {"tools": tools})
        got = ChatTemplate("model", text, name, **tokens).render(NO_SYSTEM, tools=tools)
        assert got == expected and (name != "gemma turns with tools (the server tests')" or '"name": "f"' in got)
