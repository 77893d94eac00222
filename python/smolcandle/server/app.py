"""The Quart application: ``create_app(...)`` for any ASGI server, ``serve(...)`` under Hypercorn."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel
from quart import Quart, Response, jsonify, request
from quart_schema import OpenAPIProvider, QuartSchema, document

from .. import __version__, store
from .._model import Model
from ..chat import ChatStream
from .history import History
from .hub import Channel, LatencyStats
from .render import pygments_css

log = logging.getLogger("smolcandle.server")

SESSION_COOKIE = "smolcandle_session"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


class HealthModel(BaseModel):
    state: Literal["none", "loading", "ready", "failed"]
    name: str | None
    error: str | None


class Health(BaseModel):
    """Whether the server can answer: ``ok`` with a model loaded, else ``degraded`` and why."""

    status: Literal["ok", "degraded"]
    model: HealthModel
    uptime_seconds: float
    version: str


@dataclass
class ChatSettings:
    """Sampling for the browser chat's answers."""

    max_tokens: int = 1024
    temperature: float = 0.7
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    system_prompt: str | None = None

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
    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()


@dataclass(eq=False)
class Session:
    id: str
    channel: Channel = field(default_factory=Channel)
    enable_thinking: bool = True
    turn: Turn | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_seen: float = field(default_factory=time.monotonic)
    context_tokens: int | None = None
    counter: int = 0

    def next_dom_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @property
    def generating(self) -> bool:
        return self.turn is not None and self.turn.finish is None


class Sessions:
    """Sessions by their cookie. The id is 256 random bits; a cookie that is not one of ours
    gets a fresh session rather than an error."""

    IDLE_SECONDS = 24 * 3600

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def get(self, cookie: str | None) -> tuple[Session, bool]:
        """The session for a cookie value, and whether it is new (the cookie must be set)."""
        now = time.monotonic()
        if cookie and _SESSION_ID.fullmatch(cookie):
            s = self._by_id.get(cookie)
            if s is None:  # a cookie from before a restart: its history is still there
                s = self._by_id[cookie] = Session(cookie)
            s.last_seen = now
            return s, False
        self._prune(now)
        s = Session(secrets.token_urlsafe(32))
        self._by_id[s.id] = s
        return s, True

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
    history: History
    settings: ChatSettings
    sessions: Sessions = field(default_factory=Sessions)
    latency: LatencyStats = field(default_factory=LatencyStats)
    started: float = field(default_factory=time.monotonic)
    generations_started: int = 0
    generations_cancelled: int = 0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    api_active: int = 0
    api_cancelled: int = 0
    # Templates are rendered synchronously, outside any request too (answers are rendered on
    # worker threads and applied from loop callbacks): a plain Jinja environment, not Quart's.
    templates: Environment = field(
        default_factory=lambda: Environment(loader=PackageLoader("smolcandle.server", "templates"), autoescape=select_autoescape(["html"]))
    )

    @property
    def fragments(self) -> Any:
        """The macros of templates/bubbles.html."""
        return self.templates.get_template("bubbles.html").module

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started


def default_db_path() -> Path:
    return store.home() / "history.sqlite3"


def _asset(name: str) -> bytes:
    """htmx and its SSE extension, as the ``hedron-core`` package ships them."""
    base = resources.files("hedron_core") / "static"
    path = {"htmx.min.js": base / "htmx.min.js", "sse.js": base / "ext" / "sse.js"}[name]
    return path.read_bytes()


