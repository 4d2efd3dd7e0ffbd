"""The interactive line chat: `localllm chat --plain`, and `run MODEL` without a prompt.

Like Ollama's REPL: `>>> ` prompts, `\"\"\"` opens and closes a multi-line message,
slash commands for the rest. Ctrl+C stops a reply (the partial reply is kept);
Ctrl+D or /bye leaves. Earlier turns stay in the KV cache, so each new turn
only processes what is new. When the chat outgrows the context, the oldest
turns are left out (chat_fit.py) and a line says so.
"""

from __future__ import annotations

import sys

from localllm.backends.base import Backend

from localllm.core.reasoning import ReplyReasoning
from localllm.core.requests import GenerationRequest, SamplingParams
from localllm.backends.chat_fit import ChatTooLong, fit_chat
from localllm.cli.console import ThoughtsFirst, format_stats, stdout_writer, stream_to

HELP = """commands:
  /bye            leave (Ctrl+D too)
  /clear          forget the conversation
  /system TEXT    set the system prompt (and clear the conversation)
  /stats          toggle timing figures after each reply
  /help           this list
  \"\"\"             start or end a multi-line message
Ctrl+C stops a reply."""


def line_chat(
    backend: Backend,
    params: SamplingParams,
    *,
    system: str | None = None,
    show_stats: bool = False,
    raw: bool = False,
) -> int:
    """Chat until the user leaves; returns the exit code."""
    from localllm.backends.llamacpp import new_request_id

    if not raw:
        backend.render_chat([{"role": "user", "content": "hello"}])  # no template: fail now, not mid-chat
    print(f"chatting with {backend.model_name}; /help for commands, /bye to leave", file=sys.stderr)
    messages: list[dict] = []
    transcript = ""  # the raw mode's running text
    shown_drop = 0  # messages the last drop notice named, so each new drop is said once
    while True:
        line = _read_message()
        if line is None:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command in ("/bye", "/exit", "/quit"):
            return 0
        if command == "/help":
            print(HELP, file=sys.stderr)
            continue
        if command == "/clear":
            messages, transcript, shown_drop = [], "", 0
            print("conversation cleared", file=sys.stderr)
            continue
        if command == "/system":
            system, messages, shown_drop = rest.strip() or None, [], 0
            print("system prompt set; conversation cleared", file=sys.stderr)
            continue
        if command == "/stats":
            show_stats = not show_stats
            continue
        if line.startswith("/") and " " not in command and command.isascii() and command[1:].isalpha():
            print(f"unknown command {command}; /help lists them", file=sys.stderr)
            continue
        chat = None
        if raw:
            transcript += line
            prompt, templated = transcript, False
        else:
            messages.append({"role": "user", "content": line})
            try:
                fitted = fit_chat(backend, ([{"role": "system", "content": system}] if system else []) + messages,
                                  max_tokens=params.max_tokens)
            except ChatTooLong as exc:
                messages.pop()
                print(f"error: {exc}", file=sys.stderr)
                continue
            if fitted.notice and fitted.dropped_messages != shown_drop:
                shown_drop = fitted.dropped_messages
                print(f"({fitted.notice})", file=sys.stderr)
            chat, prompt, templated = fitted.messages, fitted.prompt, True
        reply: list[str] = []
        thoughts = ReplyReasoning.of(backend.info.chat_template, prompt).stream() if templated else None

        def write(text: str) -> None:
            reply.append(text)
            stdout_writer()(text)

        writer = ThoughtsFirst(thoughts) if thoughts is not None else write
        request = GenerationRequest(new_request_id(), prompt, params, templated=templated, messages=chat)
        finish = stream_to(backend, request, writer)
        if isinstance(writer, ThoughtsFirst):
            writer.finish()
            reply = writer.answer  # the thoughts are shown, not carried into the next turn
        print(flush=True)
        if finish.reason == "abort":
            print("[stopped]", file=sys.stderr)
        elif finish.reason == "error":
            print(f"error: {finish.error}", file=sys.stderr)
        if show_stats:
            print(format_stats(finish), file=sys.stderr)
        if raw:
            transcript += "".join(reply)
        else:
            messages.append({"role": "assistant", "content": "".join(reply)})


def _read_message() -> str | None:
    """One message: a line, or a \"\"\"-fenced block; None at end of input."""
    try:
        first = input(">>> ")
        if not first.lstrip().startswith('"""'):
            return first
        lines = [first.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(input("... "))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip("\n")
    except EOFError:
        return None
    except KeyboardInterrupt:
        print("\n(use /bye or Ctrl+D to leave)", file=sys.stderr)
        return ""
