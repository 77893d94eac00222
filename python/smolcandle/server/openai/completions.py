"""``POST /v1/completions``: a text continued, whole or streamed as ``text_completion``
events ending with ``data: [DONE]``."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Response
from quart_schema import document, validate_request

from ..state import current
from ..streaming import sse_response
from . import serving
from .protocol import COMPLETIONS_MAX_TOKENS, ERRORS, Completion, CompletionRequest

DOOR = "openai"


def _logprobs(model: Any, logprobs: Any, offset: int) -> dict[str, Any]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        token = model.token_bytes(lp.token_id).decode("utf-8", "replace")
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({model.token_bytes(t).decode("utf-8", "replace"): v for t, v in lp.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


@validate_request(CompletionRequest)
@document(responses={200: (Completion, None), **ERRORS})
async def completions(data: CompletionRequest) -> Response:
    model = serving.require_model(data.model)
    state = current()
    prompt = data.prompt if isinstance(data.prompt, str) else data.prompt[0]
    options = serving.sampling(data)
    if data.logprobs is not None:
        options["logprobs"] = data.logprobs
    # The server's --max-tokens is for answers to conversations; a completion follows OpenAI.
    max_tokens = data.max_tokens or COMPLETIONS_MAX_TOKENS
    events = await state.generations.complete(serving.caller(data), DOOR, prompt, max_tokens=max_tokens, **options)
    stream = events.stream
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": serving.model_id(state), "system_fingerprint": serving.SYSTEM_FINGERPRINT}

    def finish_reason() -> str:
        return stream.finish_reason if stream.finish_reason in ("stop", "length") else "stop"

    start = len(prompt) if data.echo else 0

    if not data.stream:
        chunks = [c async for c in events]
        text = "".join(c.text for c in chunks)
        logprobs = _logprobs(model, [lp for c in chunks for lp in c.logprobs], start) if data.logprobs is not None else None
        body = {
            **head,
            "object": "text_completion",
            "choices": [{"index": 0, "text": (prompt if data.echo else "") + text, "logprobs": logprobs, "finish_reason": finish_reason()}],
            "usage": serving.usage(stream.usage),
        }
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def body() -> AsyncIterator[bytes]:
        def chunk(text: str, finish: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
            return serving.sse({**head, "object": "text_completion", "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        if data.echo:
            yield chunk(prompt)
        offset = start
        async for c in events:
            if c.text:
                yield chunk(c.text, logprobs=_logprobs(model, c.logprobs, offset) if data.logprobs is not None else None)
                offset += len(c.text)
        yield chunk("", finish_reason())
        if include_usage:
            yield serving.sse({**head, "object": "text_completion", "choices": [], "usage": serving.usage(stream.usage)})
        yield serving.DONE

    return sse_response(body())
