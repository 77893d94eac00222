"""The Anthropic door's blueprint: ``/v1/messages`` and ``/v1/messages/count_tokens``, the API
key (``x-api-key`` or ``Authorization: Bearer``), and errors in Anthropic's shape."""

from __future__ import annotations

from quart import Blueprint

from ..doors import Cors, guard
from . import errors
from .errors import AnthropicError
from .messages import count_tokens, create_message

messages_api = Blueprint("anthropic", __name__, url_prefix="/v1")
errors.register(messages_api)
guard(
    messages_api,
    AnthropicError(401, "a valid API key is required (x-api-key: KEY, or Authorization: Bearer KEY)"),
    cors=Cors(headers="Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta", methods="POST, OPTIONS"),
)
messages_api.add_url_rule("/messages", view_func=create_message, methods=["POST"])
messages_api.add_url_rule("/messages/count_tokens", view_func=count_tokens, methods=["POST"])
