"""The Ollama door's blueprint under ``/api``: its routes, the API key (``Authorization:
Bearer``, as Ollama's clients send it), and errors in Ollama's shape."""

from __future__ import annotations

from quart import Blueprint

from ..doors import guard
from . import errors
from .chat import chat, generate
from .embed import embed, embeddings
from .errors import OllamaError
from .models import managed_elsewhere, running, show, tags, version

ollama = Blueprint("ollama", __name__, url_prefix="/api")
errors.register(ollama)
guard(ollama, OllamaError(401, "a valid API key is required (Authorization: Bearer KEY)"), x_api_key=False)
ollama.add_url_rule("/tags", view_func=tags, methods=["GET"])
ollama.add_url_rule("/ps", view_func=running, methods=["GET"])
ollama.add_url_rule("/version", view_func=version, methods=["GET"])
ollama.add_url_rule("/show", view_func=show, methods=["POST"])
ollama.add_url_rule("/chat", view_func=chat, methods=["POST"])
ollama.add_url_rule("/generate", view_func=generate, methods=["POST"])
ollama.add_url_rule("/embed", view_func=embed, methods=["POST"])
ollama.add_url_rule("/embeddings", view_func=embeddings, methods=["POST"])
for path, methods in (("/pull", ["POST"]), ("/push", ["POST"]), ("/create", ["POST"]), ("/copy", ["POST"]), ("/delete", ["DELETE"]), ("/blobs/<digest>", ["HEAD", "POST"])):
    ollama.add_url_rule(path, endpoint=f"manage{path.split('/')[1]}", view_func=managed_elsewhere, methods=methods)
