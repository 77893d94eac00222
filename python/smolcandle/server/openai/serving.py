"""What the OpenAI door's endpoints share: which model a request names, and how usage,
log-probabilities and events are written."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ... import __version__
from ..state import ServerState, current
from .errors import ApiError
from .protocol import TEXT_ONLY, MediaPart, Sampling, TextPart

SYSTEM_FINGERPRINT = f"smolcandle-{__version__}"


def model_id(state: ServerState) -> str | None:
    name = state.model.name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name or None


def require_model(requested: str) -> Any:
    """The model, if the request names the one served (else 404); one that cannot answer yet
    is refused by the generation service (503)."""
    state = current()
    served = model_id(state)
    if served is None or requested not in (served, state.model.name):
        known = f"; this server serves {served!r}" if served else ""
        raise ApiError(404, f"the model {requested!r} does not exist{known}", param="model", code="model_not_found")
    return state.generations.model()


def sampling(body: Sampling) -> dict[str, Any]:
    """The request's sampling in :meth:`Model.generate`'s keywords (``None``: not set)."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k or None,
        "min_p": body.min_p,
        "repeat_penalty": body.repetition_penalty,
        "frequency_penalty": body.frequency_penalty or None,
        "presence_penalty": body.presence_penalty or None,
        "seed": body.seed,
        "stop": stop or None,
    }


def text(content: str | list[TextPart | MediaPart] | None, where: str = "messages") -> str:
    """A message's text; an image, audio or file part is refused (400)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    for i, p in enumerate(content):
        if isinstance(p, MediaPart):
            raise ApiError(400, f"{TEXT_ONLY}: {where}.content[{i}] is {p.type!r}, which it cannot read", param=f"{where}.content")
    return "".join(p.text for p in content if isinstance(p, TextPart))


def json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def choices_usage(usages: list[Any]) -> dict[str, Any]:
    """The usage of ``n`` choices of one prompt: the prompt counted once, the completions summed."""
    each = [usage(u) for u in usages]
    out = each[0]
    for u in each[1:]:
        out["completion_tokens"] += u["completion_tokens"]
        for k in out["completion_tokens_details"]:
            out["completion_tokens_details"][k] += u["completion_tokens_details"][k]
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


async def merged(generations: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """The events of several generations as they come, each with its index; leaving early (or
    one failing) stops them all."""
    if len(generations) == 1:
        async for ev in generations[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, g: Any) -> None:
        try:
            async for ev in g:
                await queue.put((i, ev))
        except Exception as e:  # noqa: BLE001 - raised by the reader
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        left = len(tasks)
        while left:
            i, ev = await queue.get()
            if ev is done:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


def usage(u: Any) -> dict[str, Any]:
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


def token(model: Any, token_id: int, logprob: float) -> dict[str, Any]:
    raw = model.token_bytes(token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def event(obj: dict[str, Any]) -> bytes:
    """A named event (``event: <type>``), as the Responses API streams them."""
    return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
