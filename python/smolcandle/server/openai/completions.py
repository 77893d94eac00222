"""``POST /v1/completions``: a text continued, whole or streamed as ``text_completion``
events ending with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Response
from quart_schema import document, validate_request

from .. import doors
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
    caller, n = doors.caller(data.prompt_cache_key), data.n or 1
    if n == 1:
        generations = [await state.generations.complete(caller, DOOR, prompt, max_tokens=max_tokens, **options)]
    else:
        generations = await state.generations.complete_choices(n, caller, DOOR, prompt, max_tokens=max_tokens, **options)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": serving.model_id(state), "system_fingerprint": serving.SYSTEM_FINGERPRINT}

    def finish_reason(i: int) -> str:
        reason = generations[i].stream.finish_reason
        return reason if reason in ("stop", "length") else "stop"

    start = len(prompt) if data.echo else 0

    if not data.stream:

        async def whole(g: Any) -> list[Any]:
            return [c async for c in g]

        every = await asyncio.gather(*(whole(g) for g in generations))
        choices = []
        for i, chunks in enumerate(every):
            text = "".join(c.text for c in chunks)
            logprobs = _logprobs(model, [lp for c in chunks for lp in c.logprobs], start) if data.logprobs is not None else None
            choices.append({"index": i, "text": (prompt if data.echo else "") + text, "logprobs": logprobs, "finish_reason": finish_reason(i)})
        body = {**head, "object": "text_completion", "choices": choices, "usage": serving.choices_usage([g.stream.usage for g in generations])}
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def body() -> AsyncIterator[bytes]:
        def chunk(i: int, text: str, finish: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
            return serving.sse({**head, "object": "text_completion", "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        if data.echo:
            for i in range(n):
                yield chunk(i, prompt)
        offsets = [start] * n
        async for i, c in serving.merged(generations):
            if c.text:
                yield chunk(i, c.text, logprobs=_logprobs(model, c.logprobs, offsets[i]) if data.logprobs is not None else None)
                offsets[i] += len(c.text)
        for i in range(n):
            yield chunk(i, "", finish_reason(i))
        if include_usage:
            yield serving.sse({**head, "object": "text_completion", "choices": [], "usage": serving.choices_usage([g.stream.usage for g in generations])})
        yield serving.DONE

    return sse_response(body())
