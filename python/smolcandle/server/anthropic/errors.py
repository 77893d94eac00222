"""Errors in Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``, with a 4xx
status for bad input: the door's own, the engine's and the generation service's, and every
failure of the web framework on the door's paths (never an HTML page)."""

from __future__ import annotations

import json

from quart import Blueprint, Response
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from ...errors import (
    BusyError,
    ContextLengthError,
    InvalidParameterError,
    SmolcandleError,
)
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


def register(bp: Blueprint) -> None:
    """Answers every failure on the blueprint's routes in Anthropic's shape."""

    @bp.errorhandler(AnthropicError)
    async def _own(e: AnthropicError) -> Response:
        return e.response()

    @bp.errorhandler(Refused)
    async def _refused(e: Refused) -> Response:
        return refused(e).response()

    @bp.errorhandler(SmolcandleError)
    async def _engine(e: SmolcandleError) -> Response:
        return engine_error(e).response()

    @bp.errorhandler(RequestSchemaValidationError)
    async def _invalid_body(e: RequestSchemaValidationError) -> Response:
        err = e.validation_error
        if isinstance(err, TypeError | ValueError) and not hasattr(err, "errors"):
            return AnthropicError(400, f"the request body is not valid: {err}").response()
        first = err.errors()[0]  # type: ignore[union-attr]
        where = ".".join(str(p) for p in first["loc"])
        return AnthropicError(400, f"{where}: {first['msg']}" if where else first["msg"]).response()

    @bp.errorhandler(HTTPException)
    async def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        if status == 400:
            return AnthropicError(400, "the request body is not valid JSON").response()
        return AnthropicError(status, e.description or e.name).response()

    @bp.errorhandler(RecursionError)
    async def _too_deep(e: RecursionError) -> Response:
        return AnthropicError(400, "the request body is nested too deeply").response()

    @bp.errorhandler(UnicodeDecodeError)
    async def _not_utf8(e: UnicodeDecodeError) -> Response:
        return AnthropicError(400, "the request body is not valid UTF-8 JSON").response()
