"""``GET /v1/models``: the model this server serves (while it loads, too)."""

from __future__ import annotations

import json
import time

from quart import Response
from quart_schema import document

from ..state import current
from . import serving
from .protocol import ErrorResponse, ModelList


@document(responses={200: (ModelList, None), 401: (ErrorResponse, None)})
async def list_models() -> Response:
    state = current()
    served = serving.model_id(state)
    created = int(state.model.path.stat().st_mtime) if state.model.path is not None and state.model.path.exists() else int(time.time())
    data = [{"id": served, "object": "model", "created": created, "owned_by": "smolcandle"}] if served and state.model.state in ("ready", "loading") else []
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")