def create_app(
    model: Model | str | os.PathLike[str] | None = None,
    *,
    db_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    n_threads: int | None = None,
    n_ctx: int | None = None,
    settings: ChatSettings | None = None,
    api_key: str | None = None,
    cors_origins: str | list[str] | tuple[str, ...] = (),
) -> Quart:
    """The smolcandle web app: the browser chat at ``/`` and ``/healthz``.

    ``model`` is a loaded :class:`~smolcandle.Model`, a GGUF path or stored model name (loaded in
    the background once the server starts), or ``None`` for the default stored model if there is
    one. Without a usable model the app still serves, and says why it cannot answer.
    ``db_path`` is the SQLite history (default ``$SMOLCANDLE_HOME/history.sqlite3``;
    ``":memory:"`` keeps nothing). ``api_key`` makes ``/v1`` require ``Authorization: Bearer
    KEY`` (the browser chat keeps working through its session cookie); ``cors_origins`` lists
    the origins (or ``"*"``) whose pages may call ``/v1``.
    """
    app = Quart(__name__)
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    slot = ModelSlot()
    path_to_load: Path | None = None
    if isinstance(model, Model):
        slot.state, slot.model, slot.name = "ready", model, Path(model.path).name
    else:
        try:
            if model is None:
                found = next((p for p in (store.find(n) for n in store.DEFAULT_ORDER) if p is not None), None)
                path_to_load = found
            else:
                path_to_load = store.resolve(model)
        except Exception as e:  # noqa: BLE001 - the server starts anyway and says why
            slot.state, slot.error = "failed", str(e)
        if path_to_load is not None:
            slot.state, slot.name, slot.path = "loading", path_to_load.name, path_to_load

    state = ServerState(slot, History(db_path if db_path is not None else default_db_path()), settings or ChatSettings())
    state.api_key = api_key or None
    origins = cors_origins.split(",") if isinstance(cors_origins, str) else cors_origins
    state.cors_origins = tuple(o.strip() for o in origins if o.strip())
    app.extensions["smolcandle"] = state

    @app.before_serving
    async def _load_model() -> None:
        if path_to_load is None:
            return

        async def load() -> None:
            try:
                slot.model = await asyncio.to_thread(Model.load, path_to_load, device=device, n_threads=n_threads, n_ctx=n_ctx)
                slot.state = "ready"
                log.info("model ready: %s", slot.label)
            except Exception as e:  # noqa: BLE001
                slot.state, slot.error = "failed", f"{path_to_load.name}: {e}"
                log.error("could not load the model: %s", slot.error)

        app.extensions["smolcandle.loading"] = asyncio.get_running_loop().create_task(load())

    @app.after_serving
    async def _close() -> None:
        for s in state.sessions.all():
            if s.turn is not None:
                s.turn.cancel()
        state.history.close()

    @app.get("/healthz")
    @document(responses={200: (Health, None)})
    async def healthz() -> Response:
        body = {
            "status": "ok" if slot.state == "ready" else "degraded",
            "model": {"state": slot.state, "name": slot.name or None, "error": None if slot.state in ("ready", "loading") else slot.error},
            "uptime_seconds": round(state.uptime, 3),
            "version": __version__,
        }
        return jsonify(body)

    @app.get("/status")
    async def status() -> Response:
        """Counters for operators and tests: sessions, generations, per-event latency."""
        return jsonify(
            {
                "model": slot.label,
                "sessions": len(state.sessions),
                "active_sessions": state.sessions.active(),
                "generating": state.sessions.generating(),
                "generations_started": state.generations_started,
                "generations_cancelled": state.generations_cancelled,
                "api_generating": state.api_active,
                "api_cancelled": state.api_cancelled,
                "prefix_cache": state.model.model.prefix_cache_stats if state.model.model is not None else None,
                "event_latency": state.latency.summary(),
                "dropped_subscribers": sum(s.channel.dropped_subscribers for s in state.sessions.all()),
                "uptime_seconds": round(state.uptime, 3),
            }
        )

    @app.get("/static/vendor/<name>")
    async def vendor(name: str) -> Response:
        if name not in ("htmx.min.js", "sse.js"):
            return Response("not found", 404)
        return Response(_asset(name), mimetype="text/javascript", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/static/pygments.css")
    async def code_css() -> Response:
        return Response(pygments_css(), mimetype="text/css", headers={"Cache-Control": "public, max-age=86400"})

    @app.errorhandler(404)
    @app.errorhandler(405)
    async def not_found(e: Any) -> Any:
        if request.path.startswith("/v1/") or request.path == "/v1":
            from .api import ApiError

            response = ApiError(e.code, f"{request.method} {request.path}: {e.name.lower()}", code=e.name.lower().replace(" ", "_")).response()
            if getattr(e, "valid_methods", None):
                response.headers["Allow"] = ", ".join(e.valid_methods)
            return response
        return e

    from .api import api
    from .ui import ui

    QuartSchema(
        app,
        info={"title": "smolcandle", "version": __version__, "description": "OpenAI-compatible API of a local SmolLM3 server"},
        openapi_provider_class=_ApiOnly,
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
    )
    app.register_blueprint(api)
    app.register_blueprint(ui)
    return app


class _ApiOnly(OpenAPIProvider):
    """The OpenAPI document covers the API (``/v1``, ``/healthz``), not the chat page's routes."""

    def generate_rules(self) -> Any:
        for rule in super().generate_rules():
            if rule.rule.startswith("/v1/") or rule.rule == "/healthz":
                yield rule

    def schema(self) -> dict[str, Any]:
        doc = super().schema()
        for operations in doc.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "requestBody" in operation:
                    operation["requestBody"]["required"] = True  # every /v1 POST needs its JSON body
        return doc

    def build_response_object(self, model: Any, headers_model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        response, definitions = super().build_response_object(model, headers_model)
        if getattr(model, "stream_content", False):
            # one event: its data is a JSON chunk, or "[DONE]" at the end
            event = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}
            response["content"]["text/event-stream"] = {"schema": event}
        return response, definitions


def serve(app: Quart, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Runs ``app`` under Hypercorn until interrupted."""
    import signal

    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # Hypercorn's messages through logging: warnings and errors show (we print our own
    # "serving on" line), without a second handler of its own.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    # Many tabs (re)connecting at once must not overflow the listen queue (a dropped SYN costs
    # the client a second or more).
    config.backlog = 2048
    shutdown = asyncio.Event()

    def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Connections still open at shutdown (event streams never end by themselves) are
        # cancelled; asyncio would print each as an error.
        if isinstance(context.get("exception"), asyncio.CancelledError):
            return
        loop.default_exception_handler(context)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet_cancellations)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shutdown.set)
        await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]

    asyncio.run(main())
