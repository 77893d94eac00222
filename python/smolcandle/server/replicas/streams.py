"""The sessions' event streams on Redis Streams, one per session (``smolcandle:s:ID:events``).

Their ids are ``INCARNATION-SEQ``, given by a script that numbers the session's events 1, 2, 3…
so that a tab resuming from ``Last-Event-ID`` on any replica sees at once whether it missed
something. A stream keeps its last ``STREAM_EVENTS`` events and expires after
``STREAM_IDLE_SECONDS`` without one (the next event starts a new incarnation, and tabs from before
reload).

Publishing never waits: events are queued and written in order by one task, each batch (up to
256 events, of any sessions) in one script call. One reader task per replica follows every stream
that a tab of this replica watches, with one ``XREAD BLOCK`` over all of them (woken through a
stream of its own when that set changes), and hands each event to those tabs' bounded queues; a
tab that falls behind is told to reload, as in one process. A tab that connects catches up with
``XRANGE``, and so does one that finds a gap in what it was handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from ..hub import REPLAY_EVENTS, TAB_QUEUE, Event, Reload, parse_event_id
from .connection import NOW_MS, Link, session_key

log = logging.getLogger("smolcandle.server")

STREAM_EVENTS = REPLAY_EVENTS
STREAM_IDLE_SECONDS = 24 * 3600
# Queued events past this are dropped (and counted) while Redis cannot be reached: memory stays
# bounded, and the next event of an answer carries its whole state anyway.
MAX_PENDING = 50_000

# KEYS: stream and meta of each session, in pairs. ARGV: maxlen, ttl_ms, then four per event:
# its session's pair number (from 1), data, scope, created. Numbers the events and adds them, in
# order: a whole batch of the writer in one call.
_PUBLISH = f"""
local maxlen, ttl = ARGV[1], ARGV[2]
for i = 3, #ARGV, 4 do
  local k = tonumber(ARGV[i])
  local stream, meta = KEYS[2 * k - 1], KEYS[2 * k]
  local base = redis.call('HGET', meta, 'base')
  if not base then
    {NOW_MS}
    base = string.format('%d', now)
    redis.call('HSET', meta, 'base', base)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('XADD', stream, 'MAXLEN', '=', maxlen, base .. '-' .. seq, 'd', ARGV[i + 1], 's', ARGV[i + 2], 't', ARGV[i + 3])
