"""OpenAI's Responses API: ``POST /v1/responses`` (whole, or streamed as its semantic events),
``GET`` and ``DELETE /v1/responses/{id}``.

A request's ``input`` (a string, or items: messages, ``function_call`` and
``function_call_output``, ``reasoning``) becomes a conversation for the generation service; the
answer comes back as output items (``reasoning``, ``message``, ``function_call``). With ``store``
(the default, as OpenAI's) the response is kept in the history database with the conversation up
to it, for its owner only (the API key, or the client's address without one): a follow-up naming
it in ``previous_response_id`` sends only its new input, and starts from the prefix its
predecessor left in the engine's cache (the owner is the tenant).
"""

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
    ReasoningDelta,
    ToolCall,
    ToolCallEvent,
    tool_call_grammar,
)
from ...errors import InvalidParameterError
from .. import doors
from ..limits import MAX_MESSAGES
from ..state import current
from ..streaming import sse_response
from . import serving
from .errors import ApiError
from .protocol import (
    ERRORS,
    TEXT_ONLY,
    DeletedResponse,
    ErrorResponse,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    ItemContent,
    MediaPart,
    MessageItem,
    ReasoningItem,
    ResponseObject,
    ResponsesRequest,
)

DOOR = "openai"


def _text(content: ItemContent, where: str) -> str:
    if isinstance(content, str):
        return content
    for i, p in enumerate(content):
        if isinstance(p, MediaPart):
            raise ApiError(400, f"{TEXT_ONLY}: {where}.content[{i}] is {p.type!r}, which it cannot read", param=f"{where}.content")
    return "".join(p.text or p.refusal or "" for p in content if not isinstance(p, MediaPart))


def _messages(data: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as chat messages."""
    if isinstance(data.input, str):
        return [{"role": "user", "content": data.input}]
    out: list[dict[str, Any]] = []
    reasoning = ""
    for i, item in enumerate(data.input):
        where = f"input[{i}]"
        if isinstance(item, MessageItem):
            msg: dict[str, Any] = {"role": "system" if item.role == "developer" else item.role, "content": _text(item.content, where)}
            if item.role == "assistant" and reasoning:
                msg["reasoning_content"], reasoning = reasoning, ""
            out.append(msg)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": serving.json_or_text(item.arguments)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call], **({"reasoning_content": reasoning} if reasoning else {})})
                reasoning = ""
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, where)})
        elif isinstance(item, ReasoningItem):
            reasoning += "".join(p.text for p in (item.content or item.summary))
    return out


def _tools(data: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not data.tools or data.tool_choice == "none":
        return None
    return [{"type": "function", "function": t.model_dump(include={"name", "description", "parameters"}, exclude_none=True)} for t in data.tools]


def _constraint(data: ResponsesRequest, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The keywords that enforce ``text.format`` or a forced ``tool_choice``."""
    choice = data.tool_choice
    if tools and (choice == "required" or isinstance(choice, FunctionChoice)):
        try:
            return {"grammar": tool_call_grammar(tools, choice.name if isinstance(choice, FunctionChoice) else None)}
        except InvalidParameterError as e:
            raise ApiError(400, str(e), param="tool_choice") from e
    fmt = data.text.format if data.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        return {"json_schema": {"type": "object"}}
    if fmt is not None and fmt.type == "json_schema":
        return {"json_schema": fmt.schema_ or {"type": "object"}}
    return {}


def _usage(u: Any) -> dict[str, Any]:
    if u is None:
        return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens,
    }


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": _item_id("fc"), "call_id": call.id, "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": status}


def _owner() -> str:
    """Whose stored responses a request may read: its API key (every holder of it), else its address."""
    return doors.caller().client


