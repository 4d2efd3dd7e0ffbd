"""A deterministic stand-in for a backend, for TUI tests that pin layout and flow.

It speaks the real Backend protocol (async events, abort, usage, timings); the
real engine is covered by its own tests and by the TUI's tmux smoke test.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from localllm.core.requests import EngineStats, FinishEvent, GenerationRequest, Timings, TokenEvent, Usage
from localllm.core.errors import BackendError, BadRequest
from localllm.store.store import ResolvedModel

REPLY = "Hello! Here is **bold** text and code:\n\n```python\nprint('hi')\n```\n"


@dataclass
class FakeBackend:
    model_name: str
    reply: str = REPLY
    delay_s: float = 0.0
    name: str = "fake"
    info: object = None
    n_ctx: int | None = None  # says no context size, as a remote upstream may
    acknowledges_requests: bool = False
    embed_context: int | None = None  # cannot embed
    prompts: list[str] = field(default_factory=list)
    tokens_sent: int = 0  # across all requests: lets a test wait until a reply is streaming
    requests: list[GenerationRequest] = field(default_factory=list)
    _aborted: set[str] = field(default_factory=set)
    closed: bool = False

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def detokenize(self, tokens: list[int]) -> str:
        return ""

    def render_chat(self, messages: list[dict], tools=None, template_vars=None) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def prompt_tokens(self, req: GenerationRequest) -> list[int] | None:
        return None  # cannot say, as a remote upstream cannot

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        return req

    def prepare_embedding(self, inputs, *, truncate: bool = False):
        raise BadRequest("the fake backend cannot compute embeddings")

    async def embed(self, inputs):
        raise BadRequest("the fake backend cannot compute embeddings")

    async def generate(self, req: GenerationRequest):
        self.prompts.append(req.prompt)
        self.requests.append(req)
        pieces = [self.reply[i : i + 4] for i in range(0, len(self.reply), 4)]
        limit = req.params.max_tokens or len(pieces)
        sent, reason = 0, "stop"
        for piece in pieces:
            if req.request_id in self._aborted:
                reason = "abort"
                break
            if sent == limit:
                reason = "length"
                break
            await asyncio.sleep(self.delay_s)
            sent += 1
            self.tokens_sent += 1
            yield TokenEvent(req.request_id, piece, [sent])
        timings = Timings(ttft_s=0.125, decode_s=max(sent - 1, 0) / 50, total_s=0.2)
        yield FinishEvent(req.request_id, reason, Usage(len(self.tokenize(req.prompt)), sent), timings)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        return EngineStats()

    def close(self) -> None:
        self.closed = True


class FakeFactory:
    """Finds any name and opens FakeBackends; remembers what it opened; fails for names in `broken`."""

    def __init__(self, delay_s: float = 0.0, broken: tuple[str, ...] = ()) -> None:
        self.delay_s = delay_s
        self.broken = broken
        self.opened: list[FakeBackend] = []

    def resolve(self, name: str) -> ResolvedModel:
        return ResolvedModel(name, Path(name))

    def open(self, model: ResolvedModel, n_ctx: int | None) -> FakeBackend:
        if model.name in self.broken:
            raise BackendError(f"cannot open {model.name}: not enough memory")
        backend = self.make(model.name)
        self.opened.append(backend)
        return backend

    def make(self, name: str) -> FakeBackend:
        return FakeBackend(name, delay_s=self.delay_s)


class FixedHardwareProbe:
    """The same readings every second, so screenshots are stable."""

    def __init__(self) -> None:
        from localllm.core.hardware import GPU, Hardware, LlamaCppSupport

        self.facts = Hardware(
            os="Linux", os_release="6.1", machine="x86_64", python="3.11.7",
            cpu_model="Example CPU 8-Core", physical_cores=8, logical_cores=16,
            cpu_flags=["avx", "avx2", "fma", "f16c"],
            ram_total_bytes=32 * 1024**3, ram_available_bytes=20 * 1024**3,
            gpus=[GPU(0, "NVIDIA GeForce RTX 4070", 12 * 1024**3, 10 * 1024**3, "8.9", "550.54", "nvidia-smi")],
            llama_cpp=LlamaCppSupport(installed=True, version="0.3.36"),
        )

    def start(self) -> None:
        pass

    def live(self):
        from localllm.tui.screens.hardware import LiveReading

        return LiveReading(37.0, 12 * 1024**3, 32 * 1024**3, self.facts.gpus)


async def wait_until(pilot, condition, timeout: float = 10.0) -> None:
    """Let the app run until `condition()` holds; fail after `timeout` seconds."""
    waited = 0.0
    while not condition():
        await pilot.pause(0.05)
        waited += 0.05
        if waited > timeout:
            raise AssertionError("condition not met in time")
