"""Errors as the command line words them: the facts an error carries, and the flag that helps.

Engines and backends raise errors with numbers and neutral messages
(localllm.core.errors); the remedy a terminal user can apply is a flag, so the
advice is added here, where the flags live.
"""

from __future__ import annotations

from localllm.core.errors import NoChatTemplate, NotSupported, PromptTooLong


def cli_message(exc: Exception) -> str:
    """`exc` as one line for the terminal, with the flag that gets past it where there is one."""
    if isinstance(exc, PromptTooLong):
        return f"{exc}; shorten it or raise the context size (--ctx)"
    if isinstance(exc, NotSupported) and exc.alternative:
        return f"{exc}; use --backend {exc.alternative}"
    if isinstance(exc, NoChatTemplate):
        return f"{exc}; use --raw"
    return str(exc)
