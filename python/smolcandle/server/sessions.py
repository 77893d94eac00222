"""The browser sessions this replica holds: each one's channel (its tabs' event stream), what
it chose (thinking, a reasoning budget), and the answer it is having written (a turn). With
replicas, what a session chose lives in Redis and its events on a Redis stream."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from .hub import Channel, SessionChannel

if TYPE_CHECKING:
    from .generations import Generation
    from .replicas import Replicas

SESSION_COOKIE = "smolcandle_session"
SESSION_COOKIE_SECONDS = 365 * 24 * 3600
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(eq=False)
class Turn:
    """One answer being produced: what the page shows of it so far (updated on the event loop)."""

    conv_key: str
    user_id: str
    dom_id: str
    user_text: str
    kind: str = "assistant"  # "system" for command output
    conversation_id: int | None = None
    message_id: int | None = None
    reasoning: str = ""
    body: Markup = field(default_factory=Markup)
    stats: str = ""
    finish: str | None = None
    #: The model's answer under way (``None``: a command's output, or not started yet).
    generation: Generation[Any] | None = None
    cancelled: bool = False
    # Stopped by the server shutting down, not by its user.
    interrupted: bool = False
    # The replicas' claim on the session's answer slot (None: an immediate answer; "": a lone server).
    claim: str | None = None
    task: asyncio.Task[None] | None = None

    def cancel(self, *, interrupted: bool = False) -> None:
        self.interrupted = self.interrupted or interrupted
        self.cancelled = True
        if self.generation is not None:
            self.generation.cancel(interrupted=interrupted)


@dataclass(eq=False)
class Session:
    id: str
    channel: SessionChannel = field(default_factory=Channel)
    enable_thinking: bool = True
    #: The browser's reasoning budget; ``None``: the server's (``ChatSettings``).
    max_reasoning_tokens: int | None = None
    turn: Turn | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_seen: float = field(default_factory=time.monotonic)
    context_tokens: int | None = None
    counter: int = 0

    @property
    def generating(self) -> bool:
        return self.turn is not None and self.turn.finish is None


class Sessions:
    """Sessions by their cookie. The id is 256 random bits; a cookie that is not one of ours
    gets a fresh session rather than an error. With replicas, what a session chose lives in
    Redis (:meth:`load`, :meth:`save`) and its events on a Redis stream, so any replica serves
    it; this object then only holds what this replica is doing for it."""

    IDLE_SECONDS = 24 * 3600

    def __init__(self, replicas: Replicas | None = None) -> None:
        self._by_id: dict[str, Session] = {}
        self.replicas = replicas

    def _new(self, sid: str) -> Session:
        if self.replicas is None:
            return Session(sid)
        return Session(sid, channel=self.replicas.channel(sid))

    async def load(self, cookie: str | None) -> tuple[Session, bool]:
        """:meth:`get`, with the session's settings as the replicas share them."""
        s, new = self.get(cookie)
        if self.replicas is not None and not new:
            record = await self.replicas.load_session(s.id)
            if record:
                s.enable_thinking = record.get("thinking", "1") == "1"
                budget = record.get("budget", "")
                s.max_reasoning_tokens = int(budget) if budget else None
        return s, new

    async def save(self, s: Session) -> None:
        if self.replicas is not None:
            budget = "" if s.max_reasoning_tokens is None else str(s.max_reasoning_tokens)
            await self.replicas.save_session(s.id, thinking="1" if s.enable_thinking else "0", budget=budget)

    async def dom_ids(self, s: Session) -> tuple[str, str]:
        """Element ids for a turn's two bubbles that no other turn of the session has, on any
        replica."""
        if self.replicas is not None:
            n = await self.replicas.next_number(s.id)
        else:
            s.counter += 1
            n = s.counter
        return f"u{n}", f"e{n}"

    def get(self, cookie: str | None) -> tuple[Session, bool]:
        """The session for a cookie value, and whether it is new (the cookie must be set)."""
        now = time.monotonic()
        if cookie and _SESSION_ID.fullmatch(cookie):
            s = self._by_id.get(cookie)
            if s is None:  # a cookie from before a restart, or another replica's: its history is still there
                s = self._by_id[cookie] = self._new(cookie)
            s.last_seen = now
            return s, False
        self._prune(now)
        s = self._new(secrets.token_urlsafe(32))
        self._by_id[s.id] = s
        return s, True

    def peek(self, sid: str) -> Session | None:
        """The session, if this replica holds it."""
        return self._by_id.get(sid)

    def _prune(self, now: float) -> None:
        for sid, s in list(self._by_id.items()):
            if now - s.last_seen > self.IDLE_SECONDS and not s.channel.subscribers and not s.generating:
                del self._by_id[sid]

    def active(self) -> int:
        """Sessions with an open tab or an answer under way."""
        return sum(1 for s in self._by_id.values() if s.channel.subscribers or s.generating)

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[Session]:
        return list(self._by_id.values())

    def generating(self) -> int:
        return sum(1 for s in self._by_id.values() if s.generating)


