"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for bad input: the door's own, the engine's and the generation service's, and every
failure of the web framework on a ``/v1`` path (never an HTML page)."""

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


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Response(json.dumps(body), self.status, mimetype="application/json", headers=headers)


# Engine parameters that stand for a differently named API field.
_API_PARAMS = {"json_schema": "response_format", "grammar": "tool_choice"}


def engine_error(e: SmolcandleError) -> ApiError:
    if isinstance(e, BusyError):
        return ApiError(503, str(e), type="server_error", code="server_overloaded", retry_after=RETRY_AFTER_SECONDS)
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return ApiError(400, str(e), param=_API_PARAMS.get(e.param or "", e.param))
    return ApiError(500, str(e), type="server_error")


def refused(e: Refused) -> ApiError:
    if e.reason == "client_limit":
        return ApiError(429, e.message, type="rate_limit_error", code="rate_limit_exceeded", retry_after=e.retry_after)
    if e.reason == "model_unavailable":
        return ApiError(503, e.message, type="server_error", code="model_unavailable")
    return ApiError(503, e.message, type="server_error", code=e.reason, retry_after=e.retry_after)


def not_found(status: int, name: str, method: str, path: str) -> ApiError:
    """A path or method that ``/v1`` does not serve."""
    return ApiError(status, f"{method} {path}: {name.lower()}", code=name.lower().replace(" ", "_"))


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A request the door cannot read; ``param`` is where in the body the fault is."""
    return ApiError(400, message, param=param)


def http_error(e: HTTPException) -> ApiError:
    status = e.code or 500
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, e.description or e.name, type=kind, code=e.name.lower().replace(" ", "_"))


def register(bp: Blueprint) -> None:
    """Answers every failure on the blueprint's routes in OpenAI's shape."""
    answer_errors(bp, ApiError, refused=refused, engine_error=engine_error, bad_request=bad_request, http_error=http_error)
