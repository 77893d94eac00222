"""What the server holds while it runs: the model slot, the chat settings, the browser
sessions and their answers in progress, counters. No web framework here: the blueprints read
and change this state, and the history and channels it holds are their own modules."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from .. import store
from .._model import DEFAULTS, Model
from ..chat import ChatStream
from .assets import TEMPLATES
from .history import HistoryStore, SqliteHistory
from .history_pg import PostgresHistory
from .hub import Channel, LatencyStats, SessionChannel
from .metrics import Metrics
from .replicas import Replicas

SESSION_COOKIE = "smolcandle_session"
# Proof that this browser gave the API key (when the key guards the chat): an HMAC of a fixed
# label under the key, so it needs no server-side state and a new key revokes it.
AUTH_COOKIE = "smolcandle_auth"


def chat_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"smolcandle browser chat", hashlib.sha256).hexdigest()
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


NO_THINKING_SWITCH = "This model's chat template has no thinking switch: it answers without reasoning first."


@dataclass
class ChatSettings:
    """Sampling for the answers (the browser chat's and, where a request sets none, /v1's).
    Left at ``None``, the model's recommended settings apply, then the engine's defaults."""

    max_tokens: int = DEFAULTS["chat_max_tokens"]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    system_prompt: str | None = None
    max_reasoning_tokens: int | None = None

    def sampling(self) -> dict[str, Any]:
        keys = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
        return {k: getattr(self, k) for k in keys}


class ModelSlot:
    """The model the server answers with, and where its loading stands."""

    def __init__(self) -> None:
        self.state = "none"  # none | loading | ready | failed
        self.model: Model | None = None
        self.name = ""
        self.path: Path | None = None
        self.error = "no model was found (pull one with `smolcandle models pull smollm2-135m`, or pass a GGUF file to `smolcandle serve`)"

    @property
    def label(self) -> str:
        if self.state == "ready" and self.model is not None:
            return f"{self.name} · {self.model.device} · {self.model.n_ctx} tokens"
        if self.state == "loading":
            return f"loading {self.name} …"
        return f"no model: {self.error}"

    @property
    def thinking_switch(self) -> bool | None:
        """Whether the model's chat template switches thinking on and off (``None``: no model yet)."""
        if self.state != "ready" or self.model is None:
            return None
        return self.model.chat_template.has_thinking_switch

    @property
    def unavailable_reason(self) -> str | None:
        if self.state == "ready":
            return None
        if self.state == "loading":
            return f"The model ({self.name}) is still loading; try again in a moment."
        return f"No model is loaded, so there is nothing to answer with: {self.error}."


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
    stream: ChatStream | None = None
    cancelled: bool = False
    # Stopped by the server shutting down, not by its user.
    interrupted: bool = False
    # The replicas' claim on the session's answer slot (None: an immediate answer; "": a lone server).
    claim: str | None = None
    task: asyncio.Task[None] | None = None

    def cancel(self, *, interrupted: bool = False) -> None:
        self.interrupted = self.interrupted or interrupted
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()


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


