"""OpenAI's request and response bodies, as pydantic models: quart-schema validates requests
with them and documents both at ``/openapi.json`` (the handlers build plain dicts)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ... import DEFAULTS
from ..limits import MAX_MESSAGES, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_TOOLS

#: OpenAI's documented default of ``max_tokens`` for ``/v1/completions``.
COMPLETIONS_MAX_TOKENS = 16

# -- request bodies ------------------------------------------------------------------------


class _Lenient(BaseModel):
    # Clients send fields we do not use (metadata, store, …); they are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


def _bounded_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A schema within the size and nesting limits (each constraint is compiled per request)."""
    if schema is None:
        return None
    if schema_depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema takes {size} bytes, more than {MAX_SCHEMA_BYTES}")
    return schema


def schema_depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _bounded_schema(v)


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON Schema; enforced while sampling")
    strict: bool | None = Field(None, description="ignored: the schema is always enforced")

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any] | None:
        return _bounded_schema(v)


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1, description="extension: keep the k most likely tokens (0: all)")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="extension: llama.cpp's repeat penalty")
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = Field(None, max_length=4, description="up to 4 strings; generation ends before any of them")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1 choice per request")
    user: str | None = None
    prompt_cache_key: str | None = Field(
        None,
        max_length=256,
        description="requests with the same key (and API key) may reuse each other's computed prefix; without one, nothing is shared",
    )


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=DEFAULTS["max_top_logprobs"])
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required or a named function: exactly one call, its arguments following the tool's schema"
    )
    parallel_tool_calls: bool | None = None
    enable_thinking: bool | None = Field(None, description="extension: SmolLM3 reasoning on or off")
    max_reasoning_tokens: int | None = Field(
        None, ge=0, le=2**31 - 1, description="extension: at most this many tokens of reasoning; then the reasoning is closed and the answer follows"
    )

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _needs_tools(cls, v: Any, info: ValidationInfo) -> Any:
        if v == "required" or isinstance(v, NamedToolChoice):
            if not info.data.get("tools"):
                raise ValueError("a forced tool_choice needs tools")
            fmt = info.data.get("response_format")
            if fmt is not None and fmt.type != "text":
                raise ValueError("response_format and a forced tool_choice cannot be combined")
        return v


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(description="one prompt (a list must hold exactly one)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probabilities of the tokens and of this many alternatives")
    suffix: Literal[""] | None = Field(None, description="fill-in-the-middle is not supported")


# -- response bodies (documentation; the handlers build plain dicts) ---------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int
    accepted_prediction_tokens: int = Field(description="draft tokens (speculative decoding) kept in the completion")
    rejected_prediction_tokens: int = Field(description="draft tokens verified and not kept")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class _CompletionHead(BaseModel):
    stream_content: ClassVar[bool] = True  # with ``stream: true`` the answer is an event stream
    id: str
    created: int
    model: str
    system_fingerprint: str
    usage: UsageOut


class ChatCompletion(_CompletionHead):
    """A chat completion; with ``stream: true``, ``text/event-stream`` of chat.completion.chunk
    objects ending with ``data: [DONE]``."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(_CompletionHead):
    """A text completion; with ``stream: true``, ``text/event-stream`` of text_completion
    objects ending with ``data: [DONE]``."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """An error, in OpenAI's shape."""

    error: ErrorDetail


ERRORS = {status: (ErrorResponse, None) for status in (400, 401, 404, 429, 503)}
