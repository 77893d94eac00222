"""The server's policy limits: bounds on what one request may ask of the server (its size and
the work it causes), enforced here and never by the engine. The engine's own defaults and
limits (sampling, context, admission) are ``smolcandle.DEFAULTS``, from the engine."""

from __future__ import annotations

import json
from typing import Any

#: Messages one chat request may hold.
MAX_MESSAGES = 4096
#: Tools one chat request may offer (OpenAI's limit).
MAX_TOOLS = 128
#: Bytes of JSON one schema (a tool's parameters, a response format) may take.
MAX_SCHEMA_BYTES = 64 << 10
#: How deeply one schema may nest objects and arrays.
MAX_SCHEMA_DEPTH = 32
#: Words a history search may hold.
MAX_SEARCH_TERMS = 8
#: Characters a history search may hold.
MAX_SEARCH_CHARS = 256
#: Seconds a history search may run before it is interrupted.
SEARCH_SECONDS = 2.0
#: Bytes of one request body.
MAX_BODY_BYTES = 1 << 20
#: Seconds a refused client is told to wait before it asks again (``Retry-After``).
RETRY_AFTER_SECONDS = 2


def bounded_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """``schema`` if it is within :data:`MAX_SCHEMA_DEPTH` and :data:`MAX_SCHEMA_BYTES` (each
    constraint is compiled per request), else ValueError saying which it is not."""
    if schema is None:
        return None
    if schema_depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema takes {size} bytes, more than {MAX_SCHEMA_BYTES}")
    return schema


def schema_depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest
