"""Errors in Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``, with a 4xx
status for bad input: the door's own, the engine's and the generation service's, and every
failure of the web framework on the door's paths (never an HTML page)."""

from __future__ import annotations

import json

from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from ...errors import (
    BusyError,
    ContextLengthError,
    InvalidParameterError,
    SmolcandleError,
)
from ..doors import answer_errors
from ..generations import Refused
from ..limits import RETRY_AFTER_SECONDS

# Anthropic's error types by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


class AnthropicError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.type = type or _TYPES.get(status, "overloaded_error" if status in (503, 529) else "api_error")

    def body(self) -> dict[str, object]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Response(json.dumps(self.body()), self.status, mimetype="application/json", headers=headers)


def engine_error(e: SmolcandleError) -> AnthropicError:
    if isinstance(e, BusyError):
        return AnthropicError(503, str(e), type="overloaded_error", retry_after=RETRY_AFTER_SECONDS)
    if isinstance(e, ContextLengthError | InvalidParameterError):
        return AnthropicError(400, str(e))
    return AnthropicError(500, str(e), type="api_error")


def refused(e: Refused) -> AnthropicError:
    if e.reason == "client_limit":
        return AnthropicError(429, e.message, retry_after=e.retry_after)
    return AnthropicError(503, e.message, type="overloaded_error", retry_after=e.retry_after if e.reason != "model_unavailable" else None)


def not_found(status: int, name: str, method: str, path: str) -> AnthropicError:
    """A path or method that the door does not serve."""
    return AnthropicError(status, f"{method} {path}: {name.lower()}", type="not_found_error" if status == 404 else "invalid_request_error")


def bad_request(message: str, where: str | None = None) -> AnthropicError:
    """A request the door cannot read (``where`` in the body is named in ``message``)."""
    return AnthropicError(400, message)


def http_error(e: HTTPException) -> AnthropicError:
    return AnthropicError(e.code or 500, e.description or e.name)


def register(bp: Blueprint) -> None:
    """Answers every failure on the blueprint's routes in Anthropic's shape."""
    answer_errors(bp, AnthropicError, refused=refused, engine_error=engine_error, bad_request=bad_request, http_error=http_error)
