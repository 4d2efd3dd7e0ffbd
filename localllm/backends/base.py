"""The one interface between front ends (CLI, TUI, HTTP) and inference engines.

A front end builds a `GenerationRequest` (localllm.core.requests), hands it to a `Backend`,
and renders the events that come back. Engines never import a front end; front ends never
import an engine.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from localllm.core.modelinfo import ModelInfo
from localllm.core.requests import EngineStats, Event, GenerationRequest


class Backend(Protocol):
    """What every engine offers. Many `generate` calls may be in flight at once."""

    info: ModelInfo
    name: str  # "llamacpp", "native", "remote"
    model_name: str  # the name the model was opened under
    n_ctx: int | None  # tokens one request may use, prompt and output; None: a remote upstream that does not say
    # True when `generate`'s first event (an empty TokenEvent) means the request was accepted:
    # the server waits for it, so a refusal becomes the reply's HTTP status (server/generation.py)
    acknowledges_requests: bool
    embed_context: int | None  # the most tokens one embedding input may have; None: cannot embed

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, template_vars: dict | None = None) -> str:
        """The prompt for `messages`; `template_vars` reach the template as HF's template kwargs do
        (`enable_thinking`)."""
        ...

    def prompt_tokens(self, req: GenerationRequest) -> list[int] | None:
        """The token ids the engine will process for `req`; None where the backend cannot say
        (the remote one: its upstream renders and tokenizes)."""
        ...

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """`req` checked (and, for local engines, tokenized), on any thread: the server calls it
        off its event loop. Backends that check in `generate` return `req` as it is."""
        ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[Event]: ...

    def abort(self, request_id: str) -> None: ...

    def prepare_embedding(self, inputs: list[str] | list[list[int]], *, truncate: bool = False) -> list[list[int]]:
        """Each input as checked token ids, on any thread; backends that cannot embed raise BadRequest."""
        ...

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """One unit-length pooled vector per input (text, or token ids `prepare_embedding`
        checked). Backends that cannot embed raise BadRequest."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
