"""``POST /v1/chat/completions``: a conversation answered whole, or streamed as
``chat.completion.chunk`` events ending with ``data: [DONE]``."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Response
from quart_schema import document, validate_request

from ...chat import (
    ChatDone,
    ChatResult,
    ContentDelta,
    ContextWarning,
    ReasoningDelta,
    ToolCallEvent,
    tool_call_grammar,
)
from ...errors import InvalidParameterError
from ..state import current
from ..streaming import sse_response
from . import serving
from .errors import ApiError
from .protocol import ERRORS, ChatCompletion, ChatCompletionRequest, NamedToolChoice

DOOR = "openai"
SYSTEM_FINGERPRINT = serving.SYSTEM_FINGERPRINT


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in body.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": serving.text(m.content)}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": serving.json_or_text(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def _logprobs(model: Any, logprobs: Any, n_top: int) -> dict[str, Any]:
    return {
        "content": [
            {**serving.token(model, lp.token_id, lp.logprob), "top_logprobs": [serving.token(model, t, v) for t, v in lp.top_logprobs[:n_top]]}
            for lp in logprobs
        ]
    }


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


@validate_request(ChatCompletionRequest)
@document(responses={200: (ChatCompletion, None), **ERRORS})
async def chat_completions(data: ChatCompletionRequest) -> Response:
    model = serving.require_model(data.model)
    state = current()
    tools = [t.model_dump(exclude_none=True) for t in data.tools] if data.tools and data.tool_choice != "none" else None
    options = serving.sampling(data) | _constraint(data, tools)
    n_top = data.top_logprobs or 0
    if data.logprobs:
        options["logprobs"] = n_top
    events = await state.generations.chat(
        serving.caller(data),
        DOOR,
        _messages(data),
        enable_thinking=data.enable_thinking,
        tools=tools,
        max_tokens=data.max_completion_tokens or data.max_tokens,
        max_reasoning_tokens=data.max_reasoning_tokens,
        **options,
    )
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": serving.model_id(state), "system_fingerprint": SYSTEM_FINGERPRINT}

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
        logprobs = _logprobs(model, result.logprobs, n_top) if data.logprobs else None
        body = {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}],
            "usage": serving.usage(result.usage),
        }
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def stream() -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
            return serving.sse({**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        n_calls = 0
        async for ev in events:
            if isinstance(ev, ContentDelta) and ev.text:
                yield chunk({"content": ev.text}, logprobs=_logprobs(model, ev.logprobs, n_top) if data.logprobs else None)
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
                    yield serving.sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": serving.usage(ev.usage)})
        yield serving.DONE

    return sse_response(stream())
