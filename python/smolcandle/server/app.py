"""The Quart application: ``create_app(...)`` for any ASGI server, ``serve(...)`` under Hypercorn."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quart import Quart, Response, redirect, request
from quart_schema import OpenAPIProvider, QuartSchema

from .. import __version__, store
from .._model import Model
from .api import ApiError, api
from .ops import ops
from .replicas import Replicas
from .state import (
    AUTH_COOKIE,
    ChatSettings,
    ModelSlot,
    ServerState,
    Sessions,
    chat_token,
    default_db_path,
    open_history,
)
from .ui import on_command, on_lapsed, ui

log = logging.getLogger("smolcandle.server")

# Scripts and styles from this server only (htmx's own indicator styles are turned off in the
# page, so no inline style is needed), event streams and API calls to it, and no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def create_app(
    model: Model | str | os.PathLike[str] | None = None,
    *,
    db_path: str | os.PathLike[str] | None = None,
    redis_url: str | None = None,
    device: str = "cpu",
    n_threads: int | None = None,
    n_ctx: int | None = None,
    kv_cache_dtype: str | None = None,
    settings: ChatSettings | None = None,
    api_key: str | None = None,
    guard_chat: bool = False,
    secure_cookies: bool = False,
    max_active: int | None = None,
    max_queued: int | None = None,
    chat_template: str | None = None,
    kv_budget_mib: int | None = None,
    prefix_cache_mib: int | None = None,
    speculative: bool | None = None,
    per_client: int | None = None,
    cors_origins: str | list[str] | tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] | None = None,
) -> Quart:
    """The smolcandle web app: the browser chat at ``/``, the OpenAI API at ``/v1``, ``/healthz``
    and ``/status``.

    ``model`` is a loaded :class:`~smolcandle.Model`, a GGUF path or stored model name (loaded in
    the background once the server starts), or ``None`` for the default stored model if there is
    one. Without a usable model the app still serves, and says why it cannot answer.
    ``db_path`` is the history: an SQLite file (default ``$SMOLCANDLE_HOME/history.sqlite3``;
    ``":memory:"`` keeps nothing) or a ``postgresql://`` URL. ``redis_url`` makes this server one
    of several replicas sharing that Redis (sessions, event streams, answers in progress; see
    :mod:`.replicas`); give them the same PostgreSQL history too. ``api_key`` makes ``/v1`` require ``Authorization: Bearer
    KEY`` (the browser chat keeps working through its session cookie), and with ``guard_chat``
    the browser chat and ``/status`` too (the page asks for the key once, at ``/login``).
    Cookies are Secure under TLS, and with ``secure_cookies`` (behind a proxy that terminates
    it). ``kv_cache_dtype``, ``max_active``, ``max_queued``, ``kv_budget_mib``, ``prefix_cache_mib`` and
    ``speculative`` are the engine's (:meth:`Model.load`), as is ``chat_template`` (Jinja source replacing the file's);
    ``per_client`` bounds the ``/v1`` generations at once of one
    API key or address (default: half of what the engine holds, running and queued), past
    which it answers 429. ``cors_origins`` lists
    the origins (or ``"*"``) whose pages may call ``/v1``. ``allowed_hosts`` lists the host
    names requests may name in ``Host`` (any port); others get 403, so that a page of another
    site cannot reach a server on loopback by rebinding its own name to 127.0.0.1 (``smolcandle
    serve`` on a loopback address allows only loopback names). Every response carries a
    Content-Security-Policy with no inline script and no framing, and ``nosniff``.
    """
    app = Quart(__name__, static_folder=None)  # the chat's files are the ui blueprint's (web/static)
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

    replicas = Replicas(redis_url) if redis_url else None
    history = open_history(str(db_path) if db_path is not None else default_db_path(), unfinished_are_interrupted=replicas is None)
    state = ServerState(slot, history, settings or ChatSettings(), sessions=Sessions(replicas), replicas=replicas)
    state.api_key = api_key or None
    state.guard_chat = bool(guard_chat and state.api_key)
    state.secure_cookies = secure_cookies
    state.client_limit = per_client
    origins = cors_origins.split(",") if isinstance(cors_origins, str) else cors_origins
    state.cors_origins = tuple(o.strip() for o in origins if o.strip())
    app.extensions["smolcandle"] = state

    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @app.before_request
    async def _check_host() -> Any:
        if hosts is None:
            return None
        name = (request.host or "").lower()
        name = name[: name.rindex("]") + 1] if name.startswith("[") else name.rsplit(":", 1)[0]
        if name not in hosts:
            return Response(f"host {name!r} is not served here", 403, mimetype="text/plain")
        return None

    @app.before_request
    async def _check_origin() -> Any:
        # A page of another origin may not change anything here, whatever the Host says (a
        # rebound name, a proxy): a browser names the page's origin on every POST. /v1 has CORS.
        origin = request.headers.get("Origin")
        if request.method != "POST" or origin is None or request.path.startswith("/v1/"):
            return None
        if origin == "null" or urlsplit(origin).netloc.lower() != (request.host or "").lower():
            return Response(f"requests from {origin} are not accepted here", 403, mimetype="text/plain")
        return None

    @app.before_request
    async def _guard() -> Any:
        path = request.path
        if not state.guard_chat or path in ("/login", "/healthz") or path.startswith(("/v1/", "/static/")):
            return None  # /v1 checks the key itself
        if state.chat_authorized(request.cookies.get(AUTH_COOKIE), request.headers.get("Authorization")):
            return None
        if request.method == "GET" and request.headers.get("HX-Request") != "true" and (path == "/" or path.startswith("/c/")):
            return redirect("/login")  # a page: ask for the key
        return Response("the API key is required", 401, mimetype="text/plain")

    @app.route("/login", methods=["GET", "POST"])
    async def login() -> Any:
        if request.method == "GET":
            return state.render("login.html", failed=False)
        form = await request.form
        if state.api_key is None or not state.key_matches(form.get("key") or ""):
            return Response(state.render("login.html", failed=True), 401)
        response = redirect("/", 303)
        response.set_cookie(AUTH_COOKIE, chat_token(state.api_key), max_age=30 * 24 * 3600, httponly=True, samesite="Lax", secure=state.cookies_secure(request.scheme), path="/")
        return response

    @app.after_request
    async def _security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    connected: list[bool] = []

    @app.before_serving
    async def connect() -> None:
        """Opens the history and joins the replicas (once; serve() calls it before Hypercorn
        starts, so that a database out of reach is one clear error)."""
        if connected:
            return
        await state.history.start()
        if replicas is not None:
            replicas.on_lapsed = lambda session, record: on_lapsed(state, session, record)
            replicas.on_command = lambda session, command: on_command(state, session, command)
            await replicas.start()
        connected.append(True)

    app.extensions["smolcandle.connect"] = connect

    @app.before_serving
    async def _load_model() -> None:
        if path_to_load is None:
            return

        async def load() -> None:
            try:
                slot.model = await asyncio.to_thread(
                    Model.load,
                    path_to_load,
                    device=device,
                    n_threads=n_threads,
                    n_ctx=n_ctx,
                    kv_cache_dtype=kv_cache_dtype,
                    max_active=max_active,
                    max_queued=max_queued,
                    kv_budget_mib=kv_budget_mib,
                    prefix_cache_mib=prefix_cache_mib,
                    speculative=speculative,
                    chat_template=chat_template,
                )
                slot.state = "ready"
                log.info("model ready: %s", slot.label)
            except Exception as e:  # noqa: BLE001
                slot.state, slot.error = "failed", f"{path_to_load.name}: {e}"
                log.error("could not load the model: %s", slot.error)

        app.extensions["smolcandle.loading"] = asyncio.get_running_loop().create_task(load())

    @app.after_serving
    async def _close() -> None:
        await stop_generations(state, grace=0.0)
        if replicas is not None:
            await replicas.close()
        await state.history.close()

    @app.errorhandler(404)
    @app.errorhandler(405)
    async def not_found(e: Any) -> Any:
        if request.path.startswith("/v1/") or request.path == "/v1":
            response = ApiError(e.code, f"{request.method} {request.path}: {e.name.lower()}", code=e.name.lower().replace(" ", "_")).response()
            if getattr(e, "valid_methods", None):
                response.headers["Allow"] = ", ".join(e.valid_methods)
            return response
        return e

    QuartSchema(
        app,
        info={"title": "smolcandle", "version": __version__, "description": "OpenAI-compatible API of a local SmolLM3 server"},
        openapi_provider_class=_ApiOnly,
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
    )
    app.register_blueprint(ops)
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


async def stop_generations(state: ServerState, *, grace: float) -> None:
    """Drains: new work is refused from now on; answers under way get ``grace`` seconds to
    end, then are cancelled (the browser's answers are saved with what they had, ``/v1``
    streams end with a final chunk); returns once they have ended (a few seconds at most)."""
    state.draining = True
    loop = asyncio.get_running_loop()

    def running() -> list[asyncio.Task[Any]]:
        return [s.turn.task for s in state.sessions.all() if s.turn is not None and s.turn.task is not None and not s.turn.task.done()]

    deadline = loop.time() + grace
    while (running() or state.api_relays) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    for s in state.sessions.all():
        if s.turn is not None and s.turn.finish is None:
            s.turn.cancel(interrupted=True)
    for relay in list(state.api_relays):
        relay.cancel()
    deadline = loop.time() + 5.0
    while (running() or state.api_relays) and loop.time() < deadline:
        await asyncio.sleep(0.05)


def serve(app: Quart, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0) -> None:
    """Runs ``app`` under Hypercorn until SIGINT or SIGTERM. The first signal drains (see
    :func:`stop_generations`, with ``grace`` seconds) and then stops; a second exits at once.
    Raises RuntimeError if the app cannot start (its Redis or PostgreSQL out of reach)."""
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
    state: ServerState = app.extensions["smolcandle"]

    def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Connections still open at shutdown (event streams never end by themselves) are
        # cancelled; asyncio would print each as an error.
        if isinstance(context.get("exception"), asyncio.CancelledError):
            return
        loop.default_exception_handler(context)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet_cancellations)
        draining: list[asyncio.Task[None]] = []

        async def drain() -> None:
            log.info("stopping: new requests are refused; answers under way get %g s to finish", grace)
            await stop_generations(state, grace=grace)
            shutdown.set()

        def on_signal() -> None:
            if draining:
                log.warning("second signal: exiting now")
                os._exit(1)
            draining.append(loop.create_task(drain()))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await app.extensions["smolcandle.connect"]()
        await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]

    asyncio.run(main())
