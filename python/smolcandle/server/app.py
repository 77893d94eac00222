"""The Quart application: ``create_app(...)`` for any ASGI server, ``serve(...)`` under Hypercorn."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from quart import Quart, Response, redirect, request
from quart_schema import OpenAPIProvider, QuartSchema

from .. import __version__, store
from .._model import Model
from . import access
from .anthropic import messages_api
from .anthropic import not_found as anthropic_not_found
from .auth import AUTH_COOKIE, Auth
from .chat_ui import on_command, on_lapsed, ui
from .config import ServerConfig
from .generations import Generations, ModelSlot
from .history import default_db_path, open_history
from .limits import MAX_BODY_BYTES
from .metrics import Metrics
from .ollama import not_found as ollama_not_found
from .ollama import ollama
from .openai import api
from .openai import not_found as openai_not_found
from .ops import ops
from .replicas import Replicas
from .sessions import Sessions
from .state import EXTENSION, ServerState

log = logging.getLogger("smolcandle.server")

# Scripts and styles from this server only (htmx's own indicator styles are turned off in the
# page, so no inline style is needed), event streams and API calls to it, and no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)


def create_app(config: ServerConfig | None = None) -> Quart:
    """The smolcandle web app: the browser chat at ``/``, the OpenAI API at ``/v1`` and
    Anthropic's Messages API at ``/v1/messages``,
    ``/healthz``, ``/metrics`` and ``/status``, configured by ``config`` (see
    :class:`ServerConfig`; the default serves the default stored model).

    Without a usable model the app still serves, and says why it cannot answer. Every response
    carries a Content-Security-Policy with no inline script and no framing, and ``nosniff``;
    requests naming a host that ``config.allowed_hosts`` does not list get 403, and a POST from
    a page of another origin (outside ``/v1``, which has CORS) too.
    """
    config = config or ServerConfig()
    app = Quart(__name__, static_folder=None)  # the chat's files are the ui blueprint's (web/static)
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    slot = ModelSlot()
    path_to_load: Path | None = None
    if isinstance(config.model, Model):
        slot.state, slot.model, slot.name = "ready", config.model, Path(config.model.path).name
    else:
        try:
            if config.model is None:
                path_to_load = next((p for p in (store.find(n) for n in store.DEFAULT_ORDER) if p is not None), None)
            else:
                path_to_load = store.resolve(config.model)
        except Exception as e:  # noqa: BLE001 - the server starts anyway and says why
            slot.state, slot.error = "failed", str(e)
        if path_to_load is not None:
            slot.state, slot.name, slot.path = "loading", path_to_load.name, path_to_load

    replicas = Replicas(config.redis) if config.redis else None
    history = open_history(config.database or default_db_path(), unfinished_are_interrupted=replicas is None)
    metrics = Metrics()
    state = ServerState(
        config=config,
        model=slot,
        history=history,
        generations=Generations(config, slot, metrics),
        auth=Auth(config),
        metrics=metrics,
        sessions=Sessions(replicas),
        replicas=replicas,
    )
    app.extensions[EXTENSION] = state
    auth = state.auth

    @app.before_request
    async def _route() -> None:
        record = access.current()
        if record is not None and request.url_rule is not None:
            record.route = request.url_rule.rule

    @app.before_request
    async def _check_host() -> Any:
        refused = auth.host_refused(request.host)
        if refused is not None:
            return Response(f"host {refused!r} is not served here", 403, mimetype="text/plain")
        return None

    @app.before_request
    async def _check_origin() -> Any:
        # A page of another origin may not change anything here, whatever the Host says (a
        # rebound name, a proxy): a browser names the page's origin on every POST. /v1 has CORS.
        origin = request.headers.get("Origin")
        if request.method != "POST" or request.path.startswith("/v1/") or not auth.foreign_origin(origin, request.host):
            return None
        return Response(f"requests from {origin} are not accepted here", 403, mimetype="text/plain")

    @app.before_request
    async def _guard() -> Any:
        path = request.path
        if not auth.guard_chat or path in ("/login", "/healthz") or path.startswith(("/v1/", "/api/", "/static/")):
            return None  # /v1 and /api check the key themselves
        if auth.chat_authorized(request.cookies.get(AUTH_COOKIE), request.headers.get("Authorization")):
            return None
        if request.method == "GET" and request.headers.get("HX-Request") != "true" and (path == "/" or path.startswith("/c/")):
            return redirect("/login")  # a page: ask for the key
        return Response("the API key is required", 401, mimetype="text/plain")

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
                slot.model = await asyncio.to_thread(config.engine.load, path_to_load)
                slot.state = "ready"
                log.info("model ready: %s", slot.label)
            except Exception as e:  # noqa: BLE001
                slot.state, slot.error = "failed", f"{path_to_load.name}: {e}"
                log.error("could not load the model: %s", slot.error)

        app.extensions["smolcandle.loading"] = asyncio.get_running_loop().create_task(load())

    @app.after_serving
    async def _close() -> None:
        await state.generations.drain(grace=0.0)
        if path_to_load is not None and slot.model is not None:
            # A model this server loaded is its to stop: the engine's last finished prefixes
            # reach the disk tier before the process ends.
            await asyncio.to_thread(slot.model.close)
        if replicas is not None:
            await replicas.close()
        await state.history.close()

    @app.errorhandler(404)
    @app.errorhandler(405)
    async def not_found(e: Any) -> Any:
        path = request.path
        if path == "/v1/messages" or path.startswith("/v1/messages/"):
            answer = anthropic_not_found
        elif path.startswith("/v1/") or path == "/v1":
            answer = openai_not_found
        elif path.startswith("/api/") or path == "/api":
            answer = ollama_not_found
        else:
            return e
        response = answer(e.code, e.name, request.method, path).response()
        if getattr(e, "valid_methods", None):
            response.headers["Allow"] = ", ".join(sorted(e.valid_methods))
        return response

    QuartSchema(
        app,
        info={"title": "smolcandle", "version": __version__, "description": "OpenAI- and Anthropic-compatible API of a local SmolLM3 server"},
        openapi_provider_class=_ApiOnly,
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
    )
    app.register_blueprint(ops)
    app.register_blueprint(api)
    app.register_blueprint(messages_api)
    app.register_blueprint(ollama)
    app.register_blueprint(ui)
    app.asgi_app = access.AccessLog(app.asgi_app, metrics.registry, enabled=config.access_log, json_lines=config.log_format == "json")  # type: ignore[method-assign]
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
    """Runs ``app`` under Hypercorn until SIGINT or SIGTERM. The first signal drains (see
    the generation service's ``drain``, with the configuration's ``grace`` seconds) and then stops; a second exits at once.
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
    state: ServerState = app.extensions[EXTENSION]
    grace = state.config.grace

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
            await state.generations.drain(grace=grace)
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
