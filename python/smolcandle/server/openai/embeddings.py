"""``POST /v1/embeddings``: one vector per input, the model's final hidden states mean-pooled
and L2-normalised (see :meth:`smolcandle.Model.embed`; a decoder's pooled states, not a
trained embedding model's), as floats or, with ``encoding_format: "base64"`` (the ``openai``
package's default), as the base64 of little-endian float32s."""

from __future__ import annotations

import base64
import json
import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Response
from quart_schema import document, validate_request

from ... import DEFAULTS
from .. import doors
from ..state import current
from . import serving
from .errors import ApiError
from .protocol import ERRORS

DOOR = "openai"
_MAX = DEFAULTS["max_embed_inputs"]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=_MAX)]
        | Annotated[list[Annotated[int, Field(ge=0, lt=1 << 32)]], Field(min_length=1)]
        | Annotated[list[Annotated[list[Annotated[int, Field(ge=0, lt=1 << 32)]], Field(min_length=1)]], Field(min_length=1, max_length=_MAX)]
    ) = Field(description=f"a text, a list of texts, a list of token ids, or a list of those lists (at most {_MAX} inputs)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="the model's own dimension only: its vectors cannot be shortened")
    user: str | None = None


class EmbeddingOut(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """Embeddings, one per input in order."""

    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@validate_request(EmbeddingRequest)
@document(responses={200: (EmbeddingList, None), **ERRORS})
async def embeddings(data: EmbeddingRequest) -> Response:
    model = serving.require_model(data.model)
    if data.dimensions is not None and data.dimensions != model.config["n_embd"]:
        raise ApiError(400, f"this model's vectors have {model.config['n_embd']} dimensions and cannot be shortened", param="dimensions")
    raw = data.input
    inputs: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    result = await current().generations.embed(doors.caller(), DOOR, inputs)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, data.encoding_format)} for i, v in enumerate(result.vectors)],
        "model": serving.model_id(current()),
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return Response(json.dumps(body), mimetype="application/json")
