"""``GET /api/tags``, ``/api/ps``, ``/api/version`` and ``POST /api/show``: the one model
this server serves; and the model-management calls (pull, push, create, copy, delete), which
answer how a model is added to this server instead."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from quart import Response

from ... import DEFAULTS
from ..state import current
from . import serving
from .errors import OllamaError
from .protocol import ShowRequest

MANAGED_ELSEWHERE = (
    "this server serves one GGUF model and does not manage models through the API: pull one with "
    "`smolcandle models pull NAME` (or put a .gguf file in the models folder) and restart `smolcandle serve` with it"
)


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), mimetype="application/json")


def _listed() -> list[dict[str, Any]]:
    state = current()
    return [serving.describe(state)] if serving.served_name(state) and state.model.state in ("ready", "loading") else []


async def tags() -> Response:
    return _json({"models": _listed()})


async def running() -> Response:
    state = current()
    model = state.model.model
    if model is None or state.model.state != "ready":
        return _json({"models": []})
    entry = serving.describe(state)
    # Loaded for as long as the server runs: keep_alive has no effect here.
    entry |= {"expires_at": (datetime.now(UTC) + timedelta(days=3650)).isoformat().replace("+00:00", "Z"), "size_vram": 0, "context_length": model.n_ctx}
    return _json({"models": [entry]})


async def version() -> Response:
    return _json({"version": serving.OLLAMA_VERSION})


async def show() -> Response:
    body = await serving.body(ShowRequest)
    requested = body.model or body.name
    if not requested:
        raise OllamaError(400, "model is required")
    model = serving.require_model(requested)
    state = current()
    entry = serving.describe(state)
    config, meta = model.config, model.metadata
    arch = config["architecture"]
    info: dict[str, Any] = {k: v for k, v in meta.items() if isinstance(v, int | float | str | bool) and not k.startswith("tokenizer.chat_template")}
    info |= {
        "general.architecture": arch,
        f"{arch}.context_length": config["n_ctx_train"],
        f"{arch}.embedding_length": config["n_embd"],
        f"{arch}.block_count": config["n_layer"],
        f"{arch}.attention.head_count": config["n_head"],
        f"{arch}.attention.head_count_kv": config["n_head_kv"],
        f"{arch}.feed_forward_length": config["n_ff"],
    }
    settings = state.settings
    recommended = model.recommended.sampling() if model.recommended is not None else {}
    params = {k: v for k, v in {**recommended, **settings.sampling()}.items() if v is not None}
    params.setdefault("temperature", DEFAULTS["temperature"])
    params["num_ctx"] = model.n_ctx
    capabilities = ["completion", "tools"]
    if model.chat_template.has_thinking_switch:
        capabilities.append("thinking")
    return _json(
        {
            "modelfile": f"# served by smolcandle\nFROM {model.path}\n",
            "parameters": "\n".join(f"{k} {v}" for k, v in params.items()),
            "template": model.chat_template.source,
            "details": entry["details"],
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": entry["modified_at"],
        }
    )


async def managed_elsewhere(**_: Any) -> Response:
    raise OllamaError(501, MANAGED_ELSEWHERE)
