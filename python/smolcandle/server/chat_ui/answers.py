"""The browser chat's answers: a turn is claimed (one answer at a time per session, on any
replica), produced in the background — by the model through the generation service, or by a
command — and every change to it is published on the session's channel as a fragment aimed
at its bubble; the history keeps it as it grows."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from markupsafe import Markup
from quart import Response

from ...chat import ChatDone, ChatResult, ContextWarning
from ...errors import SmolcandleError
from ..generations import Caller, Refused
from ..render import markdown, plain
from ..sessions import Session, Turn
from ..state import ServerState
from . import pages

log = logging.getLogger("smolcandle.server")

DOOR = "chat_ui"
# Re-rendering an answer for every token is wasteful when tokens come fast: publish at most this
# often (the final state is always published).
MIN_UPDATE_INTERVAL = 0.03
# An answer being written is saved this often, so that a crash loses at most this much of it.
SAVE_SECONDS = 3.0
# How often a queued answer's place is looked at.
QUEUE_POLL_SECONDS = 0.5


# -- the session's answer slot ------------------------------------------------------------


async def claim(state: ServerState, s: Session) -> str | None:
    """Takes the session's answer slot: a claim (``""`` on a lone server), or ``None`` when an
    answer is already being written for the session, here or on another replica."""
    if s.generating:
        return None
    if state.replicas is None:
        return ""
    return await state.replicas.claim(s.id)


async def describe(state: ServerState, s: Session, turn: Turn) -> None:
    """Adds what the answer is to its claim, for a replica that must mark it interrupted."""
    if state.replicas is not None and turn.claim:
        fields = {"dom_id": turn.dom_id, "conv_key": turn.conv_key}
        if turn.message_id is not None:
            fields["message_id"] = str(turn.message_id)
        await state.replicas.describe(s.id, turn.claim, **fields)


async def release(state: ServerState, s: Session, claim: str | None) -> None:
    if state.replicas is not None and claim:
        await state.replicas.release(s.id, claim)


def run(state: ServerState, s: Session, turn: Turn, work: Any) -> None:
    """Runs a turn's work in the background, held for draining, then gives its claim back."""

    async def owned() -> None:
        try:
            await work
        finally:
            state.generations.release(turn)
            await release(state, s, turn.claim)

    state.generations.hold(turn)
    turn.task = asyncio.create_task(owned())


def busy(s: Session) -> Response:
    s.channel.publish(str(pages.bubbles().notice("An answer is still being written: wait for it, or press Stop.", oob=True)))
    return Response("", 204, headers={"HX-Reswap": "none"})


async def start_turn(state: ServerState, s: Session, conv_key: str, text: str, *, kind: str, answer: str | None = None, produce: Any = None) -> Any:
    """Shows ``text`` and its answer: ``answer`` (markdown) at once, or what
    ``produce(state, session, turn)`` streams. Not stored."""
    async with s.lock:
        taken = None
        if produce is not None and (taken := await claim(state, s)) is None:
            return busy(s)
        try:
            user_id, dom_id = await state.sessions.dom_ids(s)
            turn = Turn(conv_key, user_id, dom_id, text, kind=kind, claim=taken)
            if answer is not None:
                turn.body, turn.finish = markdown(answer), "stop"
            await describe(state, s, turn)
        except BaseException:
            await release(state, s, taken)
            raise
        s.turn = turn
        s.channel.publish(str(pages.bubbles().turn_oob(turn)), scope=conv_key)
        if produce is not None:
            run(state, s, turn, produce(state, s, turn))
    return str(pages.bubbles().turn(turn))


def apply(state: ServerState, s: Session, turn: Turn, *, reasoning: str | None = None, body: Markup | None = None, stats: str = "", finish: str | None = None) -> None:
    """Records a change to an answer and publishes it. Runs on the event loop."""
    if reasoning is not None:
        turn.reasoning = reasoning
    if body is not None:
        turn.body = body
    turn.stats, turn.finish = stats, finish
    fragment = pages.bubbles().update_oob(turn.dom_id, plain(reasoning) if reasoning is not None else None, body, stats, finish)
    s.channel.publish(str(fragment), scope=turn.conv_key)


