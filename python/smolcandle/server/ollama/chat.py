"""``POST /api/chat`` and ``POST /api/generate``: answers streamed as newline-delimited JSON
objects (``done: false`` with each piece, then one ``done: true`` with ``done_reason`` and the
timings), or whole with ``"stream": false``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Response

from ... import DEFAULTS
from ...chat import ChatDone, ChatResult, ContentDelta, ReasoningDelta, ToolCallEvent
from ...errors import SmolcandleError
from .. import doors
from ..state import current
from . import serving
from .errors import OllamaError
from .protocol import ChatRequest, GenerateRequest, Message

DOOR = "ollama"


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.images:
            raise OllamaError(400, serving.TEXT_ONLY)
        msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls
            ]
        if m.role == "tool" and (m.tool_name or m.name):
            msg["name"] = m.tool_name or m.name
        if m.thinking:
            msg["reasoning_content"] = m.thinking
        out.append(msg)
    return out


def _arguments(arguments: dict[str, Any] | str) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _tool_call(call: Any) -> dict[str, Any]:
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


def _whole(obj: Any) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), mimetype="application/json")


def _ndjson(pieces: AsyncIterator[bytes]) -> Response:
    """A stream of JSON lines, never buffered by a proxy and never timed out."""
    response = Response(pieces, 200, mimetype="application/x-ndjson", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response


def _loaded(name: str, key: str) -> Response:
    """An empty request loads the model in Ollama; here it is loaded already."""
    empty: dict[str, Any] = {"role": "assistant", "content": ""} if key == "message" else ""
    return _whole({"model": name, "created_at": serving.now(), key: empty, "done": True, "done_reason": "load"})


async def chat() -> Response:
    started = time.perf_counter()
    body = await serving.body(ChatRequest)
    serving.require_model(body.model)
    state = current()
    name = serving.served_name(state)
    if not body.messages:
        return _loaded(name or body.model, "message")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    events = await state.generations.chat(
        doors.caller(),
        DOOR,
        _messages(body.messages),
        enable_thinking=serving.thinking(body.think),
        tools=tools,
        max_tokens=serving.max_tokens(body.options),
        **serving.sampling(body.options),
        **serving.constraint(body.format),
    )

    def head() -> dict[str, Any]:
        return {"model": name, "created_at": serving.now()}

    if not body.stream:
        result = ChatResult()
        async for ev in events:
            result.add(ev)
        result.finish()
        message: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.reasoning:
            message["thinking"] = result.reasoning
        if result.tool_calls:
            message["tool_calls"] = [_tool_call(c) for c in result.tool_calls]
        whole = {**head(), "message": message, "done": True, "done_reason": serving.done_reason(result.finish_reason), **serving.timings(started, result.usage)}
        return _whole(whole)

    async def pieces() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                if isinstance(ev, ContentDelta) and ev.text:
                    yield serving.line({**head(), "message": {"role": "assistant", "content": ev.text}, "done": False})
                elif isinstance(ev, ReasoningDelta) and ev.text:
                    yield serving.line({**head(), "message": {"role": "assistant", "content": "", "thinking": ev.text}, "done": False})
                elif isinstance(ev, ToolCallEvent):
                    yield serving.line({**head(), "message": {"role": "assistant", "content": "", "tool_calls": [_tool_call(ev.call)]}, "done": False})
                elif isinstance(ev, ChatDone):
                    final = {"role": "assistant", "content": ""}
                    yield serving.line({**head(), "message": final, "done": True, "done_reason": serving.done_reason(ev.finish_reason), **serving.timings(started, ev.usage)})
        except SmolcandleError as e:
            yield serving.line({"error": str(e)})

    return _ndjson(pieces())


async def generate() -> Response:
    started = time.perf_counter()
    body = await serving.body(GenerateRequest)
    serving.require_model(body.model)
    state = current()
    name = serving.served_name(state)
    if body.images:
        raise OllamaError(400, serving.TEXT_ONLY)
    if body.suffix:
        raise OllamaError(400, "suffix (fill-in-the-middle) is not supported by this server")
    if body.template:
        raise OllamaError(400, "a per-request template is not supported; start the server with --chat-template FILE")
    if body.context:
        raise OllamaError(400, "context (the token list of an earlier answer) is not supported; send the conversation to /api/chat")
    if not body.prompt and not body.system:
        return _loaded(name or body.model, "response")
    options = serving.sampling(body.options) | serving.constraint(body.format)
    if body.raw:
        limit = serving.max_tokens(body.options) or DEFAULTS["max_tokens"]
        events: Any = await state.generations.complete(doors.caller(), DOOR, body.prompt or "", max_tokens=limit, **options)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": body.prompt or ""}]
        events = await state.generations.chat(
            doors.caller(), DOOR, messages, enable_thinking=serving.thinking(body.think), max_tokens=serving.max_tokens(body.options), **options
        )

    def head() -> dict[str, Any]:
        return {"model": name, "created_at": serving.now()}

    def piece(ev: Any) -> dict[str, Any] | None:
        if body.raw:
            return {"response": ev.text} if ev.text else None
        if isinstance(ev, ContentDelta) and ev.text:
            return {"response": ev.text}
        if isinstance(ev, ReasoningDelta) and ev.text:
            return {"response": "", "thinking": ev.text}
        return None

    def final(finish_reason: str | None, usage: Any) -> dict[str, Any]:
        return {"done": True, "done_reason": serving.done_reason(finish_reason), **serving.timings(started, usage)}

    if not body.stream:
        text, reasoning, finish, usage = [], [], None, None
        async for ev in events:
            if isinstance(ev, ChatDone):
                finish, usage = ev.finish_reason, ev.usage
            p = piece(ev)
            if p is not None:
                text.append(p["response"])
                reasoning.append(p.get("thinking", ""))
        if body.raw:
            finish, usage = events.stream.finish_reason, events.stream.usage
        whole = {**head(), "response": "".join(text), **({"thinking": "".join(reasoning)} if any(reasoning) else {}), **final(finish, usage)}
        return _whole(whole)

    async def pieces() -> AsyncIterator[bytes]:
        try:
            finish, usage = None, None
            async for ev in events:
                if isinstance(ev, ChatDone):
                    finish, usage = ev.finish_reason, ev.usage
                p = piece(ev)
                if p is not None:
                    yield serving.line({**head(), **p, "done": False})
            if body.raw:
                finish, usage = events.stream.finish_reason, events.stream.usage
            yield serving.line({**head(), "response": "", **final(finish, usage)})
        except SmolcandleError as e:
            yield serving.line({"error": str(e)})

    return _ndjson(pieces())
