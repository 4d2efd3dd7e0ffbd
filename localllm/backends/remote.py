"""The remote backend: an OpenAI-compatible server elsewhere, used as an engine.

When one machine is not enough, localllm fronts an engine built for many
GPUs (vLLM with Ray, TGI, llama.cpp's server, another localllm) instead of
growing one. Our TUI, CLI and API stay the same; only the tokens come from
the upstream.

How requests travel:

* A request that carries chat messages goes to `/v1/chat/completions` with the
  messages themselves: the upstream knows its model's chat template and we do
  not, so `render_chat` only writes a plain transcript for logs and displays.
  A raw prompt (text or token ids) goes to `/v1/completions`.
* Replies always stream. Text passes through chunk by chunk; the upstream
  applies stop strings. The OpenAI stream carries no token ids, so each
  chunk counts as one token (vLLM and llama.cpp send one per chunk) with
  UNKNOWN_TOKEN ids; usage comes from the upstream's final usage chunk.
* Like every backend, this one runs its I/O on its own thread (one asyncio
  loop and one pooled HTTP client) and feeds each caller's asyncio queue,
  so the CLI, the TUI and the server share it whatever loop they run.
* The first event of every request is an empty TokenEvent sent as soon as
  the upstream accepts it (status 200); the server waits for it, so an
  upstream that is down or refuses the request becomes that reply's HTTP
  status (502, or the upstream's own 4xx) instead of an error inside a stream.
* Reasoning the upstream returns apart (`reasoning_content`: vLLM, llama.cpp's
  server, DeepSeek; `reasoning`: Ollama's /v1, OpenRouter) becomes text wrapped
  in ``<think>…</think>`` ahead of the answer, which is how a local reasoning
  model writes it: the front ends split it off the same way (the remote model's
  template, remotes.REMOTE_TEMPLATE, says replies may carry those tags), so every
  route shows it as its own reasoning field. A reply whose text itself carries
  the tags is split the same way.
* The request's template variables (`enable_thinking`, a client's
  chat_template_kwargs) go upstream as `chat_template_kwargs`, which vLLM and
  llama.cpp's server pass to their template, and a client's `reasoning_effort`
  as it is.
* Closing a stream early or `abort` cancels the upstream request by closing
  its connection, which is how OpenAI-compatible servers learn of a cancel.

Not available through this backend (each a clear BadRequest): grammars, and
so JSON modes and tool calls, which our server implements with grammars.
Tokenizing uses the upstream's `/tokenize` (vLLM, llama.cpp's server); other
upstreams say it is not supported rather than guess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Coroutine, TypeVar

import httpx

from localllm.core.reasoning import CLOSE, OPEN
from localllm.core.requests import EngineStats, Event, FinishEvent, FinishReason, GenerationRequest, SamplingParams, Timings, TokenEvent, Usage
from localllm.core.env_vars import check_header_value, check_proxy_settings
from localllm.core.errors import BackendError, BadRequest, UpstreamRefused, UpstreamUnavailable
from localllm.backends.remotes import check_url, remote_model_info

T = TypeVar("T")
UNKNOWN_TOKEN = -1  # the id of a token the upstream streamed as text only
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 600.0  # a long prompt on a busy cluster may take minutes before its first token
_ENDED = object()  # the relay task finished, however it ended
_DEFAULTS = SamplingParams()


@dataclass
class RemoteOptions:
    url: str  # the upstream's OpenAI base URL, e.g. http://host:8000/v1
    model: str  # the model's name on the upstream
    api_key: str | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # longest silence while waiting for the upstream
    n_ctx: int | None = None  # what to report as the context size (default: the upstream's, if it says)


@dataclass
class _Progress:
    """One request as received so far: written on the backend's thread, read when it finishes."""

    started: float
    accepted: bool = False
    tokens: int = 0
    first_at: float | None = None
    last_at: float | None = None
    usage: Usage | None = None


