"""The front half every in-process backend shares: llama.cpp's and the native engine's.

One engine thread owns the model. The caller's side checks and tokenizes a
request (`prepare`, or `generate` itself), posts it to the engine's inbox as a
`Job` (engine_inbox.py) and reads its events from a per-request asyncio queue;
closing that stream early, or `abort`, asks the engine to stop it. A subclass
says how its engine tokenizes, loads, runs and unloads, and what requests it
cannot serve; everything else (chat templates, prompt tokens, the context
check, the queue loop, stats, close, load errors) lives here once.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import AsyncIterator, Iterator

from localllm.backends.engine_inbox import Control, Job
from localllm.core.chat_template import ChatTemplate, resolve_template
from localllm.core.context_checks import check_prompt, generation_limit
from localllm.core.errors import BackendError, BadRequest
from localllm.core.modelinfo import ModelInfo
from localllm.core.requests import EngineStats, Event, FinishEvent, GenerationRequest


class LocalBackend:
    """A Backend whose engine runs on a thread of this process. Subclasses start it with `_start`."""

    name: str
    engine_label: str  # how load errors name the engine: "llama.cpp", "the native engine"
    acknowledges_requests = False  # a request is accepted once `generate` returns its stream
    n_ctx: int  # tokens one request may use, prompt and output together

    def __init__(self, model_name: str, info: ModelInfo) -> None:
        self.model_name = model_name
        self.info = info
        self._control = Control()
        self._template: ChatTemplate | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = False
        self._preparing = threading.Condition()
        self._prepares = 0  # prepare calls reading the vocabulary on other threads

    def _start(self) -> None:
        """Start the engine thread and wait for the model; raise what its loading raised."""
        self._thread = threading.Thread(target=self._engine_main, name=f"{self.name}:{self.model_name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # -- what each engine supplies -----------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        raise NotImplementedError

    def detokenize(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def _adds_bos(self) -> bool:
        """Whether the model expects a BOS token at the start of every prompt."""
        raise NotImplementedError

    def _bos_id(self) -> int | None:
        """The model's BOS token id, None if it has none."""
        raise NotImplementedError

    def _check_engine_request(self, req: GenerationRequest) -> None:
        """Refuse what this engine cannot serve (grammars, ...); runs before tokenizing."""

    def _load(self) -> None:
        """On the engine thread: load the model, set `n_ctx`."""
        raise NotImplementedError

    def _run(self) -> None:
        """On the engine thread: serve the inbox until it says stop (None), then end what is left with 'abort'."""
        raise NotImplementedError

    def _unload(self) -> None:
        """On the engine thread: free what `_load` took, including after a failed load."""

    def _load_failure(self, exc: BaseException) -> BaseException:
        """The error the constructor raises for a failed load."""
        if isinstance(exc, BackendError):
            return exc
        return BackendError(f"{self.engine_label} could not load '{self.model_name}': {exc}")

    # -- the caller's side ---------------------------------------------------------------
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, template_vars: dict | None = None) -> str:
        self._refuse_embedding_model()
        if self._template is None:
            self._template = resolve_template(
                self.info.chat_template,
                self.info.architecture,
                model_name=self.model_name,
                bos_token=self.info.bos_token,
                eos_token=self.info.eos_token,
            )
        if self.info.system_prompt and not any(m.get("role") == "system" for m in messages if isinstance(m, dict)):
            messages = [{"role": "system", "content": self.info.system_prompt}, *messages]  # the model's own
        return self._template.render(messages, add_generation_prompt=True, tools=tools, **(template_vars or {}))

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        """The token ids the engine will process for `req`."""
        if isinstance(req.prompt, list):
            return list(req.prompt)
        if not req.templated:
            return self.tokenize(req.prompt, add_bos=self._adds_bos())
        tokens = self.tokenize(req.prompt, add_bos=False, special=True)
        bos = self._bos_id()
        if self._adds_bos() and bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)  # the template did not write the BOS the model expects
        return tokens

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """Check `req` and tokenize it, on any thread (the server calls this off its event loop)."""
        with self._reading_vocabulary():
            tokens = self._checked_tokens(req)
        return replace(req, prompt=tokens, prepared=True)

    @contextmanager
    def _reading_vocabulary(self) -> Iterator[None]:
        """Tokenizing on a caller's thread: `close` waits for it before the engine frees the model."""
        with self._preparing:
            self._check_open()
            self._prepares += 1
        try:
            yield
        finally:
            with self._preparing:
                self._prepares -= 1
                self._preparing.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"model '{self.model_name}' is closed")

    def _refuse_embedding_model(self) -> None:
        if self.info.is_embedding_model:
            raise BadRequest(
                f"model '{self.model_name}' is an embedding model: it cannot chat or complete text; "
                f"ask /v1/embeddings or /api/embed"
            )

    def _checked_tokens(self, req: GenerationRequest) -> list[int]:
        self._refuse_embedding_model()
        req.params.validate()
        self._check_engine_request(req)
        tokens = self.prompt_tokens(req)
        check_prompt(len(tokens), self.n_ctx)
        return tokens

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        self._check_open()
        tokens = self._checked_tokens(req)
        limit = generation_limit(len(tokens), self.n_ctx, req.params.max_tokens)
        job = Job(req, tokens, asyncio.get_running_loop(), asyncio.Queue(), limit)
        control = self._control
        with control.lock:
            if req.request_id in control.active:
                raise BadRequest(f"request id '{req.request_id}' is already in use")
            control.active.add(req.request_id)
            control.stats.waiting += 1
        control.inbox.put(job)
        finished = False
        try:
            while True:
                event = await job.events.get()
                yield event
                if isinstance(event, FinishEvent):
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self._control.abort(request_id)

    def stats(self) -> EngineStats:
        with self._control.lock:
            return EngineStats(**vars(self._control.stats))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._preparing:  # a prepare still reading the vocabulary finishes first
            self._preparing.wait_for(lambda: self._prepares == 0)
        control = self._control
        with control.lock:  # stop what is running rather than wait for it
            control.aborted |= control.active
        control.inbox.put(None)
        self._thread.join()

    # -- the engine thread ---------------------------------------------------------------
    def _engine_main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to the constructor's caller
            self._load_error = self._load_failure(exc)
            self._unload()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._run()
        finally:
            self._unload()
