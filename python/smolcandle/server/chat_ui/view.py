"""What a page of the browser chat shows: a conversation's messages as bubbles, with the
answer under way in the state this replica holds of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from ..history import Message
from ..render import markdown
from ..sessions import Session, Turn
from ..state import ServerState
from . import answers, pages


@dataclass
class Item:
    role: str
    dom_id: str
    text: str = ""
    reasoning: str = ""
    body: Markup = dataclasses.field(default_factory=Markup)
    stats: str = ""
    finish: str | None = None
    kind: str = "assistant"


def items(messages: list[Message], turn: Turn | None) -> list[Item]:
    out = []
    for m in messages:
        if m.role == "user":
            out.append(Item("user", f"m{m.id}", text=m.content))
        elif turn is not None and turn.message_id == m.id:
            out.append(Item("assistant", turn.dom_id, reasoning=turn.reasoning, body=turn.body, stats=turn.stats, finish=turn.finish))
        elif m.finish_reason is None:  # being written by another replica: its events fill it in
            out.append(Item("assistant", f"m{m.id}", reasoning=m.reasoning, body=markdown(m.content), stats="writing…"))
        else:
            stats = pages.stats(m.completion_tokens, m.tokens_per_second, m.finish_reason)
            out.append(Item("assistant", f"m{m.id}", reasoning=m.reasoning, body=markdown(m.content), stats=stats, finish=m.finish_reason or "stop"))
    return out


async def of(state: ServerState, s: Session, conversation_id: int | None) -> dict[str, Any] | None:
    """Everything main.html needs for one conversation (``None``: a new chat), taken under the
    session lock so that it and ``after`` agree about which events the page already reflects.
    ``after`` is taken first: an answer's last state is saved before it is published, so a page
    that missed its last event (taken before ``after``) shows that state from the history."""
    async with s.lock:
        after = await s.channel.last_event_id()
        messages: list[Message] = []
        title = "New chat"
        if conversation_id is not None:
            conv = await state.history.conversation(s.id, conversation_id)
            if conv is None:
                return None
            title = conv.title
            messages = await state.history.messages(s.id, conversation_id)
        conv_key = str(conversation_id) if conversation_id is not None else "new"
        turn = s.turn if s.turn is not None and s.turn.conv_key == conv_key else None
        shown = items(messages, turn)
        if turn is not None and turn.message_id is None and turn.finish is None:  # a command's output under way
            shown.append(Item("user", turn.user_id, text=turn.user_text))
            shown.append(Item("assistant", turn.dom_id, reasoning=turn.reasoning, body=turn.body, stats=turn.stats, kind=turn.kind))
        slot = state.model
        return {
            "title": title,
            "conv_key": conv_key,
            "items": shown,
            "thinking": s.enable_thinking,
            "thinking_switch": slot.thinking_switch,
            "reasoning_budget": answers.reasoning_budget(state, s),
            "model": {"state": slot.state, "label": slot.label},
            "notice": "" if slot.state in ("ready", "loading") else slot.label,
            "after": after,
        }


async def conversations(state: ServerState, s: Session) -> list[Any]:
    return await state.history.conversations(s.id)
