"""The Ollama door under ``/api``: Ollama's own API as its clients speak it (the ``ollama``
Python and JavaScript libraries, Open WebUI's Ollama connection, every tool built for it).

Chat and generate stream newline-delimited JSON by default (``"stream": false`` answers whole);
``options`` map onto the engine's sampling; ``format`` (``"json"`` or a JSON schema), tools and
``think`` go through the same structured output, tool-call parsing and thinking switch as the
OpenAI door. Every failure, unknown paths included, is ``{"error": "..."}`` with a 4xx status
for bad input. Generations go through the server's generation service.
"""

from .errors import not_found
from .router import ollama

__all__ = ["not_found", "ollama"]