class RemoteBackend:
    name = "remote"
    # generate's first event (empty) means the upstream accepted the request; see server/generation.py
    acknowledges_requests = True

    def __init__(self, model_name: str, options: RemoteOptions) -> None:
        self.model_name = model_name
        self.options = options
        self.url = check_url(options.url)
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url  # where /tokenize lives
        self._running: dict[str, concurrent.futures.Future] = {}
        self._closed = False
        self._finished = 0
        self._last_ttft_s = 0.0
        self._last_rate = 0.0
        if options.api_key:
            check_header_value(options.api_key, "the remote API key (--remote-api-key or LOCALLLM_REMOTE_API_KEY)")
        check_proxy_settings()
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(options.read_timeout_s, connect=options.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),  # the server admits requests
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"remote:{model_name}", daemon=True)
        self._thread.start()
        try:
            listing, self.upstream_kind = self._call(self._describe())
        except BaseException:
            self.close()
            raise
        self.info = remote_model_info(model_name, listing)
        self.n_ctx = options.n_ctx or self.info.context_length or None

    # -- opening -------------------------------------------------------------------
    async def _describe(self) -> tuple[dict[str, Any] | None, str]:
        """The upstream's /v1/models entry for our model (None if it lists none), and what server it is.

        An upstream that lists no models, or not this name, is still used: llama.cpp's
        server answers to any name, and a wrong one comes back as the upstream's 404.
        """
        try:
            response = await self._client.get(f"{self.url}/models")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code in (401, 403):
            raise UpstreamUnavailable(
                f"the upstream at {self.url} refused our API key ({response.status_code}): {_message(response)}"
            )
        if response.status_code != 200:
            return None, ""
        try:
            entries = [e for e in response.json().get("data", []) if isinstance(e, dict)]
        except (ValueError, AttributeError):
            return None, ""
        owners = {str(e.get("owned_by", "")) for e in entries}
        kind = next((k for k in ("vllm", "llamacpp", "localllm") if k in owners), "")
        return next((e for e in entries if e.get("id") == self.options.model), None), kind

    # -- the Backend interface -----------------------------------------------------------
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, template_vars: dict | None = None) -> str:
        """A plain transcript, for logs and displays: the upstream renders `messages` with its own template."""
        lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
        return "\n".join(lines + ["assistant:"])

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        path, body = self._request(req)  # invalid requests raise here, before anything is sent
        if self._closed:
            raise BackendError("the remote backend is closed")
        caller = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(item: object) -> None:
            try:
                caller.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:
                pass  # the caller's loop has closed: nobody is listening any more

        progress = _Progress(time.perf_counter())
        future = asyncio.run_coroutine_threadsafe(self._relay(req, path, body, progress, deliver), self._loop)
        future.add_done_callback(lambda _: deliver(_ENDED))
        self._running[req.request_id] = future
        try:
            while True:
                item = await inbox.get()
                if item is _ENDED:
                    item = self._ended(req, future, progress)
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, FinishEvent):
                    self._record(item)
                yield item  # type: ignore[misc]
                if isinstance(item, FinishEvent):
                    return
        finally:
            self._running.pop(req.request_id, None)
            future.cancel()  # a consumer that stops early closes the upstream request

    def prompt_tokens(self, req: GenerationRequest) -> list[int] | None:
        """None: the upstream renders and tokenizes the request, so its tokens are not known here."""
        return None

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """`req` as it is: `generate` checks it, and the upstream tokenizes."""
        return req

    # -- embeddings: not through this backend ---------------------------------------------
    embed_context = None

    def prepare_embedding(self, inputs: list[str] | list[list[int]], *, truncate: bool = False) -> list[list[int]]:
        raise _no_embeddings()

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        raise _no_embeddings()

    def abort(self, request_id: str) -> None:
        future = self._running.get(request_id)
        if future is not None:
            future.cancel()  # the relay's connection closes; generate ends with reason "abort"

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        body = {"model": self.options.model, "prompt": text, "add_special_tokens": add_bos,  # vLLM
                "content": text, "add_special": add_bos}  # llama.cpp's server
        tokens = self._call(self._tokenizer_call("/tokenize", body)).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BackendError(f"the upstream at {self.root} answered /tokenize without a list of token ids")
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        answer = self._call(self._tokenizer_call("/detokenize", {"model": self.options.model, "tokens": tokens}))
        text = answer.get("content", answer.get("prompt"))  # llama.cpp's server, vLLM
        if not isinstance(text, str):
            raise BackendError(f"the upstream at {self.root} answered /detokenize without text")
        return text

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            last_decode_tokens_per_s=self._last_rate,
            last_ttft_s=self._last_ttft_s,
            requests_finished=self._finished,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for future in list(self._running.values()):
            future.cancel()
        if self._thread.is_alive():
            try:
                self._call(self._shutdown(), timeout_s=5)
            except Exception:
                pass  # closing must not fail; the connections die with the loop
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        """On the backend's loop, before it stops: end every task and generator, close the connections."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        await self._loop.shutdown_asyncgens()

    # -- one request -------------------------------------------------------------------------
    def _request(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The upstream path and JSON body for `req`; BadRequest for what cannot travel."""
        p = req.params.validate()  # what the local backends refuse is refused here too, before anything is sent
        if isinstance(req.prompt, list) and not req.prompt:
            raise BadRequest("the prompt is empty")
        if p.grammar is not None:
            raise BadRequest(
                "grammar-constrained output (JSON modes, tool calls) is not available through the remote backend"
            )
        if req.templated and req.messages is None:
            raise BadRequest("the remote backend needs the chat's messages, not a rendered prompt")
        body: dict[str, Any] = {
            "model": self.options.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if p.max_tokens is not None:
            body["max_tokens"] = p.max_tokens
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        body.update(self._extensions(p))
        if req.messages is not None:
            body["messages"] = req.messages
            if req.template_vars:
                body["chat_template_kwargs"] = dict(req.template_vars)
            if req.reasoning_effort is not None:
                body["reasoning_effort"] = req.reasoning_effort
            if p.logprobs is not None:
                body["logprobs"], body["top_logprobs"] = True, p.logprobs
            return "/chat/completions", body
        body["prompt"] = req.prompt
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
        return "/completions", body

    def _extensions(self, p: SamplingParams) -> dict[str, Any]:
        """Samplers outside OpenAI's API, sent only when changed from our defaults.

        vLLM and llama.cpp's family accept top_k and min_p; the repeat penalty is
        `repetition_penalty` on vLLM and `repeat_penalty` on the others. Unchanged,
        they are left out, so a strict upstream never sees a field it does not know.
        """
        out: dict[str, Any] = {}
        if p.top_k != _DEFAULTS.top_k:
            out["top_k"] = -1 if p.top_k == 0 and self.upstream_kind == "vllm" else p.top_k  # vLLM: -1 is "off"
        if p.min_p != _DEFAULTS.min_p:
            out["min_p"] = p.min_p
        if p.repeat_penalty != _DEFAULTS.repeat_penalty:
            out["repetition_penalty" if self.upstream_kind == "vllm" else "repeat_penalty"] = p.repeat_penalty
        return out

    async def _relay(
        self,
        req: GenerationRequest,
        path: str,
        body: dict[str, Any],
        progress: _Progress,
        deliver: Callable[[object], None],
    ) -> None:
        """Send one request and deliver its events (on the backend's thread). Cancelling it closes the upstream stream."""
        try:
            async with self._client.stream(
                "POST", f"{self.url}{path}", json=body, headers={"X-Request-Id": req.request_id}
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    deliver(self._refusal(response))
                    return
                progress.accepted = True
                deliver(TokenEvent(req.request_id, "", []))
                deliver(await self._read_stream(req, response, progress, deliver, chat="messages" in body))
        except httpx.HTTPError as exc:
            error = self._unreachable(exc)
            deliver(self._finish(req, progress, "error", str(error)) if progress.accepted else error)

    async def _read_stream(
        self,
        req: GenerationRequest,
        response: httpx.Response,
        progress: _Progress,
        deliver: Callable[[object], None],
        *,
        chat: bool,
    ) -> FinishEvent:
        reason: str | None = None
        thoughts = _Thoughts()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                return self._finish(req, progress, "error", f"the upstream sent a line that is not JSON: {data[:80]!r}")
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error") is not None:
                return self._finish(req, progress, "error", f"the upstream failed: {_error_text(chunk['error'])}")
            if isinstance(chunk.get("usage"), dict):
                progress.usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                text, logprobs = _chat_piece(choice) if chat else _completion_piece(choice)
                if chat:
                    text = thoughts.wrap(_reasoning_piece(choice), text)
                if text or logprobs:
                    now = time.perf_counter()
                    progress.first_at = progress.first_at or now
                    progress.last_at = now
                    count = len(logprobs) if logprobs else 1
                    progress.tokens += count
                    deliver(TokenEvent(req.request_id, text, [UNKNOWN_TOKEN] * count, logprobs))
                reason = choice.get("finish_reason") or reason
        if reason is None:
            return self._finish(req, progress, "error", f"the upstream at {self.url} ended the stream before the reply")
        return self._finish(req, progress, "length" if reason == "length" else "stop")

    def _finish(self, req: GenerationRequest, progress: _Progress, reason: FinishReason, error: str | None = None) -> FinishEvent:
        now = time.perf_counter()
        usage = progress.usage or Usage(prompt_tokens=0, completion_tokens=progress.tokens)
        ttft = (progress.first_at - progress.started) if progress.first_at else 0.0
        decode = (progress.last_at - progress.first_at) if progress.first_at and progress.last_at else 0.0
        timings = Timings(prompt_s=ttft, ttft_s=ttft, decode_s=decode, total_s=now - progress.started)
        return FinishEvent(req.request_id, reason, usage, timings, error)

    def _ended(self, req: GenerationRequest, future: concurrent.futures.Future, progress: _Progress) -> object:
        """The event for a relay that ended without delivering a finish: aborted, or broken."""
        if future.cancelled():
            return self._finish(req, progress, "abort")
        error = future.exception()
        if error is None:
            return self._finish(req, progress, "error", f"the upstream at {self.url} ended the request without a reply")
        return self._finish(req, progress, "error", f"the remote backend failed: {type(error).__name__}: {error}")

    def _record(self, finish: FinishEvent) -> None:
        self._finished += 1
        if finish.usage.completion_tokens:
            self._last_ttft_s = finish.timings.ttft_s
            self._last_rate = finish.timings.decode_tokens_per_s(finish.usage.completion_tokens)

    # -- errors and small calls ---------------------------------------------------------------
    def _unreachable(self, exc: httpx.HTTPError) -> UpstreamUnavailable:
        o = self.options
        if isinstance(exc, httpx.ConnectTimeout):
            return UpstreamUnavailable(f"the upstream at {self.url} did not accept a connection within {o.connect_timeout_s:g} s")
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamUnavailable(f"the upstream at {self.url} sent nothing for {o.read_timeout_s:g} s")
        if isinstance(exc, httpx.ConnectError):
            return UpstreamUnavailable(f"cannot reach the upstream at {self.url}: {_os_reason(exc)}")
        return UpstreamUnavailable(f"the connection to the upstream at {self.url} failed: {type(exc).__name__}: {exc}")

    def _refusal(self, response: httpx.Response) -> Exception:
        """An upstream's non-200 answer: its 4xx passes through; anything else is a gateway failure.

        401 and 403 are our key's problem with the upstream, not the client's with us: 502.
        """
        status, message = response.status_code, _message(response)
        if 400 <= status < 500 and status not in (401, 403):
            return UpstreamRefused(message, status, _error_code(response))
        return UpstreamUnavailable(f"the upstream at {self.url} answered {status}: {message}")

    async def _tokenizer_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.upstream_kind == "localllm":
            raise BadRequest(f"the upstream at {self.url} (localllm) has no {path} endpoint; tokenizing needs vLLM or llama.cpp's server")
        try:
            response = await self._client.post(f"{self.root}{path}", json=body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code in (404, 405):
            raise BadRequest(f"the upstream at {self.root} has no {path} endpoint: tokenizing is not supported there")
        if response.status_code != 200:
            raise self._refusal(response)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BackendError(f"the upstream at {self.root} answered {path} with something other than a JSON object")
        return answer

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the backend's loop and wait for it (for the synchronous methods)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)


# -- reading OpenAI's shapes -------------------------------------------------------------------------


def _no_embeddings() -> BadRequest:
    return BadRequest("the remote backend cannot compute embeddings; ask the upstream server directly")


def _chat_piece(choice: dict[str, Any]) -> tuple[str, list[dict] | None]:
    delta = choice.get("delta") or {}
    text = delta.get("content") if isinstance(delta.get("content"), str) else ""
    entries = (choice.get("logprobs") or {}).get("content") or []
    logprobs = [
        {
            "text": e.get("token", ""),
            "logprob": e.get("logprob", 0.0),
            "top": [{"text": t.get("token", ""), "logprob": t.get("logprob", 0.0)} for t in e.get("top_logprobs") or []],
        }
        for e in entries
        if isinstance(e, dict)
    ]
    return text, logprobs or None


def _reasoning_piece(choice: dict[str, Any]) -> str:
    """The reasoning in a chat chunk's delta: `reasoning_content` (vLLM, llama.cpp's server) or `reasoning` (Ollama, OpenRouter)."""
    delta = choice.get("delta") or {}
    for key in ("reasoning_content", "reasoning"):
        if isinstance(delta.get(key), str) and delta[key]:
            return delta[key]
    return ""


@dataclass
class _Thoughts:
    """Writes a reply's separately sent reasoning into its text as a local reasoning model would."""

    open: bool = False
    answered: bool = False  # answer text has been sent: the thoughts are over

    def wrap(self, reasoning: str, text: str) -> str:
        """The text for one chunk. Reasoning after the answer began (no upstream sends it) stays in the answer, not lost."""
        out = ""
        if reasoning and self.answered:
            out += reasoning
        elif reasoning:
            out += reasoning if self.open else OPEN + reasoning
            self.open = True
        if text:
            if self.open:
                out += CLOSE
                self.open = False
            self.answered = True
            out += text
        return out


def _completion_piece(choice: dict[str, Any]) -> tuple[str, list[dict] | None]:
    text = choice.get("text") if isinstance(choice.get("text"), str) else ""
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    logprobs = [
        {
            "text": token,
            "logprob": values[i] if i < len(values) and values[i] is not None else 0.0,
            "top": [{"text": t, "logprob": v} for t, v in (tops[i] or {}).items()] if i < len(tops) else [],
        }
        for i, token in enumerate(tokens)
    ]
    return text, logprobs or None


def _os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed connection ("Connection refused"), from the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and isinstance(seen.errno, int) and seen.errno > 0:
            return os.strerror(seen.errno).lower()  # asyncio words it "Connect call failed (...)"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()  # name resolution: negative codes with their own words
        seen = seen.__cause__ or seen.__context__
    return str(exc) or "connection failed"


def _usage(data: dict[str, Any]) -> Usage:
    details = data.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        completion_tokens=int(data.get("completion_tokens") or 0),
        cached_prompt_tokens=int(details.get("cached_tokens") or 0),
    )


def _message(response: httpx.Response) -> str:
    """The upstream's error message: OpenAI's `{"error": {"message"}}`, Ollama's `{"error": "..."}`, or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error") is not None:
        return _error_text(body["error"])
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    text = response.text.strip().splitlines()
    if text and not text[0].lstrip().startswith("<"):  # a line of plain text, not an HTML error page
        return text[0][:200]
    return f"the upstream answered {response.status_code} {response.reason_phrase} to {response.request.url}"


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_code(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
