"""Anthropic's Messages request bodies, as pydantic models (quart-schema validates requests with
them and documents them at ``/openapi.json``; the handlers build plain dicts)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..limits import MAX_MESSAGES, MAX_STOPS, MAX_TOOLS, bounded_schema

#: What a request with an image or a document is told.
TEXT_ONLY = "this model reads text only"


class _Lenient(BaseModel):
    # Fields we do not use (citations, metadata…) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class _Cacheable(_Lenient):
    #: A cache breakpoint: the request asks that its prefix be kept and reused (see ``cached``).
    cache_control: dict[str, Any] | None = None


class TextBlock(_Cacheable):
    type: Literal["text"]
    text: str


class MediaBlock(_Lenient):
    """An image or a document: read so that it can be refused in one clear sentence."""

    type: Literal["image", "document", "search_result", "container_upload"]


class ToolUseBlock(_Cacheable):
    type: Literal["tool_use"]
    id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Cacheable):
    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=256)
    content: str | list[TextBlock | MediaBlock] = ""
    is_error: bool | None = None


class ThinkingBlock(_Lenient):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    type: Literal["redacted_thinking"]
    data: str = ""


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock | MediaBlock


class Message(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDef(_Cacheable):
    type: Literal["custom"] | None = Field(None, description="custom tools only (no server tools)")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    @field_validator("input_schema")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        bounded_schema(v)
        return v


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type tool needs the tool's name")
        return self


class ThinkingEnabled(_Lenient):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1, le=2**31 - 1, description="the reasoning budget: the engine closes the reasoning after this many tokens")


class ThinkingDisabled(_Lenient):
    type: Literal["disabled"]


class ThinkingAdaptive(_Lenient):
    """Thinking on, within the server's reasoning budget."""

    type: Literal["adaptive"]


class CountTokensRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")] | None = None
    cache_control: dict[str, Any] | None = Field(None, description="a breakpoint at the end of the prompt: its prefix is kept and reused")

    def cached(self) -> bool:
        """Whether any block or tool carries a ``cache_control`` breakpoint."""
        blocks: list[Any] = [*(self.tools or []), *(self.system if isinstance(self.system, list) else [])]
        blocks += [b for m in self.messages if isinstance(m.content, list) for b in m.content]
        return self.cache_control is not None or any(getattr(b, "cache_control", None) for b in blocks)

    @model_validator(mode="after")
    def _choice_needs_tools(self) -> CountTokensRequest:
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice.type} needs tools")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOPS)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False


# -- response bodies (documentation) -------------------------------------------------------


class Usage(BaseModel):
    input_tokens: int = Field(description="prompt tokens computed (those read from the cache are not counted here)")
    output_tokens: int
    cache_read_input_tokens: int = Field(description="prompt tokens whose keys and values were reused from an earlier request")
    cache_creation_input_tokens: int


class MessageResponse(BaseModel):
    """A message; with ``stream: true``, ``text/event-stream`` of Anthropic's events
    (``message_start`` … ``message_stop``)."""

    stream_content: ClassVar[bool] = True
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """An error, in Anthropic's shape."""

    type: Literal["error"]
    error: ErrorDetail


ERRORS = {status: (ErrorResponse, None) for status in (400, 401, 404, 429, 503)}
