"""What the API doors (OpenAI's, Anthropic's, Ollama's) share, each door giving only the shape
of its answers: every failure on its routes answered as its own error, the API key (and for a
browser's pages, CORS) checked before a route runs, and who is asking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError
from quart import Blueprint, Response, request
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from ..errors import SmolcandleError
from .generations import Caller, Refused
from .state import current


class DoorError(Protocol):
    """An error in a door's shape: it answers as that door's clients expect."""

    def response(self) -> Response: ...


@dataclass(frozen=True)
class Cors:
    """What a door lets pages of the origins the server allows send it."""

    headers: str
    methods: str


def caller(cache_key: str | None = None) -> Caller:
    """Who asks: the API key when the server has one, else the client's address. That is whom
    the request counts against, and the tenant whose cached prefixes it reuses without being
    asked (``cache_key``, OpenAI's ``prompt_cache_key``, narrows it to the requests naming the
    same one), as clients that resend whole conversations need."""
    return Caller.api(keyed=current().auth.api_key is not None, address=request.remote_addr, cache_key=cache_key)


def guard(bp: Blueprint, unauthorized: DoorError, *, x_api_key: bool = True, cors: Cors | None = None) -> None:
    """With an API key, ``bp``'s routes answer ``unauthorized`` to a request that does not carry
    it (``Authorization: Bearer KEY``, or with ``x_api_key`` also ``x-api-key: KEY``). With
    ``cors``, once the server names origins whose pages may call it, a preflight (``OPTIONS``,
    which carries no key) is answered at once, and every answer to such a page says so."""

    @bp.before_request
    async def _access() -> Response | None:
        auth = current().auth
        if cors is not None and request.method == "OPTIONS" and auth.cors_origins:
            return Response("", 204)
        if auth.api_key and not auth.request_key_matches(request.headers.get("Authorization"), request.headers.get("x-api-key") if x_api_key else None):
            return unauthorized.response()
        return None

    if cors is None:
        return

    @bp.after_request
    async def _cors(response: Response) -> Response:
        allowed = current().auth.cors_origin(request.headers.get("Origin"))
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Headers"] = cors.headers
            response.headers["Access-Control-Allow-Methods"] = cors.methods
        return response


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
