"""The OpenAI-compatible API under ``/v1``: chat completions, completions, models.

Requests are validated by pydantic models through quart-schema (which also documents them at
``/openapi.json``); every failure comes back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for bad input. Each
generation's token stream is read on a worker thread and handed to the event loop; when the
client goes away (a closed stream, or a dropped non-streaming request) the generation is
cancelled and its slot freed.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from quart import Blueprint, Response, current_app, request
from quart_schema import RequestSchemaValidationError, document, validate_request
from werkzeug.exceptions import HTTPException

from .. import DEFAULTS, __version__
from ..chat import (
    ChatDone,
    ChatResult,
    ChatStream,
    ContentDelta,
    ContextWarning,
    ReasoningDelta,
    ToolCallEvent,
    tool_call_grammar,
)
from ..errors import (
    BusyError,
    ContextLengthError,
    InvalidParameterError,
    SmolcandleError,
)
from .state import ServerState
from .streaming import Relay, sse_response

api = Blueprint("api", __name__, url_prefix="/v1")

SYSTEM_FINGERPRINT = f"smolcandle-{__version__}"


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
    if schema_depth(schema) > DEFAULTS["max_schema_depth"]:
        raise ValueError(f"the schema nests deeper than {DEFAULTS['max_schema_depth']} levels")
    size = len(json.dumps(schema))
    if size > DEFAULTS["max_schema_bytes"]:
        raise ValueError(f"the schema takes {size} bytes, more than {DEFAULTS['max_schema_bytes']}")
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


class _Sampling(_Lenient):
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


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=DEFAULTS["max_messages"])
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=DEFAULTS["max_top_logprobs"])
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=DEFAULTS["max_tools"])
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


class CompletionRequest(_Sampling):
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


_ERRORS = {status: (ErrorResponse, None) for status in (400, 401, 404, 429, 503)}


# -- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Response(json.dumps(body), self.status, mimetype="application/json", headers=headers)


@api.errorhandler(ApiError)
async def _api_error(e: ApiError) -> Response:
    return e.response()


@api.errorhandler(RequestSchemaValidationError)
async def _invalid_body(e: RequestSchemaValidationError) -> Response:
    err = e.validation_error
    if isinstance(err, TypeError | ValueError) and not hasattr(err, "errors"):
        return ApiError(400, f"the request body is not valid: {err}").response()
    first = err.errors()[0]  # type: ignore[union-attr]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param).response()


@api.errorhandler(HTTPException)
async def _http_error(e: HTTPException) -> Response:
    status = e.code or 500
    if status == 400:
        return ApiError(400, "the request body is not valid JSON").response()
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, e.description or e.name, type=kind, code=e.name.lower().replace(" ", "_")).response()


@api.errorhandler(RecursionError)
async def _too_deep(e: RecursionError) -> Response:
    return ApiError(400, "the request body is nested too deeply").response()


@api.errorhandler(UnicodeDecodeError)
async def _not_utf8(e: UnicodeDecodeError) -> Response:
    return ApiError(400, "the request body is not valid UTF-8 JSON").response()


# Engine parameters that stand for a differently named API field.
_API_PARAMS = {"json_schema": "response_format", "grammar": "tool_choice"}


# Seconds a refused client is told to wait before it asks again.
RETRY_AFTER_SECONDS = 2


def _engine_error(e: SmolcandleError) -> ApiError:
    if isinstance(e, BusyError):
        return ApiError(503, str(e), type="server_error", code="server_overloaded", retry_after=RETRY_AFTER_SECONDS)
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return ApiError(400, str(e), param=_API_PARAMS.get(e.param or "", e.param))
    return ApiError(500, str(e), type="server_error")


# -- access ----------------------------------------------------------------------------------


def _state() -> ServerState:
    return current_app.extensions["smolcandle"]


@api.before_request
async def _access() -> Response | None:
    state = _state()
    if request.method == "OPTIONS" and state.cors_origins:
        return Response("", 204)
    if state.api_key and not state.bearer_matches(request.headers.get("Authorization")):
        return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key").response()
    return None


@api.after_request
async def _cors(response: Response) -> Response:
    origins = _state().cors_origins
    origin = request.headers.get("Origin")
    if origins and origin and ("*" in origins or origin in origins):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    return response


# -- helpers ---------------------------------------------------------------------------------


def _model_id(state: ServerState) -> str | None:
    name = state.model.name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name or None


def _require_model(requested: str) -> Any:
    state = _state()
    served = _model_id(state)
    if served is None or requested not in (served, state.model.name):
        known = f"; this server serves {served!r}" if served else ""
        raise ApiError(404, f"the model {requested!r} does not exist{known}", param="model", code="model_not_found")
    reason = state.model.unavailable_reason
    if reason is not None or state.model.model is None:
        raise ApiError(503, reason or "no model", type="server_error", code="model_unavailable")
    return state.model.model


def _sampling(body: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    settings = _state().settings
    return {
        "max_tokens": max_tokens or settings.max_tokens,
        "temperature": body.temperature if body.temperature is not None else settings.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k or None,
        "min_p": body.min_p,
        "repeat_penalty": body.repetition_penalty,
        "frequency_penalty": body.frequency_penalty or None,
        "presence_penalty": body.presence_penalty or None,
        "seed": body.seed,
        "stop": stop or None,
    }


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in body.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in m.tool_calls
            ]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _usage(u: Any) -> dict[str, Any]:
    if u is None:
        return {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        # Prompt tokens whose keys and values were reused from an earlier request.
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        # Speculative decoding's drafts, under the names OpenAI gives a prediction's tokens.
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning_tokens,
            "accepted_prediction_tokens": u.accepted_tokens,
            "rejected_prediction_tokens": u.drafted_tokens - u.accepted_tokens,
        },
    }


def _token(model: Any, token_id: int, logprob: float) -> dict[str, Any]:
    raw = model.token_bytes(token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def _chat_logprobs(model: Any, logprobs: Any, n_top: int) -> dict[str, Any]:
    return {
        "content": [
            {**_token(model, lp.token_id, lp.logprob), "top_logprobs": [_token(model, t, v) for t, v in lp.top_logprobs[:n_top]]} for lp in logprobs
        ]
    }


def _completion_logprobs(model: Any, logprobs: Any, offset: int) -> dict[str, Any]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        token = model.token_bytes(lp.token_id).decode("utf-8", "replace")
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({model.token_bytes(t).decode("utf-8", "replace"): v for t, v in lp.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def _constraint(data: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The generate() keywords that enforce ``response_format`` or a forced ``tool_choice``."""
    fmt = data.response_format
    if fmt is not None and fmt.type == "json_object":
        return {"json_schema": {"type": "object"}}
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        return {"json_schema": fmt.json_schema.schema_ or {"type": "object"}}
    choice = data.tool_choice
    if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        try:
            return {"grammar": tool_call_grammar(tools, name)}
        except InvalidParameterError as e:
            raise ApiError(400, str(e), param="tool_choice") from e
    return {}


