"""The browser chat's templates: whole pages, and the fragments (templates/bubbles.html's
macros) that answers are published as. Rendered synchronously, outside any request too
(answers are rendered on worker threads), so a plain Jinja environment, not Quart's."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from .. import limits
from ..assets import TEMPLATES

NO_THINKING_SWITCH = "This model's chat template has no thinking switch: it answers without reasoning first."

_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
_env.globals["limits"] = limits
_env.globals["no_switch"] = NO_THINKING_SWITCH


def render(name: str, **context: Any) -> str:
    return _env.get_template(name).render(**context)


def bubbles() -> Any:
    """The macros of templates/bubbles.html."""
    return _env.get_template("bubbles.html").module


def stats(tokens: int | None, tps: float | None, finish: str | None, first_token: float | None = None) -> str:
    """The line under an answer: its length, speed, time to the first token and how it ended."""
    parts = []
    if tokens is not None:
        parts.append(f"{tokens} tokens")
    if tps:
        parts.append(f"{tps:.1f} tok/s")
    if first_token is not None:
        parts.append(f"prompt {first_token:.2f} s")
    label = {"length": "cut off at the length limit", "cancelled": "stopped", "interrupted": "interrupted (server stopped)", "error": "failed"}.get(finish or "")
    if label:
        parts.append(label)
    return " · ".join(parts)
