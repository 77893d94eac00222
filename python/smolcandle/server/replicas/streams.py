"""Replicas of one server sharing a Redis: the sessions' event streams, their settings, the
answers being written and the commands aimed at them.

- **Event streams** are Redis Streams, one per session (``smolcandle:s:ID:events``). Their ids are
  ``INCARNATION-SEQ``, given by a script that numbers the session's events 1, 2, 3… so that a tab
  resuming from ``Last-Event-ID`` on any replica sees at once whether it missed something. A
  stream keeps its last ``STREAM_EVENTS`` events and expires after ``STREAM_IDLE_SECONDS``
  without one (the next event starts a new incarnation, and tabs from before reload).
  Publishing never waits: events are queued and written in order by one task, each batch (up
  to 256 events, of any sessions) in one script call. One reader task per replica follows every stream that a tab of this replica watches,
  with one ``XREAD BLOCK`` over all of them (woken through a stream of its own when that set
  changes), and hands each event to those tabs' bounded queues; a tab that falls behind is told
  to reload, as in one process. A tab that connects catches up with ``XRANGE``, and so does one
  that finds a gap in what it was handed.
- **Session records** (``smolcandle:s:ID``) hold what the browser chose (thinking, reasoning
  budget) and the counter of element ids, so a session is the same on every replica.
- **Answers in progress** are claimed (``smolcandle:s:ID:turn``, at most one per session) by
  the replica writing them, which renews the claim's deadline in ``smolcandle:turns`` every
  ``HEARTBEAT_SECONDS``, from a thread of its own: a busy event loop (seconds behind under
  load) must not pass for a dead replica. The thread stops renewing if the loop has not
  turned for ``LOOP_STALL_SECONDS``. When a replica dies its claims lapse; the first replica to
  see one lapse takes it and marks the answer interrupted, in the history and in every tab.
- **Commands** (Stop, deleting a conversation being answered) are published on
  ``smolcandle:control``; the replica writing the answer acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..hub import REPLAY_EVENTS, TAB_QUEUE, Event, Reload, parse_event_id

log = logging.getLogger("smolcandle.server")

STREAM_EVENTS = REPLAY_EVENTS
# Connections to Redis per replica; requests wait for one past that.
POOL_SIZE = 64
STREAM_IDLE_SECONDS = 24 * 3600
SESSION_SECONDS = 365 * 24 * 3600
HEARTBEAT_SECONDS = 1.0
# A claim not renewed for this long is taken as its replica's death.
CLAIM_SECONDS = 3.0
# A replica whose event loop has not turned for this long is taken as hung: its claims lapse.
LOOP_STALL_SECONDS = 30.0
# How many times close() cancels a background task that has not ended (a second apart).
CLOSE_ROUNDS = 5
CONTROL = "smolcandle:control"
TURNS = "smolcandle:turns"
# Queued events past this are dropped (and counted) while Redis cannot be reached: memory stays
# bounded, and the next event of an answer carries its whole state anyway.
MAX_PENDING = 50_000

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

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
    {_NOW_MS}
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
  {_NOW_MS}
  base = string.format('%d', now)
  redis.call('HSET', KEYS[1], 'base', base, 'seq', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return base .. '-' .. (redis.call('HGET', KEYS[1], 'seq') or '0')
"""

