"""``GET /v1/models`` and ``GET /v1/models/{id}``: the model this server serves (while it
loads, too)."""

from __future__ import annotations

import json
import time
from typing import Any

from quart import Response
from quart_schema import document

from ..state import current
from . import serving
from .errors import ApiError
from .protocol import ErrorResponse, ModelCard, ModelList


def _cards() -> list[dict[str, Any]]:
    state = current()
    served = serving.model_id(state)
    created = int(state.model.path.stat().st_mtime) if state.model.path is not None and state.model.path.exists() else int(time.time())
    return [{"id": served, "object": "model", "created": created, "owned_by": "smolcandle"}] if served and state.model.state in ("ready", "loading") else []


@document(responses={200: (ModelList, None), 401: (ErrorResponse, None)})
async def list_models() -> Response:
    return Response(json.dumps({"object": "list", "data": _cards()}), mimetype="application/json")


@document(responses={200: (ModelCard, None), 401: (ErrorResponse, None), 404: (ErrorResponse, None)})
async def retrieve_model(model: str) -> Response:
    card = next((c for c in _cards() if model in (c["id"], current().model.name)), None)
    if card is None:
        raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
    return Response(json.dumps(card), mimetype="application/json")
