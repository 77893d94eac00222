"""The browser chat's routes: the page, a conversation, search, changes (rename, delete,
settings, stop), a message sent, the login page that asks for the API key, and the event
stream every tab follows."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from markupsafe import Markup, escape
from quart import Blueprint, Response, g, redirect, request

from ..assets import STATIC
from ..auth import AUTH_COOKIE, AUTH_COOKIE_SECONDS
from ..history import SearchError
from ..hub import MAX_ID, Reload, parse_id
from ..sessions import SESSION_COOKIE, SESSION_COOKIE_SECONDS, Turn
from ..state import current
from ..streaming import sse_response
from . import answers, commands, pages, view

ui = Blueprint("ui", __name__, static_folder=STATIC, static_url_path="/static")

KEEPALIVE_SECONDS = 15.0


@ui.before_request
async def _session() -> Response | None:
    if request.path == "/login":
        return None
    state = current()
    g.session, g.new_session = await state.sessions.load(request.cookies.get(SESSION_COOKIE))
    # State-changing requests must come from our own page: htmx adds this header, a cross-site
    # form cannot (a custom header needs a CORS preflight that we never grant).
    if request.method == "POST" and request.headers.get("HX-Request") != "true":
        return Response("requests that change state must come from the chat page", 400)
    return None


@ui.after_request
async def _set_cookie(response: Response) -> Response:
    if getattr(g, "new_session", False):
        secure = current().auth.cookies_secure(request.scheme)
        response.set_cookie(SESSION_COOKIE, g.session.id, max_age=SESSION_COOKIE_SECONDS, httponly=True, samesite="Lax", secure=secure, path="/")
    return response


@ui.route("/login", methods=["GET", "POST"])
async def login() -> Any:
    """Asks for the API key once, when it guards the chat; the cookie proves it was given."""
    auth = current().auth
    if request.method == "GET":
        return pages.render("login.html", failed=False)
    form = await request.form
    if auth.api_key is None or not auth.key_matches(form.get("key") or ""):
        return Response(pages.render("login.html", failed=True), 401)
    response = redirect("/", 303)
    response.set_cookie(AUTH_COOKIE, auth.chat_token(), max_age=AUTH_COOKIE_SECONDS, httponly=True, samesite="Lax", secure=auth.cookies_secure(request.scheme), path="/")
    return response


# -- what a page shows --------------------------------------------------------------------


def _wants_fragment() -> bool:
    """An htmx request that swaps part of the page (a history restore needs the whole page)."""
    return request.headers.get("HX-Request") == "true" and request.headers.get("HX-History-Restore-Request") != "true"


@ui.get("/")
async def index() -> Any:
    state = current()
    shown = await view.of(state, g.session, None)
    if _wants_fragment():
        return pages.render("main.html", **shown)
    return pages.render("page.html", **shown, conversations=await view.conversations(state, g.session), current=None)


@ui.get(f"/c/<int(max={MAX_ID}):conversation_id>")
async def open_conversation(conversation_id: int) -> Any:
    state = current()
    shown = await view.of(state, g.session, conversation_id)
    if shown is None:
        return Response("no such conversation", 404)
    listed = await view.conversations(state, g.session)
    if _wants_fragment():
        return pages.render("main.html", **shown) + str(pages.bubbles().conversation_list(listed, conversation_id, oob=True))
    return pages.render("page.html", **shown, conversations=listed, current=conversation_id)


@ui.get("/search")
async def search() -> Any:
    query = request.args.get("q", "").strip()
    try:
        hits = await current().history.search(g.session.id, query) if query else []
    except SearchError as e:
        return Response(pages.render("search.html", hits=[], query=query, error=str(e)), 400)
    shown = [
        {**dataclasses.asdict(h), "snippet": Markup(str(escape(h.snippet)).replace("\x02", "<mark>").replace("\x03", "</mark>"))}
        for h in hits
    ]
    return pages.render("search.html", hits=shown, query=query)


# -- changing things ----------------------------------------------------------------------


async def _broadcast_conversations() -> None:
    listed = await view.conversations(current(), g.session)
    g.session.channel.publish(str(pages.bubbles().conversation_list(listed, None, oob=True)))


@ui.post(f"/c/<int(max={MAX_ID}):conversation_id>/rename")
async def rename(conversation_id: int) -> Any:
    form = await request.form
    if not await current().history.rename(g.session.id, conversation_id, form.get("title", "")):
        return Response("no such conversation", 404)
    await _broadcast_conversations()
    return Response("", 204)


@ui.post(f"/c/<int(max={MAX_ID}):conversation_id>/delete")
async def delete(conversation_id: int) -> Any:
    state, s = current(), g.session
    await answers.stop(state, s, conversation_id)
    if not await state.history.delete(s.id, conversation_id):
        return Response("no such conversation", 404)
    await _broadcast_conversations()
    if request.headers.get("HX-Current-URL", "").rstrip("/").endswith(f"/c/{conversation_id}"):
        return Response("", 200, headers={"HX-Location": json.dumps({"path": "/", "target": "#main"})})
    return Response("", 204)


@ui.post("/settings")
async def settings() -> Any:
    form = await request.form
    await commands.set_thinking(current(), g.session, form.get("enable_thinking") == "1")
    return Response("", 204)


@ui.post("/settings/reasoning")
async def reasoning_setting() -> Any:
    """The session's reasoning budget: a count of tokens, or empty for none."""
    s, raw = g.session, ((await request.form).get("max_reasoning_tokens") or "").strip()
    if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        return Response("the reasoning budget is a whole number of tokens", 400)
    s.max_reasoning_tokens = int(raw) if raw else None
    await current().sessions.save(s)
    s.channel.publish(str(pages.bubbles().reasoning_budget(s.max_reasoning_tokens, oob=True)))
    return Response("", 204)


