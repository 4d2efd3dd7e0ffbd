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

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str: ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[Event]: ...

    def abort(self, request_id: str) -> None: ...

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """One unit-length pooled vector per input (text, or token ids a backend's
        `prepare_embedding` checked). Backends that cannot embed raise BadRequest."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