@dataclass(eq=False)
class ServerState:
    model: ModelSlot
    history: HistoryStore
    settings: ChatSettings
    sessions: Sessions = field(default_factory=Sessions)
    # The Redis that replicas share (None: one server, everything in this process).
    replicas: Replicas | None = None
    latency: LatencyStats = field(default_factory=LatencyStats)
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.monotonic)
    generations_started: int = 0
    generations_cancelled: int = 0
    api_key: str | None = None
    guard_chat: bool = False
    secure_cookies: bool = False
    cors_origins: tuple[str, ...] = ()
    api_active: int = 0
    api_cancelled: int = 0
    # Generations under way per /v1 client (an API key, or an address), each at most
    # ``client_limit`` at once (None: half of what the engine holds, running and queued, so
    # that one client never fills the queue alone); the relays of all of them, to end on
    # shutdown.
    api_clients: dict[str, int] = field(default_factory=dict)
    client_limit: int | None = None
    api_relays: set[Any] = field(default_factory=set)
    # Set on the first SIGTERM: new work is refused while running answers finish.
    draining: bool = False
    # Templates are rendered synchronously, outside any request too (answers are rendered on
    # worker threads and applied from loop callbacks): a plain Jinja environment, not Quart's.
    templates: Environment = field(
        default_factory=lambda: Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    )

    def __post_init__(self) -> None:
        self.templates.globals["limits"] = DEFAULTS
        self.templates.globals["no_switch"] = NO_THINKING_SWITCH
        self.metrics.watch(self.gauges)

    def gauges(self) -> dict[str, Any]:
        """What ``/metrics`` reads at each scrape (see :mod:`.metrics`)."""
        model = self.model.model
        sessions = self.sessions.all()
        values: dict[str, Any] = {
            "sessions": len(sessions),
            "generating_sessions": sum(1 for s in sessions if s.generating),
            "api_generating": self.api_active,
            "event_subscribers": sum(s.channel.subscribers for s in sessions),
            "dropped_subscribers": sum(s.channel.dropped_subscribers for s in sessions),
            "draining": int(self.draining),
            "model_ready": int(self.model.state == "ready"),
        }
        if self.replicas is not None:
            values["redis_pending_events"] = self.replicas.pending_events
            values["redis_dropped_events"] = self.replicas.dropped_events
        if model is not None:
            a, kv, prefix, spec = model.admission, model.kv_cache_bytes, model.prefix_cache_stats, model.speculation
            values.update(
                queue_depth=a["queued"],
                active_sequences=a["active"],
                max_active_sequences=a["max_active"],
                max_queue_depth=a["max_queued"],
                kv_reserved_bytes=a["kv_reserved_bytes"],
                kv_budget_bytes=a["kv_budget_bytes"],
                admission_refused=a["refused"],
                kv_cache_bytes=kv["bytes"],
                kv_cache_peak_bytes=kv["peak_bytes"],
                prefix_cache_bytes=prefix["bytes"],
                prefix_cache_entries=prefix["entries"],
                prefix_cache_hits=prefix["hits"],
                prefix_cache_misses=prefix["misses"],
                prefix_cache_reused_tokens=prefix["reused_tokens"],
                drafted_tokens=spec["drafted_tokens"],
                accepted_draft_tokens=spec["accepted_tokens"],
            )
        return values

    @property
    def fragments(self) -> Any:
        """The macros of templates/bubbles.html."""
        return self.templates.get_template("bubbles.html").module

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)

    def key_matches(self, given: str) -> bool:
        """Whether ``given`` is the API key (compared in constant time); False without a key."""
        return self.api_key is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    def bearer_matches(self, authorization: str | None) -> bool:
        """Whether an ``Authorization: Bearer KEY`` header carries the API key."""
        auth = authorization or ""
        return self.key_matches(auth[7:] if auth.lower().startswith("bearer ") else "")

    def chat_authorized(self, cookie: str | None, authorization: str | None) -> bool:
        """Whether a request may use the guarded chat: no key, the cookie /login sets, or the
        bearer key."""
        if self.api_key is None:
            return True
        if cookie and hmac.compare_digest(cookie.encode(), chat_token(self.api_key).encode()):
            return True
        return self.bearer_matches(authorization)

    def cookies_secure(self, scheme: str) -> bool:
        return self.secure_cookies or scheme == "https"

    def per_client_limit(self) -> int:
        if self.client_limit is not None:
            return self.client_limit
        model = self.model.model
        if model is None:
            return 1
        a = model.admission
        return max(1, (a["max_active"] + a["max_queued"]) // 2)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started


def default_db_path() -> Path:
    return store.home() / "history.sqlite3"


def open_history(target: str | Path, *, unfinished_are_interrupted: bool = True) -> HistoryStore:
    """The history at ``target``: a ``postgresql://`` URL, or an SQLite file (``":memory:"``
    keeps nothing). With ``unfinished_are_interrupted``, answers left unfinished by a previous
    run are marked interrupted at start: right for one server, wrong for replicas sharing a
    database (there, a replica that dies has its answers marked by the others)."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return PostgresHistory(target, unfinished_are_interrupted=unfinished_are_interrupted)
    return SqliteHistory(target, unfinished_are_interrupted=unfinished_are_interrupted)
