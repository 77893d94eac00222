"""The smolcandle web server: the browser chat (HTMX over Server-Sent Events) in a Quart app.

``create_app(...)`` returns the ASGI app for any server; ``smolcandle serve`` runs it under
Hypercorn.
"""

from .app import create_app, serve
from .state import ChatSettings

__all__ = ["ChatSettings", "create_app", "serve"]
