"""Anthropic's Messages API under ``/v1/messages``: ``POST /v1/messages`` (whole, or streamed as
Anthropic's events) and ``POST /v1/messages/count_tokens``.

A door like the others: protocol models (:mod:`.protocol`), errors in Anthropic's shape
(:mod:`.errors`), the route (:mod:`.messages`); generations go through the server's generation
service. The API key is read from ``x-api-key`` as well as ``Authorization: Bearer``.
"""

from .errors import not_found
from .router import messages_api

__all__ = ["messages_api", "not_found"]
