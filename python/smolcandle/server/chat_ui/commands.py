"""The browser chat's commands (``/help``, ``/status``, ``/think``…): answered at once in the
conversation's view, never stored, never sent to the model."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

from quart import Response

from ..render import markdown
from ..sessions import Session, Turn
from ..state import ServerState
from . import answers, pages, view

# /quote writes about as fast as a model answers on a CPU.
QUOTE_WORD_SECONDS = 0.05

HELP = """**Commands**

| command | does |
|---|---|
| `/help` | this list |
| `/status` | model, device, context use, uptime, active sessions |
| `/think`, `/no_think` | switch the model's reasoning on or off |
| `/reset` | start a new conversation |
| `/quote` | stream a quote without the model |

Enter sends, Shift+Enter starts a new line. **Stop** ends an answer early."""

QUOTES = [
    "> The best way to predict the future is to invent it.\n\n— *Alan Kay*",
    "> Simplicity is prerequisite for reliability.\n\n— *Edsger W. Dijkstra*",
    "> Premature optimization is the root of all evil.\n\n— *Donald Knuth*, in `Structured Programming with go to Statements` (1974)",
    "> Programs must be written for people to read, and only incidentally for machines to execute.\n\n— *Harold Abelson and Gerald Jay Sussman*",
    "> The purpose of computing is insight, not numbers.\n\n— *Richard Hamming*",
]


async def run(state: ServerState, s: Session, conv_key: str, text: str) -> Any:
    """Answers a message that starts with a slash."""
    name, _, _arg = text.partition(" ")
    name = name.lower()
    if name == "/reset":
        html = pages.render("main.html", **await view.of(state, s, None))
        return Response(html, 200, headers={"HX-Retarget": "#main", "HX-Reswap": "innerHTML", "HX-Push-Url": "/"})
    if name in ("/think", "/no_think") and state.model.thinking_switch is False:
        return await answers.start_turn(state, s, conv_key, text, kind="system", answer=pages.NO_THINKING_SWITCH)
    if name in ("/think", "/no_think"):
        await set_thinking(state, s, name == "/think")
        reply = "Thinking is **on**: the model reasons before it answers." if name == "/think" else "Thinking is **off**."
        return await answers.start_turn(state, s, conv_key, text, kind="system", answer=reply)
    if name == "/help":
        return await answers.start_turn(state, s, conv_key, text, kind="system", answer=HELP)
    if name == "/status":
        return await answers.start_turn(state, s, conv_key, text, kind="system", answer=_status_text(state, s))
    if name == "/quote":
        return await answers.start_turn(state, s, conv_key, text, kind="system", produce=_stream_quote(random.choice(QUOTES)))
    return await answers.start_turn(state, s, conv_key, text, kind="system", answer=f"Unknown command `{name}`.\n\n{HELP}")


def _status_text(state: ServerState, s: Session) -> str:
    slot = state.model
    up = int(state.uptime)
    rows = [
        ("model", f"{slot.name or '—'} ({slot.state})" + (f": {slot.error}" if slot.state in ("failed", "none") else "")),
        ("device", slot.model.device if slot.model is not None else "—"),
        (
            "context",
            f"{s.context_tokens} of {slot.model.n_ctx} tokens used by the last answer"
            if s.context_tokens is not None and slot.model is not None
            else "no answer yet in this session",
        ),
        ("uptime", f"{up // 3600}h {up % 3600 // 60}m {up % 60}s"),
        ("active sessions", str(state.sessions.active())),
        ("thinking", _thinking_status(slot, s)),
        ("reasoning budget", f"{budget} tokens" if (budget := answers.reasoning_budget(state, s)) is not None else "none"),
        ("recommended", _recommended_status(slot)),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v.replace('|', '∣')} |" for k, v in rows)


def _thinking_status(slot: Any, s: Session) -> str:
    if slot.thinking_switch is False:
        return "off: this model's chat template has no thinking switch"
    return "on" if s.enable_thinking else "off"


def _recommended_status(slot: Any) -> str:
    rec = slot.model.recommended if slot.model is not None else None
    if rec is None:
        return "none (the engine's defaults)"
    return ", ".join(f"{k} {v!r}" for k, v in rec.to_dict().items()) + " (where the server sets none)"


def _stream_quote(text: str) -> Any:
    """Streams ``text`` a word at a time, with no model involved."""

    async def produce(state: ServerState, s: Session, turn: Turn) -> None:
        pieces = re.findall(r"\S+\s*", text)
        shown = ""
        t0 = time.perf_counter()
        for i, piece in enumerate(pieces):
            await asyncio.sleep(QUOTE_WORD_SECONDS)
            if turn.cancelled:
                break
            shown += piece
            answers.apply(state, s, turn, body=markdown(shown), stats=f"{i + 1} of {len(pieces)} words")
        rate = len(shown.split()) / max(time.perf_counter() - t0, 1e-9)
        finish = "cancelled" if turn.cancelled else "stop"
        answers.apply(state, s, turn, body=markdown(shown), stats=f"quote · {len(shown.split())} words · {rate:.0f} words/s" + (" · stopped" if turn.cancelled else ""), finish=finish)

    return produce


async def set_thinking(state: ServerState, s: Session, on: bool) -> None:
    """Switches the session's reasoning, in every tab."""
    s.enable_thinking = on
    await state.sessions.save(s)
    s.channel.publish(str(pages.bubbles().thinking_toggle(on, state.model.thinking_switch, oob=True)))
