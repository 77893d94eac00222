"""The OpenAI-compatible door under ``/v1``: chat completions, completions, the Responses API, models.

Requests are validated by pydantic models through quart-schema (which also documents them at
``/openapi.json``); every failure comes back in OpenAI's shape with a 4xx status for bad
input. Generations go through the server's generation service; when the client goes away (a
closed stream, or a dropped non-streaming request) the generation is cancelled.
"""

from .errors import not_found
from .router import api

__all__ = ["api", "not_found"]
