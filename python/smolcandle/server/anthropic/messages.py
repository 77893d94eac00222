"""``POST /v1/messages``: a conversation answered as one message of content blocks (thinking,
text, tool_use), whole or streamed as Anthropic's events; ``POST /v1/messages/count_tokens``."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from quart import Response
from quart_schema import document, validate_request

from ...chat import (
    ChatDone,
    ChatResult,
    ContentDelta,
    ReasoningDelta,
    ToolCall,
    ToolCallEvent,
    tool_call_grammar,
)
from ...errors import InvalidParameterError, SmolcandleError
from .. import doors
from ..generations import Refused
from ..state import current
from ..streaming import sse_response
from .errors import AnthropicError, engine_error, refused
from .protocol import (
    ERRORS,
    TEXT_ONLY,
    CountTokensRequest,
    MediaBlock,
    MessageResponse,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ThinkingEnabled,
    TokenCount,
    ToolResultBlock,
    ToolUseBlock,
)

DOOR = "anthropic"


def _require_model(requested: str) -> Any:
    """The model, if the request names the one served (else 404); one that cannot answer yet
    is refused by the generation service (503)."""
    state = current()
    served = state.model.served_id
    if served is None or requested not in (served, state.model.name):
        known = f"; this server serves {served!r}" if served else ""
        raise AnthropicError(404, f"model: the model {requested!r} does not exist{known}")
    return state.generations.model()


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, b in enumerate(content):
        if isinstance(b, MediaBlock):
            raise AnthropicError(400, f"{TEXT_ONLY}: {where}.content[{j}] is an {b.type} block, which it cannot read")
    return "".join(b.text for b in content if isinstance(b, TextBlock))


def _messages(data: CountTokensRequest) -> list[dict[str, Any]]:
    """The request as chat messages: tool_result blocks become tool messages, tool_use blocks
    the assistant's tool calls, thinking blocks its reasoning."""
    out: list[dict[str, Any]] = []
    if data.system:
        out.append({"role": "system", "content": _text(data.system, "system")})
    for i, m in enumerate(data.messages):
        where = f"messages[{i}]"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, calls, reasoning, results = [], [], "", 0
        for j, b in enumerate(m.content):
            if isinstance(b, MediaBlock):
                raise AnthropicError(400, f"{TEXT_ONLY}: {where}.content[{j}] is an {b.type} block, which it cannot read")
            if isinstance(b, TextBlock):
                text.append(b.text)
            elif isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
            elif isinstance(b, ToolResultBlock):
                result = _text(b.content, f"{where}.content[{j}]")
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": f"error: {result}" if b.is_error else result})
                results += 1
            elif isinstance(b, ThinkingBlock):
                reasoning += b.thinking
        if text or calls or not results:
            msg: dict[str, Any] = {"role": m.role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if reasoning and m.role == "assistant":
                msg["reasoning_content"] = reasoning
            out.append(msg)
    return out


def _tools(data: CountTokensRequest) -> list[dict[str, Any]] | None:
    if not data.tools or (data.tool_choice is not None and data.tool_choice.type == "none"):
        return None
    return [{"type": "function", "function": {"name": t.name, **({"description": t.description} if t.description else {}), "parameters": t.input_schema}} for t in data.tools]


def _thinking(data: CountTokensRequest) -> dict[str, Any]:
    """``thinking``: enabled with its ``budget_tokens`` as the reasoning budget, adaptive (on,
    within the server's budget), or disabled."""
    if data.thinking is None:
        return {}
    if isinstance(data.thinking, ThinkingEnabled):
        return current().generations.thinking(enabled=True, budget=data.thinking.budget_tokens)
    return current().generations.thinking(enabled=data.thinking.type == "adaptive")


def _usage(u: Any) -> dict[str, int]:
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    # Anthropic counts the prompt tokens read from the cache apart from input_tokens.
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens, "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name, "input": call.arguments}


def _sse(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **obj}, ensure_ascii=False)}\n\n".encode()


