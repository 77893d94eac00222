"""The operations blueprint: ``/healthz`` for load balancers, ``/metrics`` for Prometheus,
``/status`` for operators and tests, and the assets that come from other packages (htmx, the code highlighting CSS)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel
from quart import Blueprint, Response, jsonify
from quart_schema import document

from .. import __version__
from .assets import VENDORED, vendored
from .metrics import CONTENT_TYPE
from .render import pygments_css
from .state import current

ops = Blueprint("ops", __name__)

_CACHED = {"Cache-Control": "public, max-age=86400"}


class HealthModel(BaseModel):
    state: Literal["none", "loading", "ready", "failed"]
    name: str | None
    error: str | None


class Health(BaseModel):
    """Whether the server can answer: ``ok`` with a model loaded, ``draining`` (with status 503)
    while it stops gracefully, so that a load balancer sends it no more work, else
    ``degraded`` and why."""

    status: Literal["ok", "degraded", "draining"]
    model: HealthModel
    uptime_seconds: float
    version: str


@ops.get("/healthz")
@document(responses={200: (Health, None), 503: (Health, None)})
async def healthz() -> Response:
    state = current()
    slot = state.model
    status = "draining" if state.draining else "ok" if slot.state == "ready" else "degraded"
    body = {
        "status": status,
        "model": {"state": slot.state, "name": slot.name or None, "error": None if slot.state in ("ready", "loading") else slot.error},
        "uptime_seconds": round(state.uptime, 3),
        "version": __version__,
    }
    response = jsonify(body)
    if status == "draining":
        response.status_code = 503
    return response


@ops.get("/metrics")
async def metrics() -> Response:
    """The server's gauges, counters and histograms in Prometheus' text format."""
    return Response(current().metrics.exposition(), mimetype=None, content_type=CONTENT_TYPE)


@ops.get("/status")
async def status() -> Response:
    """Counters for operators and tests: sessions, generations, admission (the engine's limits
    and their use), per-event latency."""
    state = current()
    model = state.model.model
    service = state.generations
    browser = service.door("chat_ui")
    api = [c for door, c in service.counts.items() if door != "chat_ui"]
    return jsonify(
        {
            "model": state.model.label,
            "sessions": len(state.sessions),
            "active_sessions": state.sessions.active(),
            "generating": state.sessions.generating(),
            # Generations started, cancelled by their caller, and under way, by door.
            "generations": {door: dataclasses.asdict(c) for door, c in service.counts.items()},
            "generations_started": browser.started,
            "generations_cancelled": browser.cancelled,
            "api_generating": sum(c.active for c in api),
            "api_cancelled": sum(c.cancelled for c in api),
            "api_clients": len(service.clients),
            "per_client_limit": service.per_client_limit(),
            "admission": model.admission if model is not None else None,
            "kv_cache": model.kv_cache_bytes if model is not None else None,
            "prefix_cache": model.prefix_cache_stats if model is not None else None,
            "speculation": model.speculation if model is not None else None,
            # The model's recommended settings (used where the server and the request set none)
            # and whether its template switches thinking.
            "recommended": model.recommended.to_dict() if model is not None and model.recommended is not None else None,
            "thinking_switch": state.model.thinking_switch,
            "draining": state.draining,
            "event_latency": state.latency.summary(),
            "dropped_subscribers": state.dropped_subscribers(),
            "uptime_seconds": round(state.uptime, 3),
        }
    )


@ops.get("/static/vendor/<name>")
async def vendor(name: str) -> Response:
    if name not in VENDORED:
        return Response("not found", 404)
    return Response(vendored(name), mimetype="text/javascript", headers=_CACHED)


@ops.get("/static/pygments.css")
async def code_css() -> Response:
    return Response(pygments_css(), mimetype="text/css", headers=_CACHED)
