"""The smolcandle web server: the browser chat (HTMX over Server-Sent Events) and the
OpenAI-compatible ``/v1``, each a door on one generation service, in a Quart app.

``create_app(config)`` returns the ASGI app for any server; ``smolcandle serve`` builds the
:class:`ServerConfig` from its flags and runs the app under Hypercorn.
"""

from .app import create_app, serve
from .config import LOOPBACK_HOSTS, ChatSettings, EngineOptions, ServerConfig

__all__ = ["LOOPBACK_HOSTS", "ChatSettings", "EngineOptions", "ServerConfig", "create_app", "serve"]
