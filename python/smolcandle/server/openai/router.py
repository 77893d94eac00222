"""The OpenAI door's blueprint under ``/v1``: its routes, the API key, CORS, and errors in
OpenAI's shape."""

from __future__ import annotations

from quart import Blueprint

from ..doors import Cors, guard
from . import errors
from .chat import chat_completions
from .completions import completions
from .embeddings import embeddings
from .errors import ApiError
from .models import list_models, retrieve_model
from .responses import create_response, delete_response, get_response

api = Blueprint("api", __name__, url_prefix="/v1")
errors.register(api)
guard(
    api,
    ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key"),
    cors=Cors(headers="Authorization, Content-Type, x-api-key", methods="GET, POST, DELETE, OPTIONS"),
)
api.add_url_rule("/models", view_func=list_models, methods=["GET"])
api.add_url_rule("/models/<path:model>", view_func=retrieve_model, methods=["GET"])
api.add_url_rule("/chat/completions", view_func=chat_completions, methods=["POST"])
api.add_url_rule("/completions", view_func=completions, methods=["POST"])
api.add_url_rule("/responses", view_func=create_response, methods=["POST"])
api.add_url_rule("/responses/<response_id>", view_func=get_response, methods=["GET"])
api.add_url_rule("/responses/<response_id>", view_func=delete_response, methods=["DELETE"], endpoint="delete_response")
api.add_url_rule("/embeddings", view_func=embeddings, methods=["POST"])
