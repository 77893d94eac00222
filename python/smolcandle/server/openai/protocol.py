"""OpenAI's request and response bodies, as pydantic models: quart-schema validates requests
with them and documents both at ``/openapi.json`` (the handlers build plain dicts)."""

from __future__ import annotations

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
from ..generations import REASONING_EFFORT
from ..limits import MAX_CHOICES, MAX_MESSAGES, MAX_TOOLS, bounded_schema

#: OpenAI's documented default of ``max_tokens`` for ``/v1/completions``.
COMPLETIONS_MAX_TOKENS = 16

# -- request bodies ------------------------------------------------------------------------


class _Lenient(BaseModel):
    # Clients send fields we do not use (metadata, store, …); they are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class MediaPart(_Lenient):
    """An image, audio or file part: read so that it can be refused in one clear sentence."""

    type: Literal["image_url", "input_audio", "file", "image", "audio", "input_image", "input_file", "input_audio_url"]


#: What a request with an image, audio or file part is told.
TEXT_ONLY = "this model reads text only"

#: The efforts the generation service maps (``REASONING_EFFORT``).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]
assert set(ReasoningEffort.__args__) == set(REASONING_EFFORT)  # type: ignore[attr-defined]


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | MediaPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(v)


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
        return bounded_schema(v)


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
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=f"choices to generate (at most {MAX_CHOICES}), decoded together as one batch")
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
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="none and minimal turn thinking off; low, medium and high turn it on with a reasoning budget of 256, 1024 and 4096 tokens"
    )
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


# -- the Responses API ----------------------------------------------------------------------


class ItemText(_Lenient):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal"]
    text: str = ""
    refusal: str | None = None


ItemContent = str | list[ItemText | MediaPart]


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: ItemContent


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    arguments: str = "{}"


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: ItemContent


class ReasoningItem(_Lenient):
    type: Literal["reasoning"]
    summary: list[ItemText] = Field(default_factory=list)
    content: list[ItemText] | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class ResponsesTool(_Lenient):
    type: Literal["function"] = Field(description="function tools only (no hosted tools)")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="ignored: a forced call always follows the schema")

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(v)


class FunctionChoice(_Lenient):
    type: Literal["function"]
    name: str


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON Schema; enforced while sampling")
    strict: bool | None = Field(None, description="ignored: the schema is always enforced")

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(v)

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs its schema")
        return self


class TextConfig(_Lenient):
    format: TextFormat | None = None


class ReasoningConfig(_Lenient):
    effort: ReasoningEffort | None = Field(
        None, description="none and minimal turn thinking off; low, medium and high turn it on with a reasoning budget of 256, 1024 and 4096 tokens"
    )


class ResponsesRequest(_Lenient):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1, description="extension: keep the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="extension")
    stream: bool = False
    store: bool = Field(True, description="keep the response (in the server's history database) for previous_response_id and GET")
    previous_response_id: str | None = Field(None, max_length=128)
    prompt_cache_key: str | None = Field(None, max_length=256)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @field_validator("input", mode="before")
    @classmethod
    def _bounded_input(cls, v: Any) -> Any:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_MESSAGES:
            raise ValueError(f"input holds {len(v)} items; it may hold 1 to {MAX_MESSAGES}")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _needs_tools(cls, v: Any, info: ValidationInfo) -> Any:
        if (v == "required" or isinstance(v, FunctionChoice)) and not info.data.get("tools"):
            raise ValueError("a forced tool_choice needs tools")
        return v


class ResponseObject(BaseModel):
    """A response; with ``stream: true``, ``text/event-stream`` of the Responses API's semantic
    events (``response.created`` … ``response.completed``), each with its ``sequence_number``."""

    stream_content: ClassVar[bool] = True
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
    previous_response_id: str | None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


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
