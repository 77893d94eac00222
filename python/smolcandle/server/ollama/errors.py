"""Errors in Ollama's shape, ``{"error": "..."}``: the door's own, the engine's and the
generation service's, and every failure of the web framework on an ``/api`` path."""

from __future__ import annotations

import json

from pydantic import ValidationError
from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from ...errors import BusyError, InvalidParameterError, SmolcandleError
from ..generations import Refused
from ..limits import RETRY_AFTER_SECONDS


class OllamaError(Exception):
    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Response(json.dumps({"error": self.message}, ensure_ascii=False), self.status, mimetype="application/json", headers=headers)


def engine_error(e: SmolcandleError) -> OllamaError:
    if isinstance(e, BusyError):
        return OllamaError(503, str(e), retry_after=RETRY_AFTER_SECONDS)
    if isinstance(e, InvalidParameterError):
        return OllamaError(400, str(e))
    return OllamaError(500, str(e))


def refused(e: Refused) -> OllamaError:
    return OllamaError(429 if e.reason == "client_limit" else 503, e.message, retry_after=e.retry_after)


def invalid(e: ValidationError) -> OllamaError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return OllamaError(400, f"{where}: {first['msg']}" if where else first["msg"])


def not_found(status: int, name: str, method: str, path: str) -> OllamaError:
    """A path or method that ``/api`` does not serve."""
    return OllamaError(status, f"{method} {path}: {name.lower()}")


def register(bp: Blueprint) -> None:
    """Answers every failure on the blueprint's routes in Ollama's shape."""

    @bp.errorhandler(OllamaError)
    async def _own(e: OllamaError) -> Response:
        return e.response()

    @bp.errorhandler(Refused)
    async def _refused(e: Refused) -> Response:
        return refused(e).response()

    @bp.errorhandler(SmolcandleError)
    async def _engine(e: SmolcandleError) -> Response:
        return engine_error(e).response()

    @bp.errorhandler(ValidationError)
    async def _invalid(e: ValidationError) -> Response:
        return invalid(e).response()

    @bp.errorhandler(HTTPException)
    async def _http(e: HTTPException) -> Response:
        status = e.code or 500
        if status == 400:
            return OllamaError(400, "the request body is not valid JSON").response()
        return OllamaError(status, e.description or e.name).response()

    @bp.errorhandler(RecursionError)
    async def _too_deep(e: RecursionError) -> Response:
        return OllamaError(400, "the request body is nested too deeply").response()

    @bp.errorhandler(UnicodeDecodeError)
    async def _not_utf8(e: UnicodeDecodeError) -> Response:
        return OllamaError(400, "the request body is not valid UTF-8 JSON").response()
