"""Request body of OpenAI's Responses API (POST /v1/responses), as a pydantic model.

The field policy is schemas.py's: fields that cannot change the answer are
accepted and ignored (`metadata`, `user`, `safety_identifier`,
`prompt_cache_key`, `service_tier`, `parallel_tool_calls`, `reasoning` on
models that do not reason, `truncation: "disabled"`, ...); fields that would
change it and cannot be honoured are a 400 naming them (responses_items.py
checks their values: built-in tools, `background: true`, ...); names the API
does not have are refused as unknown, as OpenAI does. Input items, tools and
formats stay plain dicts here so responses_items.py can word a 400 that names
the exact item it cannot take.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: str | None = None  # only "medium", the default


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None  # accepted; we add no obfuscation padding


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "starter", "input": "Hello!", "max_output_tokens": 16},
                {
                    "model": "starter",
                    "instructions": "Answer in JSON.",
                    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Two colours?"}]}],
                    "text": {"format": {"type": "json_object"}},
                    "max_output_tokens": 16,
                    "stream": True,
                },
            ]
        },
    )
    model: str = Field(min_length=1)
    input: Union[str, list[dict[str, Any]]] = Field(default_factory=list)
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    text: TextConfig | None = None
    # accepted because they do not change the answer
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    reasoning: dict[str, Any] | None = None  # effort "none"/"minimal" turns a switchable template's thinking off
    include: list[str] | None = None  # "message.output_text.logprobs" adds logprobs; other parts are accepted, none here to add
    truncation: str | None = None  # only "disabled", the default
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # alternatives per token, with include's logprobs
    # known to OpenAI, refused by name when set (they would change the answer)
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
