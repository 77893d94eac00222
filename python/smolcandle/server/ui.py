"""The browser chat: an HTMX page whose answers arrive as out-of-band fragments over SSE.

A message is posted by HTMX; the response is at once the user's bubble and an empty answer
bubble with its own id. The answer is produced in the background and every change to it is
published on the session's channel as a fragment aimed at that bubble (``hx-swap-oob``); the
SSE extension swaps them in. Every fragment carries the whole current state of what it targets
(the answer's markdown rendered so far, not a delta), so replays and reconnections can never
double text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape
from quart import Blueprint, Response, current_app, g, request

from ..chat import ChatDone, ChatResult, ContextWarning
from ..errors import SmolcandleError
from .assets import STATIC
from .history import Message, SearchError
from .hub import MAX_ID, Reload, parse_id
from .render import markdown, plain
from .state import NO_THINKING_SWITCH, SESSION_COOKIE, ServerState, Session, Turn
from .streaming import Relay, sse_response

log = logging.getLogger("smolcandle.server")
ui = Blueprint("ui", __name__, static_folder=STATIC, static_url_path="/static")

# Re-rendering an answer for every token is wasteful when tokens come fast: publish at most this
# often (the final state is always published).
MIN_UPDATE_INTERVAL = 0.03
KEEPALIVE_SECONDS = 15.0
# /quote writes about as fast as a model answers on a CPU.
QUOTE_WORD_SECONDS = 0.05
# An answer being written is saved this often, so that a crash loses at most this much of it.
SAVE_SECONDS = 3.0
# How often a queued answer's place is looked at.
QUEUE_POLL_SECONDS = 0.5

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


def _state() -> ServerState:
    return current_app.extensions["smolcandle"]


def _bubbles() -> Any:
    return _state().fragments


@ui.before_request
async def _session() -> Response | None:
    state = _state()
    g.session, g.new_session = await state.sessions.load(request.cookies.get(SESSION_COOKIE))
    # State-changing requests must come from our own page: htmx adds this header, a cross-site
    # form cannot (a custom header needs a CORS preflight that we never grant).
    if request.method == "POST" and request.headers.get("HX-Request") != "true":
        return Response("requests that change state must come from the chat page", 400)
    return None


@ui.after_request
async def _set_cookie(response: Response) -> Response:
    if getattr(g, "new_session", False):
        secure = _state().cookies_secure(request.scheme)
        response.set_cookie(SESSION_COOKIE, g.session.id, max_age=365 * 24 * 3600, httponly=True, samesite="Lax", secure=secure, path="/")
    return response


# -- what a page shows --------------------------------------------------------------------


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


def _stats(tokens: int | None, tps: float | None, finish: str | None, first_token: float | None = None) -> str:
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


def _items(messages: list[Message], turn: Turn | None) -> list[Item]:
    items = []
    for m in messages:
        if m.role == "user":
            items.append(Item("user", f"m{m.id}", text=m.content))
        elif turn is not None and turn.message_id == m.id:
            items.append(Item("assistant", turn.dom_id, reasoning=turn.reasoning, body=turn.body, stats=turn.stats, finish=turn.finish))
        elif m.finish_reason is None:  # being written by another replica: its events fill it in
            items.append(Item("assistant", f"m{m.id}", reasoning=m.reasoning, body=markdown(m.content), stats="writing…"))
        else:
            stats = _stats(m.completion_tokens, m.tokens_per_second, m.finish_reason)
            items.append(Item("assistant", f"m{m.id}", reasoning=m.reasoning, body=markdown(m.content), stats=stats, finish=m.finish_reason or "stop"))
    return items


async def _view(conversation_id: int | None) -> dict[str, Any] | None:
    """Everything main.html needs for one conversation (``None``: a new chat), taken under the
    session lock so that it and ``after`` agree about which events the page already reflects.
    ``after`` is taken first: an answer's last state is saved before it is published, so a page
    that missed its last event (taken before ``after``) shows that state from the history."""
    state, s = _state(), g.session
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
        items = _items(messages, turn)
        if turn is not None and turn.message_id is None and turn.finish is None:  # a command's output under way
            items.append(Item("user", turn.user_id, text=turn.user_text))
            items.append(Item("assistant", turn.dom_id, reasoning=turn.reasoning, body=turn.body, stats=turn.stats, kind=turn.kind))
        slot = state.model
        return {
            "title": title,
            "conv_key": conv_key,
            "items": items,
            "thinking": s.enable_thinking,
            "thinking_switch": slot.thinking_switch,
            "reasoning_budget": _reasoning_budget(state, s),
            "model": {"state": slot.state, "label": slot.label},
            "notice": "" if slot.state in ("ready", "loading") else slot.label,
            "after": after,
        }


async def _conversations() -> list[Any]:
    return await _state().history.conversations(g.session.id)


def _wants_fragment() -> bool:
    """An htmx request that swaps part of the page (a history restore needs the whole page)."""
    return request.headers.get("HX-Request") == "true" and request.headers.get("HX-History-Restore-Request") != "true"


@ui.get("/")
async def index() -> Any:
    view = await _view(None)
    if _wants_fragment():
        return _state().render("main.html", **view)
    return _state().render("page.html", **view, conversations=await _conversations(), current=None)


@ui.get(f"/c/<int(max={MAX_ID}):conversation_id>")
async def open_conversation(conversation_id: int) -> Any:
    view = await _view(conversation_id)
    if view is None:
        return Response("no such conversation", 404)
    if _wants_fragment():
        html = _state().render("main.html", **view)
        listing = _bubbles().conversation_list(await _conversations(), conversation_id, oob=True)
        return html + str(listing)
    return _state().render("page.html", **view, conversations=await _conversations(), current=conversation_id)


@ui.get("/search")
async def search() -> Any:
    query = request.args.get("q", "").strip()
    try:
        hits = await _state().history.search(g.session.id, query) if query else []
    except SearchError as e:
        return Response(_state().render("search.html", hits=[], query=query, error=str(e)), 400)
    shown = [
        {**dataclasses.asdict(h), "snippet": Markup(str(escape(h.snippet)).replace("\x02", "<mark>").replace("\x03", "</mark>"))}
        for h in hits
    ]
    return _state().render("search.html", hits=shown, query=query)


# -- changing things ----------------------------------------------------------------------


async def _broadcast_conversations() -> None:
    g.session.channel.publish(str(_bubbles().conversation_list(await _conversations(), None, oob=True)))


@ui.post(f"/c/<int(max={MAX_ID}):conversation_id>/rename")
async def rename(conversation_id: int) -> Any:
    form = await request.form
    if not await _state().history.rename(g.session.id, conversation_id, form.get("title", "")):
        return Response("no such conversation", 404)
    await _broadcast_conversations()
    return Response("", 204)


@ui.post(f"/c/<int(max={MAX_ID}):conversation_id>/delete")
async def delete(conversation_id: int) -> Any:
    s = g.session
    await _stop(s, conversation_id)
    if not await _state().history.delete(s.id, conversation_id):
        return Response("no such conversation", 404)
    await _broadcast_conversations()
    if request.headers.get("HX-Current-URL", "").rstrip("/").endswith(f"/c/{conversation_id}"):
        return Response("", 200, headers={"HX-Location": json.dumps({"path": "/", "target": "#main"})})
    return Response("", 204)


@ui.post("/settings")
async def settings() -> Any:
    form = await request.form
    await _set_thinking(g.session, form.get("enable_thinking") == "1")
    return Response("", 204)


async def _set_thinking(s: Session, on: bool) -> None:
    s.enable_thinking = on
    await _state().sessions.save(s)
    s.channel.publish(str(_bubbles().thinking_toggle(on, _state().model.thinking_switch, oob=True)))


@ui.post("/settings/reasoning")
async def reasoning_setting() -> Any:
    """The session's reasoning budget: a count of tokens, or empty for none."""
    s, raw = g.session, ((await request.form).get("max_reasoning_tokens") or "").strip()
    if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        return Response("the reasoning budget is a whole number of tokens", 400)
    s.max_reasoning_tokens = int(raw) if raw else None
    await _state().sessions.save(s)
    s.channel.publish(str(_bubbles().reasoning_budget(s.max_reasoning_tokens, oob=True)))
    return Response("", 204)


