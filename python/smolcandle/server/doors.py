"""What the API doors (OpenAI's, Anthropic's, Ollama's) share, each door giving only the shape
of its answers: every failure on its routes answered as its own error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError
from quart import Blueprint, Response
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from ..errors import SmolcandleError
from .generations import Refused


class DoorError(Protocol):
    """An error in a door's shape: it answers as that door's clients expect."""

    def response(self) -> Response: ...


def answer_errors(
    bp: Blueprint,
    own: type[Exception],
    *,
    refused: Callable[[Refused], DoorError],
    engine_error: Callable[[SmolcandleError], DoorError],
    bad_request: Callable[[str, str | None], DoorError],
    http_error: Callable[[HTTPException], DoorError],
) -> None:
    """Answers every failure on ``bp``'s routes as the door's error (never an HTML page): the
    door's ``own`` as it is; the generation service's refusals and the engine's errors as the
    door maps them; a body it cannot read as ``bad_request`` (the message, and where in the
    body the fault is or ``None``); any other failure of the web framework as ``http_error``."""

    @bp.errorhandler(own)
    async def _own(e: Any) -> Response:
        return e.response()

    @bp.errorhandler(Refused)
    async def _refused(e: Refused) -> Response:
        return refused(e).response()

    @bp.errorhandler(SmolcandleError)
    async def _engine(e: SmolcandleError) -> Response:
        return engine_error(e).response()

    @bp.errorhandler(RequestSchemaValidationError)
    async def _invalid_body(e: RequestSchemaValidationError) -> Response:
        return bad_request(*_fault(e.validation_error)).response()

    @bp.errorhandler(ValidationError)
    async def _invalid(e: ValidationError) -> Response:
        return bad_request(*_fault(e)).response()

    @bp.errorhandler(HTTPException)
    async def _http_error(e: HTTPException) -> Response:
        if (e.code or 500) == 400:
            return bad_request("the request body is not valid JSON", None).response()
        return http_error(e).response()

    @bp.errorhandler(RecursionError)
    async def _too_deep(e: RecursionError) -> Response:
        return bad_request("the request body is nested too deeply", None).response()

    @bp.errorhandler(UnicodeDecodeError)
    async def _not_utf8(e: UnicodeDecodeError) -> Response:
        return bad_request("the request body is not valid UTF-8 JSON", None).response()


def _fault(err: Exception) -> tuple[str, str | None]:
    """What is wrong with a request body that failed validation, and where (a dotted path)."""
    if isinstance(err, TypeError | ValueError) and not hasattr(err, "errors"):
        return f"the request body is not valid: {err}", None
    first = err.errors()[0]  # type: ignore[attr-defined]
    where = ".".join(str(p) for p in first["loc"])
    return (f"{where}: {first['msg']}" if where else first["msg"]), where or None