@validate_request(ResponsesRequest)
@document(responses={200: (ResponseObject, None), **ERRORS})
async def create_response(data: ResponsesRequest) -> Response:
    serving.require_model(data.model)
    state = current()
    owner = _owner()
    before: list[dict[str, Any]] = []
    response_id = _item_id("resp")
    chain = response_id
    if data.previous_response_id:
        previous = await state.history.response(owner, data.previous_response_id)
        if previous is None:
            raise ApiError(400, f"previous response with id {data.previous_response_id!r} not found", param="previous_response_id", code="previous_response_not_found")
        before, chain = json.loads(previous.conversation), previous.chain
    new = _messages(data)
    if len(before) + len(new) > MAX_MESSAGES:
        raise ApiError(400, f"the conversation would hold more than {MAX_MESSAGES} messages", param="input")
    instructions = [{"role": "system", "content": data.instructions}] if data.instructions else []
    tools = _tools(data)
    effort = data.reasoning.effort if data.reasoning is not None else None
    options = {
        "temperature": data.temperature,
        "top_p": data.top_p,
        "top_k": data.top_k or None,
        "seed": data.seed,
        **_constraint(data, tools),
        **(state.generations.thinking(effort=effort) if effort else {}),
    }
    # The owner is the tenant: a follow-up reuses its predecessor's prefix.
    events = await state.generations.chat(doors.caller(data.prompt_cache_key), DOOR, instructions + before + new, tools=tools, max_tokens=data.max_output_tokens, **options)
    created = int(time.time())

    def response(status: str, output: list[dict[str, Any]], usage: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": data.instructions,
            "max_output_tokens": data.max_output_tokens,
            "model": serving.model_id(state),
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": data.previous_response_id,
            "reasoning": {"effort": effort, "summary": None},
            "store": data.store,
            "temperature": data.temperature,
            "text": {"format": data.text.format.model_dump(by_alias=True, exclude_none=True)} if data.text and data.text.format else {"format": {"type": "text"}},
            "tool_choice": data.tool_choice.model_dump() if isinstance(data.tool_choice, FunctionChoice) else (data.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in data.tools or []],
            "top_p": data.top_p,
            "truncation": "disabled",
            "usage": None if status == "in_progress" else _usage(usage),
            "metadata": data.metadata or {},
            "user": None,
        }

    async def keep(body: dict[str, Any], result: ChatResult) -> None:
        if not data.store:
            return
        answer = result.to_message()
        if result.reasoning:
            answer["reasoning_content"] = result.reasoning
        conversation = [*before, *new, answer]
        await state.history.store_response(owner, response_id, chain=chain, conversation=json.dumps(conversation, ensure_ascii=False), body=json.dumps(body, ensure_ascii=False))

    if not data.stream:
        result = ChatResult()
        async for ev in events:
            result.add(ev)
        result.finish()
        output: list[dict[str, Any]] = []
        if result.reasoning:
            output.append({"type": "reasoning", "id": _item_id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": result.reasoning}], "status": "completed"})
        if result.content or not result.tool_calls:
            text = {"type": "output_text", "text": result.content, "annotations": [], "logprobs": []}
            output.append({"type": "message", "id": _item_id("msg"), "status": "completed", "role": "assistant", "content": [text]})
        output.extend(_call_item(c) for c in result.tool_calls)
        status = "incomplete" if result.finish_reason == "length" else "completed"
        body = response(status, output, result.usage, result.finish_reason)
        await keep(body, result)
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    async def stream() -> AsyncIterator[bytes]:
        seq = 0

        def emit(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            seq += 1
            return serving.event({"type": kind, "sequence_number": seq - 1, **fields})

        output: list[dict[str, Any]] = []
        result = ChatResult()
        open_item: dict[str, Any] | None = None  # the reasoning or message item being written
        text = ""

        def close() -> list[bytes]:
            nonlocal open_item, text
            item, open_item = open_item, None
            if item is None:
                return []
            index = len(output)
            if item["type"] == "reasoning":
                part = {"type": "reasoning_text", "text": text}
                done = [emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0, text=text)]
                item = {**item, "content": [part], "status": "completed"}
            else:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                done = [emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text, logprobs=[])]
                item = {**item, "content": [part], "status": "completed"}
            done.append(emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part))
            done.append(emit("response.output_item.done", output_index=index, item=item))
            output.append(item)
            text = ""
            return done

        def begin(kind: str) -> list[bytes]:
            nonlocal open_item
            index = len(output)
            if kind == "reasoning":
                open_item = {"type": "reasoning", "id": _item_id("rs"), "summary": [], "content": [], "status": "in_progress"}
                part = {"type": "reasoning_text", "text": ""}
            else:
                open_item = {"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant", "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [
                emit("response.output_item.added", output_index=index, item=open_item),
                emit("response.content_part.added", item_id=open_item["id"], output_index=index, content_index=0, part=part),
            ]

        yield emit("response.created", response=response("in_progress", []))
        yield emit("response.in_progress", response=response("in_progress", []))
        async for ev in events:
            result.add(ev)
            if isinstance(ev, ReasoningDelta | ContentDelta) and ev.text:
                kind = "reasoning" if isinstance(ev, ReasoningDelta) else "message"
                if open_item is None or open_item["type"] != kind:
                    for b in [*close(), *begin(kind)]:
                        yield b
                assert open_item is not None
                text += ev.text
                delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                extra = {} if kind == "reasoning" else {"logprobs": []}
                yield emit(delta, item_id=open_item["id"], output_index=len(output), content_index=0, delta=ev.text, **extra)
            elif isinstance(ev, ToolCallEvent):
                for b in close():
                    yield b
                item = _call_item(ev.call, "in_progress")
                index = len(output)
                yield emit("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                yield emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"])
                yield emit("response.function_call_arguments.done", item_id=item["id"], output_index=index, name=item["name"], arguments=item["arguments"])
                item["status"] = "completed"
                yield emit("response.output_item.done", output_index=index, item=item)
                output.append(item)
            elif isinstance(ev, ChatDone):
                if not output and open_item is None:  # an empty answer is still a message
                    for b in begin("message"):
                        yield b
                for b in close():
                    yield b
        result.finish()
        status = "incomplete" if result.finish_reason == "length" else "completed"
        body = response(status, output, result.usage, result.finish_reason)
        await keep(body, result)
        yield emit(f"response.{status}", response=body)

    return sse_response(stream())


@document(responses={200: (ResponseObject, None), 401: (ErrorResponse, None), 404: (ErrorResponse, None)})
async def get_response(response_id: str) -> Response:
    stored = await current().history.response(_owner(), response_id)
    if stored is None:
        raise ApiError(404, f"no response with id {response_id!r} was found", param="response_id", code="response_not_found")
    return Response(stored.body, mimetype="application/json")


@document(responses={200: (DeletedResponse, None), 401: (ErrorResponse, None), 404: (ErrorResponse, None)})
async def delete_response(response_id: str) -> Response:
    if not await current().history.delete_response(_owner(), response_id):
        raise ApiError(404, f"no response with id {response_id!r} was found", param="response_id", code="response_not_found")
    return Response(json.dumps({"id": response_id, "object": "response.deleted", "deleted": True}), mimetype="application/json")