def _reasoning_budget(state: ServerState, s: Session) -> int | None:
    return s.max_reasoning_tokens if s.max_reasoning_tokens is not None else state.settings.max_reasoning_tokens


@ui.post("/stop")
async def stop() -> Any:
    await _stop(g.session)
    return Response("", 204)


async def _stop(s: Session, conversation_id: int | None = None) -> None:
    """Stops the session's answer (only if it is for ``conversation_id``, when given), on
    whichever replica is writing it."""
    state = _state()
    if s.turn is not None and s.generating:
        if conversation_id is None or s.turn.conversation_id == conversation_id:
            s.turn.cancel()
    elif state.replicas is not None:
        await state.replicas.command(s.id, "stop", conversation=conversation_id)


async def on_command(state: ServerState, session: str, command: dict[str, Any]) -> None:
    """A command another replica received for an answer this one may be writing."""
    s = state.sessions.peek(session)
    if command.get("op") != "stop" or s is None or s.turn is None or not s.generating:
        return
    conversation = command.get("conversation")
    if conversation is None or s.turn.conversation_id == conversation:
        s.turn.cancel()


async def on_lapsed(state: ServerState, session: str, claim: dict[str, str]) -> None:
    """An answer whose replica stopped renewing its claim (it died): marked interrupted, in the
    history (with what was saved of it) and in every tab."""
    if claim.get("message_id"):
        await state.history.interrupt(int(claim["message_id"]))
    if claim.get("dom_id") and state.replicas is not None:
        fragment = state.fragments.update_oob(claim["dom_id"], None, None, _stats(None, None, "interrupted"), "interrupted")
        state.replicas.channel(session).publish(str(fragment), scope=claim.get("conv_key") or None)