def _tenant(body: _Sampling) -> dict[str, Any]:
    """The generate() keywords that keep cached prefixes within one client: requests reuse
    each other's only when they name the same ``prompt_cache_key``; without one, a request
    neither reuses nor leaves anything (an anonymous client cannot be told from another)."""
    if body.prompt_cache_key is None:
        return {"reuse_prefix": False}
    return {"tenant": f"v1:{body.prompt_cache_key}"}


def _client() -> str:
    """Who a request counts against for the per-client limit: the API key when the server has
    one (every holder of it together), else the peer's address."""
    return "api-key" if _state().api_key else f"addr:{request.remote_addr}"


async def _events(start: Callable[[threading.Event], Any]) -> tuple[Any, AsyncIterator[Any]]:
    """Starts a generation (``start`` returns a ChatStream or TokenStream; its errors are
    raised here, before any response is sent) and returns it with an async iterator of its
    items. Leaving the iterator early (a disconnect) cancels the generation. A draining
    server refuses with 503, a client at its limit of generations at once with 429."""
    state = _state()
    if state.draining:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down", retry_after=RETRY_AFTER_SECONDS)
    client = _client()
    held = state.api_clients.get(client, 0)
    if held >= state.per_client_limit():
        raise ApiError(
            429,
            f"this client already has {held} generations under way, its limit; wait for one to end",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after=RETRY_AFTER_SECONDS,
        )
    state.api_clients[client] = held + 1

    def release() -> None:
        left = state.api_clients.get(client, 1) - 1
        if left > 0:
            state.api_clients[client] = left
        else:
            state.api_clients.pop(client, None)

    try:
        relay: Relay[Any] = await Relay.start(start, observe=state.metrics.observe_generation)
    except BaseException:
        release()
        raise
    state.api_relays.add(relay)

    async def iterate() -> AsyncIterator[Any]:
        state.api_active += 1
        try:
            async for item in relay:
                yield item
        finally:
            state.api_active -= 1
            state.api_relays.discard(relay)
            release()
            if not relay.finished:
                relay.cancel()
                state.api_cancelled += 1

    return relay.stream, iterate()


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


# -- endpoints -------------------------------------------------------------------------------


@api.get("/models")
@document(responses={200: (ModelList, None), 401: (ErrorResponse, None)})
async def list_models() -> Response:
    state = _state()
    served = _model_id(state)
    created = int(state.model.path.stat().st_mtime) if state.model.path is not None and state.model.path.exists() else int(time.time())
    data = [{"id": served, "object": "model", "created": created, "owned_by": "smolcandle"}] if served and state.model.state in ("ready", "loading") else []
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


