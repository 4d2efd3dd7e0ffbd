"""Request bodies of Anthropic's Messages API, as pydantic models (they also make /openapi.json).

Anthropic's SDK and Claude Code add fields as the API grows (`cache_control`
on blocks, `service_tier`, `context_management`, ...); fields that do not
change the answer pass, so a client's next upgrade does not break it. Content
blocks stay plain dicts here: anthropic_messages.py reads them and answers a
400 that names the block it cannot take (an image, a server tool's result).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, ...
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; Anthropic's own server tools are refused by name


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: str | None = None  # how hard a reasoning model thinks: accepted, no effect here
    format: OutputFormat | None = None  # structured output: a grammar makes the reply match the schema


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    # Extended thinking: {type: enabled|disabled} turns a reasoning template's thinking on or off.
    thinking: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    # Sampling: current SDKs send these only through extra_body; older ones and Claude Code send them.
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    stream: bool | None = None
    output_config: OutputConfig | None = None