@validate_request(MessagesRequest)
@document(responses={200: (MessageResponse, None), **ERRORS})
async def create_message(data: MessagesRequest) -> Response:
    model = _require_model(data.model)
    state = current()
    tools = _tools(data)
    options: dict[str, Any] = {"temperature": data.temperature, "top_p": data.top_p, "top_k": data.top_k or None, "stop": data.stop_sequences or None}
    choice = data.tool_choice
    if tools and choice is not None and choice.type in ("any", "tool"):
        # A forced call: its input follows the tool's input_schema.
        try:
            options["grammar"] = tool_call_grammar(tools, choice.name if choice.type == "tool" else None)
        except InvalidParameterError as e:
            raise AnthropicError(400, f"tool_choice: {e}") from e
    # The caller's cached prefixes are reused without being asked: cache_control breakpoints need
    # not be given, and cache_read_input_tokens says how many tokens were read.
    events = await state.generations.chat(doors.caller(), DOOR, _messages(data), tools=tools, max_tokens=data.max_tokens, **_thinking(data), **options)
    head = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": state.model.served_id}
    stops = data.stop_sequences or []

    def stop_reason(finish: str, calls: int) -> tuple[str, str | None]:
        if calls:
            return "tool_use", None
        if finish == "length":
            return "max_tokens", None
        matched = events.stream.stop_string(stops, model.token_bytes) if stops else None
        return ("stop_sequence", matched) if matched is not None else ("end_turn", None)

    if not data.stream:
        result = ChatResult()
        async for ev in events:
            result.add(ev)
        result.finish()
        content: list[dict[str, Any]] = []
        if result.reasoning:
            content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
        if result.content or not result.tool_calls:
            content.append({"type": "text", "text": result.content})
        content.extend(_tool_use(c) for c in result.tool_calls)
        reason, sequence = stop_reason(result.finish_reason, len(result.tool_calls))
        body = {**head, "content": content, "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(result.usage)}
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    async def stream() -> AsyncIterator[bytes]:
        yield _sse("message_start", {"message": {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(None)}})
        yield _sse("ping", {})
        index, open_kind, calls = -1, None, 0

        def start(kind: str, block: dict[str, Any]) -> bytes:
            nonlocal index, open_kind
            index, open_kind = index + 1, kind
            return _sse("content_block_start", {"index": index, "content_block": block})

        def stop() -> list[bytes]:
            nonlocal open_kind
            if open_kind is None:
                return []
            open_kind = None
            return [_sse("content_block_stop", {"index": index})]

        finish, usage = "stop", None
        try:
            async for ev in events:
                if isinstance(ev, ReasoningDelta | ContentDelta):
                    kind = "thinking" if isinstance(ev, ReasoningDelta) else "text"
                    piece = ev.text if open_kind == kind else ev.text.lstrip()
                    if not piece:
                        continue
                    if open_kind != kind:
                        for b in stop():
                            yield b
                        yield start(kind, {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""})
                    delta = {"type": "thinking_delta", "thinking": piece} if kind == "thinking" else {"type": "text_delta", "text": piece}
                    yield _sse("content_block_delta", {"index": index, "delta": delta})
                elif isinstance(ev, ToolCallEvent):
                    for b in stop():
                        yield b
                    block = _tool_use(ev.call)
                    yield start("tool_use", {**block, "input": {}})
                    yield _sse("content_block_delta", {"index": index, "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                    calls += 1
                elif isinstance(ev, ChatDone):
                    finish, usage = ev.finish_reason, ev.usage
        except (SmolcandleError, Refused) as e:
            err = engine_error(e) if isinstance(e, SmolcandleError) else refused(e)
            yield _sse("error", {"error": err.body()["error"]})
            return
        if index < 0:  # an empty answer is still one text block
            yield start("text", {"type": "text", "text": ""})
        for b in stop():
            yield b
        reason, sequence = stop_reason(finish, calls)
        yield _sse("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": _usage(usage)})
        yield _sse("message_stop", {})

    return sse_response(stream())


@validate_request(CountTokensRequest)
@document(responses={200: (TokenCount, None), **ERRORS})
async def count_tokens(data: CountTokensRequest) -> Response:
    _require_model(data.model)
    state = current()
    thinking = _thinking(data)
    template = {"enable_thinking": thinking["enable_thinking"]} if "enable_thinking" in thinking else {}
    n = await state.generations.count_chat_tokens(_messages(data), tools=_tools(data), **template)
    return Response(json.dumps({"input_tokens": n}), mimetype="application/json")
