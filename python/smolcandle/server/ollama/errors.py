"""Errors in Ollama's shape, ``{"error": "..."}``: the door's own, the engine's and the
generation service's, and every failure of the web framework on an ``/api`` path."""

from __future__ import annotations

import json

from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from ...errors import BusyError, InvalidParameterError, SmolcandleError
from ..doors import answer_errors
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


def not_found(status: int, name: str, method: str, path: str) -> OllamaError:
    """A path or method that ``/api`` does not serve."""
    return OllamaError(status, f"{method} {path}: {name.lower()}")


def bad_request(message: str, where: str | None = None) -> OllamaError:
    """A request the door cannot read (``where`` in the body is named in ``message``)."""
    return OllamaError(400, message)


def http_error(e: HTTPException) -> OllamaError:
    return OllamaError(e.code or 500, e.description or e.name)


def register(bp: Blueprint) -> None:
    """Answers every failure on the blueprint's routes in Ollama's shape."""
    answer_errors(bp, OllamaError, refused=refused, engine_error=engine_error, bad_request=bad_request, http_error=http_error)
