"""``POST /api/embed`` (inputs, ``embeddings``) and the older ``POST /api/embeddings``
(``prompt``, ``embedding``): the model's final hidden states mean-pooled and L2-normalised,
one vector per input (see :meth:`smolcandle.Model.embed`)."""

from __future__ import annotations

import json
import time
from typing import Any

from quart import Response

from ... import DEFAULTS
from .. import doors
from ..state import current
from . import serving
from .errors import OllamaError
from .protocol import EmbeddingsRequest, EmbedRequest

DOOR = "ollama"


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj), mimetype="application/json")


async def embed() -> Response:
    started = time.perf_counter()
    body = await serving.body(EmbedRequest)
    model = serving.require_model(body.model)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input or [])
    if body.dimensions is not None and body.dimensions != model.config["n_embd"]:
        raise OllamaError(400, f"dimensions: this model's vectors have {model.config['n_embd']} dimensions and cannot be shortened")
    if len(inputs) > DEFAULTS["max_embed_inputs"]:
        raise OllamaError(400, f"input: {len(inputs)} inputs are more than {DEFAULTS['max_embed_inputs']}")
    name = serving.served_name(current())
    if not inputs:
        return _json({"model": name, "embeddings": []})
    # Ollama cuts an input that does not fit to the context unless told not to.
    limit = min(DEFAULTS["max_embed_tokens"], model.n_ctx) if body.truncate else None
    result = await current().generations.embed(doors.caller(), DOOR, inputs, truncate_to=limit)
    timings = serving.timings(started, None)
    return _json(
        {
            "model": name,
            "embeddings": result.vectors,
            "total_duration": timings["total_duration"],
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def embeddings() -> Response:
    body = await serving.body(EmbeddingsRequest)
    model = serving.require_model(body.model)
    if not body.prompt:
        return _json({"embedding": []})
    limit = min(DEFAULTS["max_embed_tokens"], model.n_ctx)
    result = await current().generations.embed(doors.caller(), DOOR, [body.prompt], truncate_to=limit)
    return _json({"embedding": result.vectors[0]})