@ui.post("/stop")
async def stop() -> Any:
    await answers.stop(current(), g.session)
    return Response("", 204)


@ui.post("/send")
async def send() -> Any:
    state, s = current(), g.session
    form = await request.form
    text = (form.get("text") or "").strip()
    conv_key = form.get("conversation", "new")
    if not text:
        return Response("", 204)
    if s.generating:
        return answers.busy(s)
    if conv_key != "new" and parse_id(conv_key) is None:
        return Response("bad conversation", 400)
    if text.startswith("/"):
        return await commands.run(state, s, conv_key, text)
    reason = "The server is shutting down; try again in a moment." if state.draining else state.model.unavailable_reason
    if reason is not None:
        return await answers.start_turn(state, s, conv_key, text, kind="system", answer=reason)

    async with s.lock:
        claim = await answers.claim(state, s)
        if claim is None:  # another tab's message got here first
            return answers.busy(s)
        created = None
        try:
            if conv_key == "new":
                created = await state.history.create_conversation(s.id, text)
                conversation_id = created.id
            else:
                conversation_id = parse_id(conv_key)
                if await state.history.conversation(s.id, conversation_id) is None:
                    await answers.release(state, s, claim)
                    return Response("no such conversation", 404)
            history = [m.to_chat() for m in await state.history.messages(s.id, conversation_id) if m.content or m.role == "user"]
            user_id, answer_id = await state.history.add_exchange(conversation_id, text)
            turn = Turn(str(conversation_id), f"m{user_id}", f"m{answer_id}", text, conversation_id=conversation_id, message_id=answer_id, claim=claim)
            await answers.describe(state, s, turn)
        except BaseException:
            await answers.release(state, s, claim)
            raise
        messages = [*history, {"role": "user", "content": text}]
        s.turn = turn
        s.channel.publish(str(pages.bubbles().turn_oob(turn)), scope=turn.conv_key)
        answers.run(state, s, turn, answers.run_model(state, s, turn, messages))
    if created is not None:
        await _broadcast_conversations()
        shown = await view.of(state, s, conversation_id)
        html = pages.render("main.html", **shown)
        listing = pages.bubbles().conversation_list(await view.conversations(state, s), conversation_id, oob=True)
        headers = {"HX-Retarget": "#main", "HX-Reswap": "innerHTML", "HX-Push-Url": f"/c/{conversation_id}"}
        return Response(html + str(listing), 200, headers=headers)
    return str(pages.bubbles().turn(turn))


# -- the event stream ---------------------------------------------------------------------


@ui.get("/events")
async def events() -> Any:
    state, s = current(), g.session
    after = request.headers.get("Last-Event-ID") or request.args.get("after")
    sub = await s.channel.subscribe(after, view=request.args.get("view"))
    latency, histogram = state.latency, state.metrics.event_latency

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            while True:
                item = await sub.next(KEEPALIVE_SECONDS)
                if item is None:
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(item, Reload):
                    note = f'{escape(item.reason)}: <a href="">reload the page</a> to catch up.'
                    yield f'data: <div id="notice" class="notice" hx-swap-oob="true">{note}</div>\n\n'.encode()
                    while True:  # stay connected, so the browser does not reconnect in a loop
                        await asyncio.sleep(KEEPALIVE_SECONDS)
                        yield b": keep-alive\n\n"
                yield item.encode()
                delay = max(0.0, time.time() - item.created)
                latency.observe(delay)
                histogram.observe(delay)
        finally:
            sub.close()

    return sse_response(stream())