def reasoning_budget(state: ServerState, s: Session) -> int | None:
    return s.max_reasoning_tokens if s.max_reasoning_tokens is not None else state.settings.max_reasoning_tokens


# -- stopping -----------------------------------------------------------------------------


async def stop(state: ServerState, s: Session, conversation_id: int | None = None) -> None:
    """Stops the session's answer (only if it is for ``conversation_id``, when given), on
    whichever replica is writing it."""
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


async def on_lapsed(state: ServerState, session: str, record: dict[str, str]) -> None:
    """An answer whose replica stopped renewing its claim (it died): marked interrupted, in the
    history (with what was saved of it) and in every tab."""
    if record.get("message_id"):
        await state.history.interrupt(int(record["message_id"]))
    if record.get("dom_id") and state.replicas is not None:
        fragment = pages.bubbles().update_oob(record["dom_id"], None, None, pages.stats(None, None, "interrupted"), "interrupted")
        state.replicas.channel(session).publish(str(fragment), scope=record.get("conv_key") or None)


# -- model answers ------------------------------------------------------------------------


async def run_model(state: ServerState, s: Session, turn: Turn, messages: list[dict[str, Any]]) -> None:
    """Runs one answer. The engine's events are added up and rendered on the relay's worker
    thread (the engine itself never waits on us); each rendered state is applied on the loop."""
    enable_thinking = s.enable_thinking if state.model.thinking_switch is not False else None
    max_reasoning_tokens = reasoning_budget(state, s)
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
            return str(pages.bubbles().notice(f"Earlier messages were left out: {ev.message}.", oob=True))
        if isinstance(ev, ChatDone):
            u = ev.usage
            return view(pages.stats(u and u.completion_tokens, u and u.decode_tokens_per_second, ev.finish_reason, u and u.prefill_seconds), ev.finish_reason)
        if (now := time.perf_counter()) - last >= MIN_UPDATE_INTERVAL:
            last = now
            return view("writing…")
        return None

    saved_at = time.monotonic()
    placing: asyncio.Task[None] | None = None
    # The answer's last state, published once the history has it (see _view).
    final: dict[str, Any] | None = None
    assert turn.message_id is not None
    try:
        # The session is the tenant: its prefixes are reused by its own next turns only.
        generation = await state.generations.chat(
            Caller.browser(s.id), DOOR, messages, enable_thinking=enable_thinking, max_reasoning_tokens=max_reasoning_tokens, prepare=prepare
        )
        turn.generation = generation
        if turn.cancelled:
            generation.cancel(interrupted=turn.interrupted)
        if generation.stream.queue_position:
            placing = asyncio.create_task(_show_place(state, s, turn, generation.stream))
        async for item in generation:
            if isinstance(item, str):
                s.channel.publish(item)
                continue
            text, reasoning = item.pop("saved")
            if item["finish"] is not None:
                final = item
                continue
            apply(state, s, turn, **item)
            if time.monotonic() - saved_at >= SAVE_SECONDS:
                saved_at = time.monotonic()
                await state.history.save_partial(turn.message_id, content=text, reasoning=reasoning)
    except Exception as e:  # shown to the user (and logged when unexpected)
        if not isinstance(e, SmolcandleError | Refused):
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
        final = {"body": markdown(shown()), "stats": pages.stats(None, None, "interrupted"), "finish": "interrupted"}
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
        final = {"body": markdown(shown()), "stats": pages.stats(None, None, answer.finish_reason), "finish": answer.finish_reason}
    apply(state, s, turn, **final)


async def _show_place(state: ServerState, s: Session, turn: Turn, stream: Any) -> None:
    """Shows a queued answer's place until the engine starts it."""
    shown = 0
    while turn.finish is None and not turn.cancelled and (place := stream.queue_position) > 0:
        if place != shown:
            shown = place
            apply(state, s, turn, stats=f"queued: place {place} (the model is busy with other answers)")
        await asyncio.sleep(QUEUE_POLL_SECONDS)

