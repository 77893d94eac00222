"""The OpenAI door's blueprint under ``/v1``: its routes, the API key, CORS, and errors in
OpenAI's shape."""

from __future__ import annotations

from quart import Blueprint, Response, request

from ..state import current
from . import errors
from .chat import chat_completions
from .completions import completions
from .embeddings import embeddings
from .errors import ApiError
from .models import list_models, retrieve_model
from .responses import create_response, delete_response, get_response

api = Blueprint("api", __name__, url_prefix="/v1")
errors.register(api)
api.add_url_rule("/models", view_func=list_models, methods=["GET"])
api.add_url_rule("/models/<path:model>", view_func=retrieve_model, methods=["GET"])
api.add_url_rule("/chat/completions", view_func=chat_completions, methods=["POST"])
api.add_url_rule("/completions", view_func=completions, methods=["POST"])
api.add_url_rule("/responses", view_func=create_response, methods=["POST"])
api.add_url_rule("/responses/<response_id>", view_func=get_response, methods=["GET"])
api.add_url_rule("/responses/<response_id>", view_func=delete_response, methods=["DELETE"], endpoint="delete_response")
api.add_url_rule("/embeddings", view_func=embeddings, methods=["POST"])


@api.before_request
async def _access() -> Response | None:
    state = current()
    if request.method == "OPTIONS" and state.config.cors_origins:
        return Response("", 204)
    if state.auth.api_key and not state.auth.request_key_matches(request.headers.get("Authorization"), request.headers.get("x-api-key")):
        return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key").response()
    return None


@api.after_request
async def _cors(response: Response) -> Response:
    origins = current().config.cors_origins
    origin = request.headers.get("Origin")
    if origins and origin and ("*" in origins or origin in origins):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, x-api-key"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
    return response