@ui.post("/send")
async def send() -> Any:
    state, s = _state(), g.session
    form = await request.form
    text = (form.get("text") or "").strip()
    conv_key = form.get("conversation", "new")
    if not text:
        return Response("", 204)
    if s.generating:
        return _busy(s)
    if conv_key != "new" and parse_id(conv_key) is None:
        return Response("bad conversation", 400)
    if text.startswith("/"):
        return await _command(s, conv_key, text)
    reason = "The server is shutting down; try again in a moment." if state.draining else state.model.unavailable_reason
    if reason is not None:
        return await _start_turn(s, conv_key, text, kind="system", answer=reason)

    async with s.lock:
        claim = await _claim(state, s)
        if claim is None:  # another tab's message got here first
            return _busy(s)
        created = None
        try:
            if conv_key == "new":
                created = await state.history.create_conversation(s.id, text)
                conversation_id = created.id
            else:
                conversation_id = parse_id(conv_key)
                if await state.history.conversation(s.id, conversation_id) is None:
                    await _release(state, s, claim)
                    return Response("no such conversation", 404)
            history = [m.to_chat() for m in await state.history.messages(s.id, conversation_id) if m.content or m.role == "user"]
            user_id, answer_id = await state.history.add_exchange(conversation_id, text)
            turn = Turn(str(conversation_id), f"m{user_id}", f"m{answer_id}", text, conversation_id=conversation_id, message_id=answer_id, claim=claim)
            await _describe(state, s, turn)
        except BaseException:
            await _release(state, s, claim)
            raise
        messages = ([{"role": "system", "content": state.settings.system_prompt}] if state.settings.system_prompt else []) + history
        messages.append({"role": "user", "content": text})
        s.turn = turn
        s.channel.publish(str(_bubbles().turn_oob(turn)), scope=turn.conv_key)
        turn.task = asyncio.create_task(_owned(state, s, turn, _run_model(state, s, turn, messages)))
        state.generations_started += 1
    if created is not None:
        await _broadcast_conversations()
        view = await _view(conversation_id)
        html = _state().render("main.html", **view)
        listing = _bubbles().conversation_list(await _conversations(), conversation_id, oob=True)
        headers = {"HX-Retarget": "#main", "HX-Reswap": "innerHTML", "HX-Push-Url": f"/c/{conversation_id}"}
        return Response(html + str(listing), 200, headers=headers)
    return str(_bubbles().turn(turn))


async def _claim(state: ServerState, s: Session) -> str | None:
    """Takes the session's answer slot: a claim (``""`` on a lone server), or ``None`` when an
    answer is already being written for the session, here or on another replica."""
    if s.generating:
        return None
    if state.replicas is None:
        return ""
    return await state.replicas.claim(s.id)


async def _describe(state: ServerState, s: Session, turn: Turn) -> None:
    """Adds what the answer is to its claim, for a replica that must mark it interrupted."""
    if state.replicas is not None and turn.claim:
        fields = {"dom_id": turn.dom_id, "conv_key": turn.conv_key}
        if turn.message_id is not None:
            fields["message_id"] = str(turn.message_id)
        await state.replicas.describe(s.id, turn.claim, **fields)


async def _release(state: ServerState, s: Session, claim: str | None) -> None:
    if state.replicas is not None and claim:
        await state.replicas.release(s.id, claim)


async def _owned(state: ServerState, s: Session, turn: Turn, work: Any) -> None:
    """Runs a turn's work, then gives its claim back."""
    try:
        await work
    finally:
        await _release(state, s, turn.claim)


