"""The access log and the request counters: one line per request on the ``smolcandle.access``
logger (time, client, method, path, status, duration, and for a generation its prompt and
completion tokens and time to first token), written when the response ends (a streamed
answer's when its stream ends), and ``smolcandle_http_requests_total`` by route and status.

It wraps the app's ASGI callable, so it sees every response, the framework's own errors
included. What a request did besides (its generation, its embedding) is noted on its
:class:`Access` record, found through :func:`current` from anywhere the request's work runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

log = logging.getLogger("smolcandle.access")

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

#: The route of a request that matched none.
UNMATCHED = "unmatched"


@dataclass
class Access:
    """What one request did, filled in as it runs."""

    started: float
    #: The matched URL rule (``/api/chat``, ``/c/<conversation_id>``), not the raw path.
    route: str = UNMATCHED
    status: int = 0
    #: The generation's engine stream (its usage), and its relay's first-output time.
    stream: Any = None
    relay: Any = None
    #: Tokens of an embedding request's inputs.
    input_tokens: int | None = None

    def generation(self, relay: Any) -> None:
        """Notes the request's generation (its relay: stream, first output)."""
        self.relay, self.stream = relay, relay.stream

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        usage = getattr(self.stream, "usage", None) if self.stream is not None else None
        if usage is not None:
            out["prompt_tokens"] = usage.prompt_tokens
            out["completion_tokens"] = usage.completion_tokens
        elif self.input_tokens is not None:
            out["prompt_tokens"] = self.input_tokens
        first = getattr(self.relay, "first_output_seconds", None)
        if first is not None:
            out["ttft_s"] = round(first, 4)
        return out


_current: ContextVar[Access | None] = ContextVar("smolcandle_access", default=None)


def current() -> Access | None:
    """The record of the request whose work is running (``None`` outside a request)."""
    return _current.get()


class AccessLog:
    """ASGI middleware: times each HTTP request, counts it by route and status, and logs it
    (with ``enabled``) as a line of text or, with ``json_lines``, a JSON object."""

    def __init__(self, app: ASGIApp, registry: Any, *, enabled: bool = True, json_lines: bool = False) -> None:
        self.app, self.enabled, self.json_lines = app, enabled, json_lines
        self.requests = Counter("smolcandle_http_requests", "HTTP requests answered, by route (the matched URL rule) and status", ["route", "status"], registry=registry)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        record = Access(started=time.perf_counter())
        token = _current.set(record)
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self._finish(scope, record)

        async def watching(message: Any) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, watching)
        finally:
            _current.reset(token)
            finish()

    def _finish(self, scope: dict[str, Any], record: Access) -> None:
        status = record.status or 499  # the client went away before an answer began
        self.requests.labels(record.route, str(status)).inc()
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "client": client[0] if client else "-",
            "method": scope.get("method", "-"),
            "path": scope.get("path", "-"),
            "status": status,
            "duration_s": round(time.perf_counter() - record.started, 4),
            **record.fields(),
        }
        if self.json_lines:
            log.info("%s", json.dumps({**entry, "route": record.route}, ensure_ascii=False))
            return
        extra = "".join(f" {k}={v}" for k, v in entry.items() if k not in ("time", "client", "method", "path", "status", "duration_s"))
        log.info('%s %s "%s %s" %d %.3fs%s', entry["time"], entry["client"], entry["method"], entry["path"], status, entry["duration_s"], extra)