# KEYS: turn, turns. ARGV: session, replica, token, claim_ms, then field/value pairs.
_CLAIM = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
{_NOW_MS}
redis.call('HSET', KEYS[1], 'replica', ARGV[2], 'token', ARGV[3], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
return 1
"""

# KEYS: turn, turns. ARGV: session, token, claim_ms, then field/value pairs (may be none).
_RENEW = f"""
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 0 end
{_NOW_MS}
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[3]), ARGV[1])
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
return 1
"""

# KEYS: turn, turns. ARGV: session, token.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: turn, turns. ARGV: session. Takes a lapsed claim (once, whoever asks first): its record.
_TAKE_LAPSED = f"""
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline then return false end
{_NOW_MS}
if tonumber(deadline) > now then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
local record = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return record
"""


def _report_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("replicas: the task %s ended", task.get_coro().__qualname__, exc_info=task.exception())


def _key(session: str, part: str = "") -> str:
    return f"smolcandle:s:{session}" + (f":{part}" if part else "")


def _import_redis() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError("--redis needs the redis package: pip install 'smolcandle[replicas]'") from None
    return aioredis


class Replicas:
    """This replica's link to the shared Redis. :meth:`start` connects and starts the writer,
    the heartbeat, the reaper and the command listener; :meth:`close` ends them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replica = secrets.token_hex(6)
        self.redis: Any = None
        self._out: deque[tuple[str, str, str | None, float]] = deque()
        self._out_ready = asyncio.Event()
        self._queued = 0  # events handed to publish()
        self._written = 0  # events written (or given up on)
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.dropped_events = 0
        self._mine: dict[str, str] = {}  # session -> claim token, for the claims this replica holds
        # The streams followed for this replica's tabs: key -> (last id read, its subscriptions).
        self._follow: dict[str, tuple[str, set[StreamSubscription]]] = {}
        self._wake_key = f"smolcandle:replica:{self.replica}:wake"
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False  # the background loops go round while this holds
        self._beating = threading.Event()  # cleared to stop the heartbeat thread
        self._beat_thread: threading.Thread | None = None
        self._loop_turned = time.monotonic()
        #: Called with (session, claim record) for each lapsed claim this replica took.
        self.on_lapsed: Callable[[str, dict[str, str]], Awaitable[None]] | None = None
        #: Called with (session, command) for each command published by any replica.
        self.on_command: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None

    async def start(self) -> None:
        aioredis = _import_redis()
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
        from redis.retry import Retry

        # Connections are kept in a pool and reused: Redis' client `timeout` must stay 0 (its
        # default), or a connection it closed while idle fails the command that draws it.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            decode_responses=True,
            health_check_interval=10,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            max_connections=POOL_SIZE,
            timeout=10,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self._transient = (RedisConnectionError, RedisTimeoutError, OSError)
        try:
            await self.redis.ping()
        except Exception as e:
            raise RuntimeError(f"cannot reach Redis at {self.url}: {e}") from None
        self._publish = self.redis.register_script(_PUBLISH)
        self._position = self.redis.register_script(_POSITION)
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._take_lapsed = self.redis.register_script(_TAKE_LAPSED)
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CONTROL)
        self._running = True
        for job in (self._writer(), self._reader(), self._tick(), self._reaper(), self._listen(pubsub)):
            task = asyncio.create_task(job)
            task.add_done_callback(_report_death)
            self._tasks.append(task)
        self._beating.set()
        self._beat_thread = threading.Thread(target=self._heartbeat, name="smolcandle-heartbeat", daemon=True)
        self._beat_thread.start()

    async def close(self) -> None:
        self._beating.clear()
        if self._beat_thread is not None:
            await asyncio.to_thread(self._beat_thread.join, 5.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flushed(), 5.0)
        # A cancellation can be swallowed inside redis-py (a timeout racing it), and the task then
        # goes on: so the loops also stop on their own flag, and each is asked again until it ends.
        self._running = False
        pending = {task for task in self._tasks if not task.done()}
        for _ in range(CLOSE_ROUNDS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=HEARTBEAT_SECONDS)
        if pending:
            log.warning("replicas: %d background tasks did not stop", len(pending))
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.delete(self._wake_key), HEARTBEAT_SECONDS * 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.aclose(), HEARTBEAT_SECONDS * 2)

    # -- event streams ----------------------------------------------------------------------

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
        while self._running:
            await self._out_ready.wait()
            batch = [self._out[i] for i in range(min(256, len(self._out)))]
            pairs: dict[str, int] = {}
            args: list[Any] = [STREAM_EVENTS, ttl]
            for session, data, scope, created in batch:
                args += [pairs.setdefault(session, len(pairs) + 1), data, scope or "", repr(created)]
            keys = [k for session in pairs for k in (_key(session, "events"), _key(session, "meta"))]
            try:
                await self._publish(keys=keys, args=args)
            except self._transient as e:  # Redis away or restarting: the same batch, later
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
        task = asyncio.ensure_future(self.redis.xadd(self._wake_key, {"w": "1"}, maxlen=1))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _reader(self) -> None:
        # An id, never "$": a wake-up written before the read starts must still end it.
        wake = "0-0"
        while self._running:
            streams = {self._wake_key: wake, **{key: last for key, (last, _) in self._follow.items()}}
            try:
                # blocks for less than the client's socket timeout (redis-py's default: 5 s)
                got = await self.redis.xread(streams, count=512, block=2000)
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
        return await self.redis.xrange(key, first, last)

    async def position(self, session: str) -> str:
        return str(await self._position(keys=[_key(session, "meta")], args=[STREAM_IDLE_SECONDS * 1000]))

    # -- session records --------------------------------------------------------------------

    async def load_session(self, session: str) -> dict[str, str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_key(session))
            pipe.expire(_key(session), SESSION_SECONDS)
            record, _ = await pipe.execute()
        return record

    async def save_session(self, session: str, **fields: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(_key(session), mapping=fields)
            pipe.expire(_key(session), SESSION_SECONDS)
            await pipe.execute()

    async def next_number(self, session: str) -> int:
        """A number no other element of the session's pages has (for element ids)."""
        return int(await self.redis.hincrby(_key(session), "dom", 1))

    # -- answers in progress ----------------------------------------------------------------

    async def claim(self, session: str, **fields: str) -> str | None:
        """Claims the session's answer slot for this replica: a token, or ``None`` when another
        answer is being written (on any replica)."""
        token = secrets.token_hex(8)
        pairs = [x for kv in fields.items() for x in kv]
        keys = [_key(session, "turn"), TURNS]
        if not await self._claim(keys=keys, args=[session, self.replica, token, int(CLAIM_SECONDS * 1000), *pairs]):
            return None
        self._mine[session] = token
        return token

    async def describe(self, session: str, token: str, **fields: str) -> None:
        """Adds what the claimed answer is (its element ids, its message) to the claim."""
        pairs = [x for kv in fields.items() for x in kv]
        await self._renew(keys=[_key(session, "turn"), TURNS], args=[session, token, int(CLAIM_SECONDS * 1000), *pairs])

    async def release(self, session: str, token: str) -> None:
        if self._mine.get(session) == token:
            del self._mine[session]
        await self._release(keys=[_key(session, "turn"), TURNS], args=[session, token])

    async def claimed(self, session: str) -> dict[str, str] | None:
        """The claim on the session's answer slot, if any (whichever replica holds it)."""
        return await self.redis.hgetall(_key(session, "turn")) or None

    async def _tick(self) -> None:
        """Marks that the event loop turns, for the heartbeat thread."""
        while self._running:
            self._loop_turned = time.monotonic()
            await asyncio.sleep(HEARTBEAT_SECONDS / 2)

    def _heartbeat(self) -> None:
        """On its own thread, with a client of its own: renews this replica's claims."""
        import redis

        client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=HEARTBEAT_SECONDS * 2)
        renew = client.register_script(_RENEW)
        try:
            while self._beating.is_set():
                time.sleep(HEARTBEAT_SECONDS)
                if time.monotonic() - self._loop_turned > LOOP_STALL_SECONDS:
                    continue  # hung: let the claims lapse, so that another replica reports them
                mine = dict(self._mine)
                if not mine:
                    continue
                try:
                    with client.pipeline(transaction=False) as pipe:
                        for session, token in mine.items():
                            renew(keys=[_key(session, "turn"), TURNS], args=[session, token, int(CLAIM_SECONDS * 1000)], client=pipe)
                        pipe.execute(raise_on_error=False)
                except Exception as e:  # noqa: BLE001 - the next beat tries again
                    log.warning("Redis: heartbeat failed: %s", e)
        finally:
            client.close()

    async def _reaper(self) -> None:
        while self._running:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                now_s, now_us = await self.redis.time()
                lapsed = await self.redis.zrangebyscore(TURNS, "-inf", now_s * 1000 + now_us // 1000, start=0, num=64)
                for session in lapsed:
                    token = self._mine.get(session)
                    if token is not None:  # ours, and alive: the beat was late (a stalled loop, Redis away)
                        await self._renew(keys=[_key(session, "turn"), TURNS], args=[session, token, int(CLAIM_SECONDS * 1000)])
                        continue
                    record = await self._take_lapsed(keys=[_key(session, "turn"), TURNS], args=[session])
                    if record and self.on_lapsed is not None:
                        fields = dict(zip(record[::2], record[1::2], strict=True))
                        log.warning("replica %s stopped answering session %s…: marking its answer interrupted", fields.get("replica"), session[:8])
                        await self.on_lapsed(session, fields)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("Redis: looking for lapsed answers failed: %s", e)

    # -- commands ---------------------------------------------------------------------------

    async def command(self, session: str, op: str, **args: Any) -> None:
        await self.redis.publish(CONTROL, json.dumps({"session": session, "op": op, **args}))

    async def _listen(self, pubsub: Any) -> None:
        while self._running:
            try:
                async for message in pubsub.listen():
                    if message.get("type") != "message" or self.on_command is None:
                        continue
                    try:
                        command = json.loads(message["data"])
                        await self.on_command(str(command.pop("session")), command)
                    except Exception:  # noqa: BLE001 - one bad command must not stop the listener
                        log.exception("Redis: a command could not be carried out")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect
                log.warning("Redis: the command channel dropped (%s); resubscribing", e)
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await pubsub.subscribe(CONTROL)


class StreamChannel:
    """A session's events on a Redis Stream (see the module's description)."""

    def __init__(self, replicas: Replicas, session: str) -> None:
        self._replicas = replicas
        self._session = session
        self._subscribers = 0
        self.dropped_subscribers = 0

    @property
    def subscribers(self) -> int:
        return self._subscribers

    def publish(self, data: str, *, scope: str | None = None) -> None:
        self._replicas.enqueue(self._session, data, scope)

    async def last_event_id(self) -> str:
        # Waits for this replica's queued events to be written, so that the page does not get
        # them again; past a second (Redis slow or away) it goes on: events written later get
        # later ids, and a tab given one twice shows the same state (fragments are idempotent).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._replicas.flushed(), 1.0)
        return await self._replicas.position(self._session)

    async def subscribe(self, after: str | None, *, view: str | None = None) -> StreamSubscription:
        now = parse_event_id(await self._replicas.position(self._session))
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
        self._replicas = channel._replicas
        self._key = _key(channel._session, "events")
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
            self._replicas.unfollow(self, self._key)
            self._channel.dropped_subscribers += 1
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(Reload("this tab fell behind the live stream"))

    async def start(self, now: int) -> None:
        """Catches up to ``now`` (the stream's position when the tab connected), then follows."""
        if not self._ready and self._seq < now:
            await self._fetch(now)
        self._replicas.follow(self, self._key, f"{self._base}-{now}")

    async def _fetch(self, upto: int) -> bool:
        """Reads the events after the last one taken up to ``upto``; False (and a Reload
        queued) if some of them are gone."""
        entries = await self._replicas.read_range(self._key, f"{self._base}-{self._seq + 1}", f"{self._base}-{upto}")
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
            self._replicas.unfollow(self, self._key)
            self._channel._subscribers -= 1