def _busy(s: Session) -> Response:
    s.channel.publish(str(_bubbles().notice("An answer is still being written: wait for it, or press Stop.", oob=True)))
    return Response("", 204, headers={"HX-Reswap": "none"})


# -- commands -----------------------------------------------------------------------------


async def _command(s: Session, conv_key: str, text: str) -> Any:
    state = _state()
    name, _, _arg = text.partition(" ")
    name = name.lower()
    if name == "/reset":
        html = _state().render("main.html", **await _view(None))
        return Response(html, 200, headers={"HX-Retarget": "#main", "HX-Reswap": "innerHTML", "HX-Push-Url": "/"})
    if name in ("/think", "/no_think") and state.model.thinking_switch is False:
        return await _start_turn(s, conv_key, text, kind="system", answer=NO_THINKING_SWITCH)
    if name in ("/think", "/no_think"):
        await _set_thinking(s, name == "/think")
        reply = "Thinking is **on**: the model reasons before it answers." if name == "/think" else "Thinking is **off**."
        return await _start_turn(s, conv_key, text, kind="system", answer=reply)
    if name == "/help":
        return await _start_turn(s, conv_key, text, kind="system", answer=HELP)
    if name == "/status":
        return await _start_turn(s, conv_key, text, kind="system", answer=_status_text(state, s))
    if name == "/quote":
        return await _start_turn(s, conv_key, text, kind="system", produce=_stream_quote(random.choice(QUOTES)))
    return await _start_turn(s, conv_key, text, kind="system", answer=f"Unknown command `{name}`.\n\n{HELP}")


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
        ("reasoning budget", f"{budget} tokens" if (budget := _reasoning_budget(state, s)) is not None else "none"),
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


async def _start_turn(s: Session, conv_key: str, text: str, *, kind: str, answer: str | None = None, produce: Any = None) -> Any:
    """Shows ``text`` and its answer: ``answer`` (markdown) at once, or what
    ``produce(state, session, turn)`` streams. Not stored."""
    state = _state()
    async with s.lock:
        claim = None
        if produce is not None and (claim := await _claim(state, s)) is None:
            return _busy(s)
        try:
            user_id, dom_id = await state.sessions.dom_ids(s)
            turn = Turn(conv_key, user_id, dom_id, text, kind=kind, claim=claim)
            if answer is not None:
                turn.body, turn.finish = markdown(answer), "stop"
            await _describe(state, s, turn)
        except BaseException:
            await _release(state, s, claim)
            raise
        s.turn = turn
        s.channel.publish(str(_bubbles().turn_oob(turn)), scope=conv_key)
        if produce is not None:
            turn.task = asyncio.create_task(_owned(state, s, turn, produce(state, s, turn)))
    return str(_bubbles().turn(turn))


def _apply(state: ServerState, s: Session, turn: Turn, *, reasoning: str | None = None, body: Markup | None = None, stats: str = "", finish: str | None = None) -> None:
    """Records a change to an answer and publishes it. Runs on the event loop."""
    if reasoning is not None:
        turn.reasoning = reasoning
    if body is not None:
        turn.body = body
    turn.stats, turn.finish = stats, finish
    fragment = state.fragments.update_oob(turn.dom_id, plain(reasoning) if reasoning is not None else None, body, stats, finish)
    s.channel.publish(str(fragment), scope=turn.conv_key)


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
            _apply(state, s, turn, body=markdown(shown), stats=f"{i + 1} of {len(pieces)} words")
        rate = len(shown.split()) / max(time.perf_counter() - t0, 1e-9)
        finish = "cancelled" if turn.cancelled else "stop"
        _apply(state, s, turn, body=markdown(shown), stats=f"quote · {len(shown.split())} words · {rate:.0f} words/s" + (" · stopped" if turn.cancelled else ""), finish=finish)

    return produce


# -- model answers ------------------------------------------------------------------------


