"""Replicas of one server sharing a Redis: the sessions' event streams, their settings, the
answers being written and the commands aimed at them, each a module of its own:

- :mod:`.streams`: the sessions' event streams (Redis Streams), which tabs on any replica follow;
- :mod:`.sessions`: session records, so that a session is the same on every replica;
- :mod:`.claims`: answers in progress, claimed by the replica writing them and renewed by a
  heartbeat, so that when it dies another replica marks them interrupted;
- :mod:`.control`: commands (Stop, deleting a conversation being answered) for the replica
  writing the answer.

:class:`Replicas` is this replica's link to them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from .claims import HEARTBEAT_SECONDS, Claims
from .connection import Link
from .control import Control
from .sessions import SessionRecords
from .streams import STREAM_EVENTS, StreamChannel, Streams

__all__ = ["Replicas"]

log = logging.getLogger("smolcandle.server")

# How many times close() cancels a background task that has not ended (a second apart).
CLOSE_ROUNDS = 5


def _report_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("replicas: the task %s ended", task.get_coro().__qualname__, exc_info=task.exception())


class Replicas:
    """This replica's link to the shared Redis. :meth:`start` connects and starts the writer and
    reader of the event streams, the heartbeat, the reaper and the command listener;
    :meth:`close` ends them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replica = secrets.token_hex(6)
        self._link = Link(url)
        self._streams = Streams(self._link, self.replica, keep=STREAM_EVENTS)
        self._sessions = SessionRecords(self._link)
        self._claims = Claims(self._link, self.replica)
        self._control = Control(self._link)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def on_lapsed(self) -> Callable[[str, dict[str, str]], Awaitable[None]] | None:
        """Called with (session, claim record) for each lapsed claim this replica took."""
        return self._claims.on_lapsed

    @on_lapsed.setter
    def on_lapsed(self, handler: Callable[[str, dict[str, str]], Awaitable[None]] | None) -> None:
        self._claims.on_lapsed = handler

    @property
    def on_command(self) -> Callable[[str, dict[str, Any]], Awaitable[None]] | None:
        """Called with (session, command) for each command published by any replica."""
        return self._control.on_command

    @on_command.setter
    def on_command(self, handler: Callable[[str, dict[str, Any]], Awaitable[None]] | None) -> None:
        self._control.on_command = handler

    async def start(self) -> None:
        await self._link.connect()
        self._streams.prepare()
        self._claims.prepare()
        await self._control.prepare()
        self._link.running = True
        for job in (*self._streams.loops(), *self._claims.loops(), *self._control.loops()):
            task = asyncio.create_task(job)
            task.add_done_callback(_report_death)
            self._tasks.append(task)
        self._claims.start_heartbeat()

    async def close(self) -> None:
        await self._claims.stop_heartbeat()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flushed(), 5.0)
        # A cancellation can be swallowed inside redis-py (a timeout racing it), and the task then
        # goes on: so the loops also stop on their own flag, and each is asked again until it ends.
        self._link.running = False
        pending = {task for task in self._tasks if not task.done()}
        for _ in range(CLOSE_ROUNDS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=HEARTBEAT_SECONDS)
        if pending:
            log.warning("replicas: %d background tasks did not stop", len(pending))
        if self._link.redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._streams.close(), HEARTBEAT_SECONDS * 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._link.redis.aclose(), HEARTBEAT_SECONDS * 2)

    # -- event streams ----------------------------------------------------------------------

    def channel(self, session: str) -> StreamChannel:
        return self._streams.channel(session)

    @property
    def pending_events(self) -> int:
        """Events published here and not yet written to Redis."""
        return self._streams.pending_events

    @property
    def dropped_events(self) -> int:
        """Events given up on: refused by Redis, or past the queue's bound while it was away."""
        return self._streams.dropped_events

    async def flushed(self) -> None:
        """Returns once every event queued before the call is in Redis."""
        await self._streams.flushed()

    # -- session records --------------------------------------------------------------------

    async def load_session(self, session: str) -> dict[str, str]:
        return await self._sessions.load(session)

    async def save_session(self, session: str, **fields: str) -> None:
        await self._sessions.save(session, **fields)

    async def next_number(self, session: str) -> int:
        """A number no other element of the session's pages has (for element ids)."""
        return await self._sessions.next_number(session)

    # -- answers in progress ----------------------------------------------------------------

    async def claim(self, session: str, **fields: str) -> str | None:
        """Claims the session's answer slot for this replica: a token, or ``None`` when another
        answer is being written (on any replica)."""
        return await self._claims.claim(session, **fields)

    async def describe(self, session: str, token: str, **fields: str) -> None:
        """Adds what the claimed answer is (its element ids, its message) to the claim."""
        await self._claims.describe(session, token, **fields)

    async def release(self, session: str, token: str) -> None:
        await self._claims.release(session, token)

    # -- commands ---------------------------------------------------------------------------

    async def command(self, session: str, op: str, **args: Any) -> None:
        """Publishes a command for the replica writing the session's answer."""
        await self._control.command(session, op, **args)
