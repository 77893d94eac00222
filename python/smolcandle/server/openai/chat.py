"""``POST /v1/chat/completions``: a conversation answered whole, or streamed as
``chat.completion.chunk`` events ending with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
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
from .. import doors
from ..state import current
from ..streaming import sse_response
from . import serving
from .errors import ApiError
from .protocol import ERRORS, ChatCompletion, ChatCompletionRequest, NamedToolChoice

DOOR = "openai"
SYSTEM_FINGERPRINT = serving.SYSTEM_FINGERPRINT


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(body.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": serving.text(m.content, f"messages[{i}]")}
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


def thinking(data: ChatCompletionRequest) -> dict[str, Any]:
    """The thinking keywords: ``reasoning_effort`` mapped by the generation service, where
    ``enable_thinking`` and ``max_reasoning_tokens`` (the extensions) do not say otherwise."""
    mapped = current().generations.thinking(effort=data.reasoning_effort) if data.reasoning_effort else {}
    return {
        "enable_thinking": data.enable_thinking if data.enable_thinking is not None else mapped.get("enable_thinking"),
        "max_reasoning_tokens": data.max_reasoning_tokens if data.max_reasoning_tokens is not None else mapped.get("max_reasoning_tokens"),
    }


async def _whole(events: Any) -> ChatResult:
    result = ChatResult()
    async for ev in events:
        result.add(ev)
    return result.finish()


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
    n = data.n or 1
    keywords = {"tools": tools, "max_tokens": data.max_completion_tokens or data.max_tokens, **thinking(data), **options}
    messages = _messages(data)
    caller = doors.caller(data.prompt_cache_key)
    if n == 1:
        generations = [await state.generations.chat(caller, DOOR, messages, **keywords)]
    else:
        generations = await state.generations.chat_choices(n, caller, DOOR, messages, **keywords)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": serving.model_id(state), "system_fingerprint": SYSTEM_FINGERPRINT}

    if not data.stream:
        results = await asyncio.gather(*(_whole(g) for g in generations))
        choices = []
        for i, result in enumerate(results):
            message = result.to_message()
            if result.tool_calls and not result.content:
                message["content"] = None  # OpenAI's shape for a message that is only tool calls
            if result.reasoning:
                message["reasoning_content"] = result.reasoning
            logprobs = _logprobs(model, result.logprobs, n_top) if data.logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason})
        body = {**head, "object": "chat.completion", "choices": choices, "usage": serving.choices_usage([r.usage for r in results])}
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def stream() -> AsyncIterator[bytes]:
        def chunk(i: int, delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
            return serving.sse({**head, "object": "chat.completion.chunk", "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        n_calls = [0] * n
        usages: list[Any] = [None] * n
        async for i, ev in serving.merged(generations):
            if isinstance(ev, ContentDelta) and ev.text:
                yield chunk(i, {"content": ev.text}, logprobs=_logprobs(model, ev.logprobs, n_top) if data.logprobs else None)
            elif isinstance(ev, ReasoningDelta) and ev.text:
                yield chunk(i, {"reasoning_content": ev.text})
            elif isinstance(ev, ToolCallEvent):
                yield chunk(i, {"tool_calls": [{"index": n_calls[i], **ev.call.to_message()}]})
                n_calls[i] += 1
            elif isinstance(ev, ContextWarning):
                continue
            elif isinstance(ev, ChatDone):
                usages[i] = ev.usage
                yield chunk(i, {}, ev.finish_reason)
        if include_usage:
            yield serving.sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": serving.choices_usage(usages)})
        yield serving.DONE

    return sse_response(stream())