async def _run_model(state: ServerState, s: Session, turn: Turn, messages: list[dict[str, Any]]) -> None:
    """Runs one answer. The engine's events are added up and rendered on the relay's worker
    thread (the engine itself never waits on us); each rendered state is applied on the loop."""
    model = state.model.model
    assert model is not None
    settings = state.settings
    enable_thinking = s.enable_thinking if state.model.thinking_switch is not False else None
    max_reasoning_tokens = _reasoning_budget(state, s)
    answer = ChatResult(finish_reason="error")
    failure: list[str] = []
    last = 0.0

    def shown() -> str:
        """The markdown the bubble shows (and the history keeps): the answer, any tool calls the
        model wrote, and the error that ended it."""
        calls = "".join(f"\n```json\n{json.dumps(c.to_message(), ensure_ascii=False, indent=2)}\n```\n" for c in answer.tool_calls)
        return "\n\n".join(part for part in ((answer.content + calls).strip(), *failure) if part)

    def view(stats: str, finish: str | None = None) -> dict[str, Any]:
        # "saved": the text as the history keeps it, taken on the same thread as the rest.
        text = shown()
        return {"reasoning": answer.reasoning.strip(), "body": markdown(text), "stats": stats, "finish": finish, "saved": (text, answer.reasoning)}

    def prepare(ev: Any) -> dict[str, Any] | str | None:
        """On the worker thread: the answer's new state to show, a notice, or nothing yet."""
        nonlocal last
        answer.add(ev)
        if isinstance(ev, ContextWarning):
            return str(state.fragments.notice(f"Earlier messages were left out: {ev.message}.", oob=True))
        if isinstance(ev, ChatDone):
            u = ev.usage
            return view(_stats(u and u.completion_tokens, u and u.decode_tokens_per_second, ev.finish_reason, u and u.prefill_seconds), ev.finish_reason)
        if (now := time.perf_counter()) - last >= MIN_UPDATE_INTERVAL:
            last = now
            return view("writing…")
        return None

    def start(cancel: Any) -> Any:
        # The session is the tenant: its prefixes are reused by its own next turns only.
        return model.chat(
            messages,
            enable_thinking=enable_thinking,
            max_tokens=settings.max_tokens,
            max_reasoning_tokens=max_reasoning_tokens,
            cancel=cancel,
            tenant=f"session:{s.id}",
            client=f"session:{s.id}",
            **settings.sampling(),
        )

    saved_at = time.monotonic()
    placing: asyncio.Task[None] | None = None
    # The answer's last state, published once the history has it (see _view).
    final: dict[str, Any] | None = None
    assert turn.message_id is not None
    try:
        relay = await Relay.start(start, prepare, observe=state.metrics.observe_generation)
        turn.stream = relay.stream
        if turn.cancelled:
            relay.cancel()
        if relay.stream.queue_position:
            placing = asyncio.create_task(_show_place(state, s, turn, relay.stream))
        async for item in relay:
            if isinstance(item, str):
                s.channel.publish(item)
                continue
            text, reasoning = item.pop("saved")
            if item["finish"] is not None:
                final = item
                continue
            _apply(state, s, turn, **item)
            if time.monotonic() - saved_at >= SAVE_SECONDS:
                saved_at = time.monotonic()
                await state.history.save_partial(turn.message_id, content=text, reasoning=reasoning)
    except Exception as e:  # shown to the user (and logged when unexpected)
        if not isinstance(e, SmolcandleError):
            log.exception("generation failed")
        failure.append(f"**Error:** {e}")
        answer.finish_reason = "error"
        final = view("failed", "error")
        final.pop("saved")
    if placing is not None:
        placing.cancel()
    answer.finish()
    if answer.finish_reason == "cancelled" and turn.interrupted:
        answer.finish_reason = "interrupted"
        final = {"body": markdown(shown()), "stats": _stats(None, None, "interrupted"), "finish": "interrupted"}
    elif answer.finish_reason == "cancelled":
        state.generations_cancelled += 1
    usage = answer.usage
    if usage is not None:
        s.context_tokens = usage.total_tokens
    try:
        await state.history.finish_answer(
            turn.message_id,
            content=shown(),
            reasoning=answer.reasoning,
            finish_reason=answer.finish_reason,
            completion_tokens=usage.completion_tokens if usage else None,
            tokens_per_second=usage.decode_tokens_per_second if usage else None,
        )
    except Exception:  # the database is away: the tabs still get the answer's end
        log.exception("could not save an answer")
    if final is None:  # the stream ended without its last event
        final = {"body": markdown(shown()), "stats": _stats(None, None, answer.finish_reason), "finish": answer.finish_reason}
    _apply(state, s, turn, **final)


async def _show_place(state: ServerState, s: Session, turn: Turn, stream: Any) -> None:
    """Shows a queued answer's place until the engine starts it."""
    shown = 0
    while turn.finish is None and not turn.cancelled and (place := stream.queue_position) > 0:
        if place != shown:
            shown = place
            _apply(state, s, turn, stats=f"queued: place {place} (the model is busy with other answers)")
        await asyncio.sleep(QUEUE_POLL_SECONDS)


# -- the event stream ---------------------------------------------------------------------


@ui.get("/events")
async def events() -> Any:
    state, s = _state(), g.session
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