end
for k = 1, #KEYS do redis.call('PEXPIRE', KEYS[k], ttl) end
return (#ARGV - 2) / 4
"""

# KEYS: meta. ARGV: ttl_ms. The stream's position (its incarnation started if need be).
_POSITION = f"""
local base = redis.call('HGET', KEYS[1], 'base')
if not base then
  {NOW_MS}
  base = string.format('%d', now)
  redis.call('HSET', KEYS[1], 'base', base, 'seq', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return base .. '-' .. (redis.call('HGET', KEYS[1], 'seq') or '0')
"""


class Streams:
    """This replica's side of the event streams: the writer of what its sessions publish, and
    the reader that hands what any replica wrote to this replica's tabs."""

    def __init__(self, link: Link, replica: str, *, keep: int = STREAM_EVENTS) -> None:
        self._link = link
        self._keep = keep  # events each stream keeps
        self._out: deque[tuple[str, str, str | None, float]] = deque()
        self._out_ready = asyncio.Event()
        self._queued = 0  # events handed to publish()
        self._written = 0  # events written (or given up on)
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.dropped_events = 0
        # The streams followed for this replica's tabs: key -> (last id read, its subscriptions).
        self._follow: dict[str, tuple[str, set[StreamSubscription]]] = {}
        self._wake_key = f"smolcandle:replica:{replica}:wake"

    def prepare(self) -> None:
        """Registers the scripts, once connected."""
        self._publish = self._link.redis.register_script(_PUBLISH)
        self._position = self._link.redis.register_script(_POSITION)

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._writer(), self._reader()]

    async def close(self) -> None:
        """Removes what only this replica used (its loops have ended)."""
        await self._link.redis.delete(self._wake_key)

    def channel(self, session: str) -> StreamChannel:
        return StreamChannel(self, session)

    @property
    def pending_events(self) -> int:
        return len(self._out)

    def enqueue(self, session: str, data: str, scope: str | None) -> None:
        if len(self._out) >= MAX_PENDING:
            self.dropped_events += 1
            return
        self._out.append((session, data, scope, time.time()))
        self._queued += 1
        self._out_ready.set()

    async def flushed(self) -> None:
        """Returns once every event queued before the call is in Redis."""
        target = self._queued
        if self._written >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, future))
        await future

    async def _writer(self) -> None:
        ttl = str(STREAM_IDLE_SECONDS * 1000)
        backoff = 0.1
        while self._link.running:
            await self._out_ready.wait()
            batch = [self._out[i] for i in range(min(256, len(self._out)))]
            pairs: dict[str, int] = {}
            args: list[Any] = [self._keep, ttl]
            for session, data, scope, created in batch:
                args += [pairs.setdefault(session, len(pairs) + 1), data, scope or "", repr(created)]
            keys = [k for session in pairs for k in (session_key(session, "events"), session_key(session, "meta"))]
            try:
                await self._publish(keys=keys, args=args)
            except self._link.transient as e:  # Redis away or restarting: the same batch, later
                log.warning("Redis: could not publish %d events (%s); retrying", len(batch), e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:  # refused by Redis: retrying would not help
                log.exception("Redis: %d events were refused", len(batch))
                self.dropped_events += len(batch)
            backoff = 0.1
            for _ in batch:
                self._out.popleft()
            self._written += len(batch)
            if not self._out:
                self._out_ready.clear()
            waiting = []
            for target, future in self._flush_waiters:
                if self._written >= target:
                    if not future.done():
                        future.set_result(None)
                else:
                    waiting.append((target, future))
            self._flush_waiters = waiting

    def follow(self, sub: StreamSubscription, key: str, position: str) -> None:
        """Hands ``key``'s events after ``position`` (or after where it is read already) to ``sub``."""
        if key in self._follow:
            self._follow[key][1].add(sub)
            return
        self._follow[key] = (position, {sub})
        self._wake()

    def unfollow(self, sub: StreamSubscription, key: str) -> None:
        entry = self._follow.get(key)
        if entry is not None:
            entry[1].discard(sub)
            if not entry[1]:
                del self._follow[key]

    def _wake(self) -> None:
        task = asyncio.ensure_future(self._link.redis.xadd(self._wake_key, {"w": "1"}, maxlen=1))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _reader(self) -> None:
        # An id, never "$": a wake-up written before the read starts must still end it.
        wake = "0-0"
        while self._link.running:
            streams = {self._wake_key: wake, **{key: last for key, (last, _) in self._follow.items()}}
            try:
                # blocks for less than the client's socket timeout (redis-py's default: 5 s)
                got = await self._link.redis.xread(streams, count=512, block=2000)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - tabs catch up from the stream once it answers
                log.warning("Redis: reading event streams failed (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            for key, entries in got or ():
                if key == self._wake_key:
                    wake = entries[-1][0]
                    continue
                followed = self._follow.get(key)
                if followed is None:
                    continue
                self._follow[key] = (entries[-1][0], followed[1])
                for entry_id, fields in entries:
                    for sub in list(followed[1]):
                        sub.offer(entry_id, fields)

    async def read_range(self, key: str, first: str, last: str) -> list[tuple[str, dict[str, str]]]:
        return await self._link.redis.xrange(key, first, last)

    async def position(self, session: str) -> str:
        return str(await self._position(keys=[session_key(session, "meta")], args=[STREAM_IDLE_SECONDS * 1000]))


class StreamChannel:
    """A session's events on a Redis Stream (see the module's description)."""

    def __init__(self, streams: Streams, session: str) -> None:
        self._streams = streams
        self._session = session
        self._subscribers = 0
        self.dropped_subscribers = 0

    @property
    def subscribers(self) -> int:
        return self._subscribers

    def publish(self, data: str, *, scope: str | None = None) -> None:
        self._streams.enqueue(self._session, data, scope)

    async def last_event_id(self) -> str:
        # Waits for this replica's queued events to be written, so that the page does not get
        # them again; past a second (Redis slow or away) it goes on: events written later get
        # later ids, and a tab given one twice shows the same state (fragments are idempotent).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._streams.flushed(), 1.0)
        return await self._streams.position(self._session)

    async def subscribe(self, after: str | None, *, view: str | None = None) -> StreamSubscription:
        now = parse_event_id(await self._streams.position(self._session))
        assert now is not None
        position = parse_event_id(after) if after is not None else now
        reason = None
        if position is None:
            reason = "the event id this tab sent is not one of ours"
        elif position[0] != now[0]:
            reason = "the event stream started over (it expired, or Redis was emptied)"
        elif position[1] > now[1]:
            reason = "this tab is ahead of the server"
        self._subscribers += 1
        sub = StreamSubscription(self, view, position if position is not None and reason is None else now, reason)
        if reason is None:
            try:
                await sub.start(now[1])
            except BaseException:
                sub.close()
                raise
        return sub


class StreamSubscription:
    """One tab's events from a session stream: those it missed (read with ``XRANGE``), then
    those the replica's reader hands it, checked to follow each other without a gap."""

    def __init__(self, channel: StreamChannel, view: str | None, position: tuple[str, int], reload: str | None) -> None:
        self._channel = channel
        self._streams = channel._streams
        self._key = session_key(channel._session, "events")
        self._view = view
        self._base, self._seq = position
        self._queue: asyncio.Queue[tuple[str, dict[str, str]] | Reload] = asyncio.Queue(TAB_QUEUE)
        self._ready: deque[Event | Reload] = deque()
        if reload is not None:
            self._ready.append(Reload(reload))
        self._closed = False

    def offer(self, entry_id: str, fields: dict[str, str]) -> None:
        """Called by the reader, on the loop. Never waits: a tab that fell behind is dropped."""
        try:
            self._queue.put_nowait((entry_id, fields))
        except asyncio.QueueFull:
            self._streams.unfollow(self, self._key)
            self._channel.dropped_subscribers += 1
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(Reload("this tab fell behind the live stream"))

    async def start(self, now: int) -> None:
        """Catches up to ``now`` (the stream's position when the tab connected), then follows."""
        if not self._ready and self._seq < now:
            await self._fetch(now)
        self._streams.follow(self, self._key, f"{self._base}-{now}")

    async def _fetch(self, upto: int) -> bool:
        """Reads the events after the last one taken up to ``upto``; False (and a Reload
        queued) if some of them are gone."""
        entries = await self._streams.read_range(self._key, f"{self._base}-{self._seq + 1}", f"{self._base}-{upto}")
        if not entries or entries[0][0] != f"{self._base}-{self._seq + 1}":
            self._ready.append(Reload("this tab missed more events than the server keeps"))
            return False
        for entry_id, fields in entries:
            self._take(entry_id, fields)
        return True

    def _take(self, entry_id: str, fields: dict[str, str]) -> None:
        self._seq = int(entry_id.partition("-")[2])
        scope = fields.get("s") or None
        if scope is None or scope == self._view:
            self._ready.append(Event(entry_id, fields.get("d", ""), float(fields.get("t", 0) or 0), scope))

    async def next(self, timeout: float) -> Event | Reload | None:
        deadline = time.monotonic() + timeout
        while not self._ready:
            try:
                item = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return None
            if isinstance(item, Reload):
                return item
            entry_id, fields = item
            base, _, seq_text = entry_id.partition("-")
            seq = int(seq_text)
            if base != self._base:
                self._ready.append(Reload("the event stream started over (it expired, or Redis was emptied)"))
            elif seq <= self._seq:
                continue  # had it already (caught up past it)
            elif seq == self._seq + 1 or await self._fetch(seq - 1):
                self._take(entry_id, fields)
        return self._ready.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._streams.unfollow(self, self._key)
            self._channel._subscribers -= 1