@api.post("/chat/completions")
@validate_request(ChatCompletionRequest)
@document(responses={200: (ChatCompletion, None), **_ERRORS})
async def chat_completions(data: ChatCompletionRequest) -> Response:
    model = _require_model(data.model)
    sampling = _sampling(data, data.max_completion_tokens or data.max_tokens)
    tools = [t.model_dump(exclude_none=True) for t in data.tools] if data.tools and data.tool_choice != "none" else None
    messages = _messages(data)
    max_tokens = sampling.pop("max_tokens")
    sampling.update(_constraint(data, tools))
    n_top = data.top_logprobs or 0
    if data.logprobs:
        sampling["logprobs"] = n_top

    sampling.update(_tenant(data), client=_client())

    def start(cancel: threading.Event) -> ChatStream:
        return model.chat(
            messages,
            enable_thinking=data.enable_thinking,
            tools=tools,
            max_tokens=max_tokens,
            cancel=cancel,
            max_reasoning_tokens=data.max_reasoning_tokens if data.max_reasoning_tokens is not None else _state().settings.max_reasoning_tokens,
            **sampling,
        )

    try:
        _, events = await _events(start)
    except SmolcandleError as e:
        raise _engine_error(e) from e
    cid, created, model_id = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), _model_id(_state())
    head = {"id": cid, "created": created, "model": model_id, "system_fingerprint": SYSTEM_FINGERPRINT}

    if not data.stream:
        result = ChatResult()
        async for ev in events:
            result.add(ev)
        result.finish()
        message = result.to_message()
        if result.tool_calls and not result.content:
            message["content"] = None  # OpenAI's shape for a message that is only tool calls
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        logprobs = _chat_logprobs(model, result.logprobs, n_top) if data.logprobs else None
        body = {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}],
            "usage": _usage(result.usage),
        }
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def stream() -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
            return _sse({**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        n_calls = 0
        async for ev in events:
            if isinstance(ev, ContentDelta) and ev.text:
                yield chunk({"content": ev.text}, logprobs=_chat_logprobs(model, ev.logprobs, n_top) if data.logprobs else None)
            elif isinstance(ev, ReasoningDelta) and ev.text:
                yield chunk({"reasoning_content": ev.text})
            elif isinstance(ev, ToolCallEvent):
                yield chunk({"tool_calls": [{"index": n_calls, **ev.call.to_message()}]})
                n_calls += 1
            elif isinstance(ev, ContextWarning):
                continue
            elif isinstance(ev, ChatDone):
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ev.usage)})
        yield b"data: [DONE]\n\n"

    return sse_response(stream())


@api.post("/completions")
@validate_request(CompletionRequest)
@document(responses={200: (Completion, None), **_ERRORS})
async def completions(data: CompletionRequest) -> Response:
    model = _require_model(data.model)
    prompt = data.prompt if isinstance(data.prompt, str) else data.prompt[0]
    sampling = _sampling(data, data.max_tokens or 16)
    if data.logprobs is not None:
        sampling["logprobs"] = data.logprobs
    sampling.update(_tenant(data), client=_client())

    try:
        stream, events = await _events(lambda _cancel: model.generate(prompt, **sampling))
    except SmolcandleError as e:
        raise _engine_error(e) from e
    cid, created, model_id = f"cmpl-{secrets.token_hex(12)}", int(time.time()), _model_id(_state())
    head = {"id": cid, "created": created, "model": model_id, "system_fingerprint": SYSTEM_FINGERPRINT}

    def finish_reason() -> str:
        return stream.finish_reason if stream.finish_reason in ("stop", "length") else "stop"

    start = len(prompt) if data.echo else 0

    if not data.stream:
        chunks = [c async for c in events]
        text = "".join(c.text for c in chunks)
        logprobs = _completion_logprobs(model, [lp for c in chunks for lp in c.logprobs], start) if data.logprobs is not None else None
        body = {
            **head,
            "object": "text_completion",
            "choices": [{"index": 0, "text": (prompt if data.echo else "") + text, "logprobs": logprobs, "finish_reason": finish_reason()}],
            "usage": _usage(stream.usage),
        }
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def body() -> AsyncIterator[bytes]:
        def chunk(text: str, finish: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
            return _sse({**head, "object": "text_completion", "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        if data.echo:
            yield chunk(prompt)
        offset = start
        async for c in events:
            if c.text:
                yield chunk(c.text, logprobs=_completion_logprobs(model, c.logprobs, offset) if data.logprobs is not None else None)
                offset += len(c.text)
        yield chunk("", finish_reason())
        if include_usage:
            yield _sse({**head, "object": "text_completion", "choices": [], "usage": _usage(stream.usage)})
        yield b"data: [DONE]\n\n"

    return sse_response(body())
