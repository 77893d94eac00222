"""What the Ollama door's endpoints share: the request body read and validated, the model a
request names, options mapped onto sampling, a model's description, and the timings of the
final chunk."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from quart import request

from ..state import ServerState, current
from .errors import OllamaError
from .protocol import Options

M = TypeVar("M", bound=BaseModel)

#: The Ollama API version this door follows (clients read it to know what they may send).
OLLAMA_VERSION = "0.12.0"

TEXT_ONLY = "this model reads text only: images are not supported"

# llama.cpp's file types (general.file_type), as Ollama names the quantization level.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L"}
_FILE_TYPES |= {14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


async def body(model: type[M]) -> M:
    """The request's JSON body as ``model`` (a ValidationError is a 400 in Ollama's shape)."""
    data = await request.get_json(force=True, silent=False)
    if not isinstance(data, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    return model.model_validate(data)


def served_name(state: ServerState) -> str | None:
    """The model's name as Ollama writes names (``name:tag``)."""
    name = state.model.name
    base = name.removesuffix(".gguf")
    return f"{base}:latest" if base else None


def require_model(requested: str) -> Any:
    """The model, if the request names the one served (with or without its tag), else 404; one
    that cannot answer yet is refused by the generation service (503)."""
    state = current()
    served = served_name(state)
    if served is None or requested not in (served, served.removesuffix(":latest"), state.model.name):
        raise OllamaError(404, f"model {requested!r} not found; this server serves {served!r}" if served else f"model {requested!r} not found: no model is loaded")
    return state.generations.model()


def sampling(options: Options | None) -> dict[str, Any]:
    """``options`` in :meth:`Model.generate`'s keywords (``None``: not set)."""
    o = options or Options()
    stop = [o.stop] if isinstance(o.stop, str) else (o.stop or [])
    return {
        "temperature": o.temperature,
        "top_p": o.top_p,
        "top_k": o.top_k or None,
        "min_p": o.min_p,
        "repeat_penalty": o.repeat_penalty,
        "presence_penalty": o.presence_penalty or None,
        "frequency_penalty": o.frequency_penalty or None,
        "seed": o.seed,
        "stop": stop or None,
    }


def max_tokens(options: Options | None) -> int | None:
    """``num_predict``: a positive count; -1 (until done) and -2 (fill the context) leave the
    server's limit, and the engine's (half the context at most), in force."""
    n = options.num_predict if options is not None else None
    return n if n is not None and n > 0 else None


def constraint(fmt: str | dict[str, Any] | None) -> dict[str, Any]:
    """``format``: ``"json"`` is any JSON object, a dict is a JSON schema the answer follows."""
    if fmt == "json":
        return {"json_schema": {"type": "object"}}
    if isinstance(fmt, dict):
        return {"json_schema": fmt or {"type": "object"}}
    return {}


def thinking(think: bool | str | None) -> bool | None:
    """``think``: true or an effort level turn the model's thinking on, false off; unset leaves
    the model's default."""
    if think is None:
        return None
    return think is not False


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def timings(started: float, usage: Any) -> dict[str, int]:
    """The final chunk's counts and durations (nanoseconds), from the engine's usage."""
    total = int((time.perf_counter() - started) * 1e9)
    if usage is None:
        return {"total_duration": total, "load_duration": 0, "prompt_eval_count": 0, "prompt_eval_duration": 0, "eval_count": 0, "eval_duration": 0}
    return {
        "total_duration": total,
        "load_duration": 0,  # the model is loaded once, when the server starts
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": int(usage.prefill_seconds * 1e9),
        "eval_count": usage.completion_tokens,
        "eval_duration": int(usage.decode_seconds * 1e9),
    }


def done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


def line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _parameters(config: dict[str, Any]) -> int:
    e, ff, layers, vocab = config["n_embd"], config["n_ff"], config["n_layer"], config["n_vocab"]
    q = config["n_head"] * config["head_dim"]
    kv = config["n_head_kv"] * config["head_dim"]
    per_layer = e * q * 2 + e * kv * 2 + 3 * e * ff + 2 * e
    return vocab * e * (1 if config["tied_embeddings"] else 2) + layers * per_layer + e


def _size_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def describe(state: ServerState) -> dict[str, Any]:
    """The served model as ``/api/tags``, ``/api/ps`` and ``/api/show`` describe it."""
    slot = state.model
    name = served_name(state) or ""
    path = slot.path if slot.path is not None else None
    model = slot.model
    if path is None and model is not None:
        from pathlib import Path

        path = Path(model.path)
    stat = path.stat() if path is not None and path.exists() else None
    modified = datetime.fromtimestamp(stat.st_mtime, UTC) if stat else datetime.now(UTC)
    details: dict[str, Any] = {"parent_model": "", "format": "gguf", "family": "", "families": [], "parameter_size": "", "quantization_level": ""}
    if model is not None:
        config, meta = model.config, model.metadata
        details |= {
            "family": config["architecture"],
            "families": [config["architecture"]],
            "parameter_size": _size_label(_parameters(config)),
            "quantization_level": _FILE_TYPES.get(meta.get("general.file_type", -1), "unknown"),
        }
    identity = f"{name}\0{stat.st_size if stat else 0}\0{stat.st_mtime_ns if stat else 0}"
    return {
        "name": name,
        "model": name,
        "modified_at": modified.isoformat().replace("+00:00", "Z"),
        "size": stat.st_size if stat else 0,
        "digest": hashlib.sha256(identity.encode()).hexdigest(),
        "details": details,
    }
