"""The browser chat's files: the repository's top-level ``web/`` (templates, CSS, JavaScript),
which the wheel ships as ``smolcandle/web``, and htmx with its SSE extension as the
``hedron-core`` package ships them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

WEB = Path(__file__).resolve().parent.parent / "web"
TEMPLATES = WEB / "templates"
STATIC = WEB / "static"

VENDORED = ("htmx.min.js", "sse.js")


def vendored(name: str) -> bytes:
    """One of :data:`VENDORED`, read from the ``hedron-core`` package."""
    base = resources.files("hedron_core") / "static"
    path = {"htmx.min.js": base / "htmx.min.js", "sse.js": base / "ext" / "sse.js"}[name]
    return path.read_bytes()
