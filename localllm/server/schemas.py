"""Request bodies of both API families, as pydantic models (they also make /openapi.json).

Which fields a request may carry, the policy:

* A field the API knows and we honour is applied (sampling, tools, formats,
  `n` up to MAX_CHOICES, `stream_options`, `parallel_tool_calls`).
* A field the API knows that cannot change the answer is accepted and
  ignored: bookkeeping (`user`, `metadata`, `store`, `safety_identifier`),
  caching and scheduling hints (`prompt_cache_key`, `prompt_cache_retention`,
  `prompt_cache_options`, `service_tier`), `prediction` (it only saves time),
  `modalities: ["text"]`, and `reasoning_effort` beyond turning thinking
  off ("none", "minimal") or on (any other effort), which is all a template
  can be told.
* A field the API knows that would change the answer and that we cannot
  honour is a 400 naming it (`audio`, `web_search_options`, `functions`,
  `moderation`, a non-empty `logit_bias`, ...). The same field at the value
  that changes nothing (`verbosity: "medium"`, `modalities: ["text"]`) passes.
* OpenAI requests refuse names the API does not have, as OpenAI does
  ("unrecognized request argument"), so a typo is not silently dropped.
  Ollama's server ignores unknown fields (Go's JSON decoding) and so do we;
  Ollama's documented options are accepted (see ollama_routes.OPTIONS_IGNORED).

Responses are built as plain dicts in the routes, to match each API's shape
field for field.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 8  # `n`: choices generated side by side for one request
# -- shared -------------------------------------------------------------------------


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDef


# -- OpenAI ---------------------------------------------------------------------------


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    # Clients send back the assistant messages they received, with fields such as
    # `refusal`, `annotations` or `audio`; those are accepted and not rendered.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; we add no obfuscation padding


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class _OpenAISampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama.cpp's extensions, as its own server accepts them
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)


class ChatCompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "starter", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
                {
                    "model": "starter",
                    "messages": [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Two colours?"}],
                    "max_tokens": 8,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "response_format": {"type": "json_object"},
                },
            ]
        },
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    # accepted because they do not change the answer
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # "none"/"minimal" turn thinking off where the template can, others on
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's and llama.cpp's: e.g. {"enable_thinking": false}
    modalities: list[str] | None = None  # only ["text"]
    verbosity: str | None = None  # only "medium", the default
    # known to OpenAI, refused by name when set
    audio: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    moderation: Any = None


class CompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "starter", "prompt": "The capital of France is", "max_tokens": 8, "stop": ["."]}]},
    )
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this route
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


# -- Ollama ---------------------------------------------------------------------------


class OllamaOptions(BaseModel):
    # Unknown options are ignored with a log line, as Ollama does.
    model_config = ConfigDict(extra="allow")
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    num_predict: int | None = None
    num_ctx: int | None = Field(default=None, ge=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # documented by Ollama; accepted, and ignored where they cannot apply (ollama_routes.OPTIONS_IGNORED)
    num_keep: int | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    penalize_newline: bool | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    num_thread: int | None = None


class OllamaToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    function: OllamaToolCallFunction


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


JsonFormat = Union[Literal["", "json"], dict[str, Any], None]
KeepAlive = Union[str, float, None]


class _OllamaGenerationBase(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    stream: bool | None = True
    format: JsonFormat = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class OllamaChatRequest(_OllamaGenerationBase):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "starter", "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 8}}]
        },
    )
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[ToolDef] | None = None


class OllamaGenerateRequest(_OllamaGenerationBase):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "starter", "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 8}}]
        },
    )
    prompt: str | None = None
    system: str | None = None
    raw: bool | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class OllamaModelRequest(BaseModel):
    """/api/show and /api/pull: `model`, or the older `name`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1)
    verbose: bool | None = None
    insecure: bool | None = None
    stream: bool | None = True

    def model_name(self) -> str | None:
        return self.model or self.name
