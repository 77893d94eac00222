"""The browser chat: an HTMX page whose answers arrive as out-of-band fragments over SSE.

A message is posted by HTMX; the response is at once the user's bubble and an empty answer
bubble with its own id. The answer is produced in the background (through the generation
service) and every change to it is published on the session's channel as a fragment aimed at
that bubble (``hx-swap-oob``); the SSE extension swaps them in. Every fragment carries the
whole current state of what it targets (the answer's markdown rendered so far, not a delta),
so replays and reconnections can never double text.
"""

from .answers import on_command, on_lapsed
from .routes import ui

__all__ = ["on_command", "on_lapsed", "ui"]
