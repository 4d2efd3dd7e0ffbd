"""What the template budget costs a normal render: budgeted against jinja2's plain sandbox.

Renders real templates (llama-cpp-python's ChatML and Llama 3, our built-in
Gemma) for a chat of N messages, alternating the two environments round after
round so machine noise hits both alike, and prints the median time of each and
their ratio.

    python benchmarks/template_budget_overhead.py [--messages 50] [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import llama_chat_format as formats

from localllm.core.chat_template import ChatTemplate, _Generation, _raise_exception, _strftime_now, _tojson, builtin_template


def plain_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    roles = ["user", "assistant"]
    chat = [{"role": roles[i % 2], "content": f"message {i} " + "words " * 40} for i in range(args.messages)]
    templates = {
        "chatml": formats.CHATML_CHAT_TEMPLATE,
        "llama 3": formats.LLAMA3_INSTRUCT_CHAT_TEMPLATE,
        "built-in gemma": builtin_template("gemma3")[1],
    }
    plain = plain_environment()
    print(f"{args.messages} messages, {args.rounds} rounds; median per render")
    for name, text in templates.items():
        budgeted = ChatTemplate("model", text, name, bos_token="<s>", eos_token="</s>")
        reference = plain.from_string(text)
        context = {"messages": chat, "add_generation_prompt": True, "tools": None, "bos_token": "<s>", "eos_token": "</s>"}
        assert budgeted.render(chat) == reference.render(context)
        times: dict[str, list[float]] = {"plain": [], "budgeted": []}
        for _ in range(args.rounds):
            started = time.perf_counter()
            reference.render(context)
            times["plain"].append(time.perf_counter() - started)
            started = time.perf_counter()
            budgeted.render(chat)
            times["budgeted"].append(time.perf_counter() - started)
        plain_us = statistics.median(times["plain"]) * 1e6
        budgeted_us = statistics.median(times["budgeted"]) * 1e6
        print(f"  {name:<15} plain {plain_us:8.1f} us   budgeted {budgeted_us:8.1f} us   {budgeted_us / plain_us:.2f}x")


if __name__ == "__main__":
    main()
