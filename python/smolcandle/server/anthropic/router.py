"""The Anthropic door's blueprint: ``/v1/messages`` and ``/v1/messages/count_tokens``, the API
key (``x-api-key`` or ``Authorization: Bearer``), and errors in Anthropic's shape."""

from __future__ import annotations

from quart import Blueprint, Response, request

from ..state import current
from . import errors
from .errors import AnthropicError
from .messages import count_tokens, create_message

messages_api = Blueprint("anthropic", __name__, url_prefix="/v1")
errors.register(messages_api)
messages_api.add_url_rule("/messages", view_func=create_message, methods=["POST"])
messages_api.add_url_rule("/messages/count_tokens", view_func=count_tokens, methods=["POST"])


@messages_api.before_request
async def _access() -> Response | None:
    state = current()
    if request.method == "OPTIONS" and state.config.cors_origins:
        return Response("", 204)
    if state.auth.api_key and not state.auth.request_key_matches(request.headers.get("Authorization"), request.headers.get("x-api-key")):
        return AnthropicError(401, "a valid API key is required (x-api-key: KEY, or Authorization: Bearer KEY)").response()
    return None


@messages_api.after_request
async def _cors(response: Response) -> Response:
    origins = current().config.cors_origins
    origin = request.headers.get("Origin")
    if origins and origin and ("*" in origins or origin in origins):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta"
        response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    return response
