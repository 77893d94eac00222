"""Answers in progress, claimed by the replica writing them, and taken over when it dies.

A claim (``smolcandle:s:ID:turn``, at most one per session) names its replica and what it is
writing; the replica renews the claim's deadline in ``smolcandle:turns`` every
``HEARTBEAT_SECONDS``, from a thread of its own: a busy event loop (seconds behind under load)
must not pass for a dead replica. The thread stops renewing if the loop has not turned for
``LOOP_STALL_SECONDS``. When a replica dies its claims lapse; the first replica to see one lapse
takes it and marks the answer interrupted, in the history and in every tab (``on_lapsed``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .connection import NOW_MS, Link, session_key

log = logging.getLogger("smolcandle.server")

HEARTBEAT_SECONDS = 1.0
# A claim not renewed for this long is taken as its replica's death.
CLAIM_SECONDS = 3.0
# A replica whose event loop has not turned for this long is taken as hung: its claims lapse.
LOOP_STALL_SECONDS = 30.0
TURNS = "smolcandle:turns"

# KEYS: turn, turns. ARGV: session, replica, token, claim_ms, then field/value pairs.
_CLAIM = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
{NOW_MS}
redis.call('HSET', KEYS[1], 'replica', ARGV[2], 'token', ARGV[3], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
return 1
"""

# KEYS: turn, turns. ARGV: session, token, claim_ms, then field/value pairs (may be none).
_RENEW = f"""
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 0 end
{NOW_MS}
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
{NOW_MS}
if tonumber(deadline) > now then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
local record = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return record
"""


class Claims:
    """This replica's claims on answer slots: taking and releasing them, the heartbeat that
    renews them, and the reaper that takes over other replicas' lapsed ones."""

    def __init__(self, link: Link, replica: str) -> None:
        self._link = link
        self._replica = replica
        self._mine: dict[str, str] = {}  # session -> claim token, for the claims this replica holds
        self._beating = threading.Event()  # cleared to stop the heartbeat thread
        self._beat_thread: threading.Thread | None = None
        self._loop_turned = time.monotonic()
        #: Called with (session, claim record) for each lapsed claim this replica took.
        self.on_lapsed: Callable[[str, dict[str, str]], Awaitable[None]] | None = None

    def prepare(self) -> None:
        """Registers the scripts, once connected."""
        redis = self._link.redis
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._take_lapsed = redis.register_script(_TAKE_LAPSED)

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._tick(), self._reaper()]

    def start_heartbeat(self) -> None:
        self._beating.set()
        self._beat_thread = threading.Thread(target=self._heartbeat, name="smolcandle-heartbeat", daemon=True)
        self._beat_thread.start()

    async def stop_heartbeat(self) -> None:
        self._beating.clear()
        if self._beat_thread is not None:
            await asyncio.to_thread(self._beat_thread.join, 5.0)

    async def claim(self, session: str, **fields: str) -> str | None:
        """Claims the session's answer slot for this replica: a token, or ``None`` when another
        answer is being written (on any replica)."""
        token = secrets.token_hex(8)
        pairs = [x for kv in fields.items() for x in kv]
        keys = [session_key(session, "turn"), TURNS]
        if not await self._claim(keys=keys, args=[session, self._replica, token, int(CLAIM_SECONDS * 1000), *pairs]):
            return None
        self._mine[session] = token
        return token

    async def describe(self, session: str, token: str, **fields: str) -> None:
        """Adds what the claimed answer is (its element ids, its message) to the claim."""
        pairs = [x for kv in fields.items() for x in kv]
        await self._renew(keys=[session_key(session, "turn"), TURNS], args=[session, token, int(CLAIM_SECONDS * 1000), *pairs])

    async def release(self, session: str, token: str) -> None:
        if self._mine.get(session) == token:
            del self._mine[session]
        await self._release(keys=[session_key(session, "turn"), TURNS], args=[session, token])

    async def _tick(self) -> None:
        """Marks that the event loop turns, for the heartbeat thread."""
        while self._link.running:
            self._loop_turned = time.monotonic()
            await asyncio.sleep(HEARTBEAT_SECONDS / 2)

    def _heartbeat(self) -> None:
        """On its own thread, with a client of its own: renews this replica's claims."""
        import redis

        client = redis.Redis.from_url(self._link.url, decode_responses=True, socket_timeout=HEARTBEAT_SECONDS * 2)
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
                            renew(keys=[session_key(session, "turn"), TURNS], args=[session, token, int(CLAIM_SECONDS * 1000)], client=pipe)
                        pipe.execute(raise_on_error=False)
                except Exception as e:  # noqa: BLE001 - the next beat tries again
                    log.warning("Redis: heartbeat failed: %s", e)
        finally:
            client.close()

    async def _reaper(self) -> None:
        while self._link.running:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                now_s, now_us = await self._link.redis.time()
                lapsed = await self._link.redis.zrangebyscore(TURNS, "-inf", now_s * 1000 + now_us // 1000, start=0, num=64)
                for session in lapsed:
                    token = self._mine.get(session)
                    if token is not None:  # ours, and alive: the beat was late (a stalled loop, Redis away)
                        await self._renew(keys=[session_key(session, "turn"), TURNS], args=[session, token, int(CLAIM_SECONDS * 1000)])
                        continue
                    record = await self._take_lapsed(keys=[session_key(session, "turn"), TURNS], args=[session])
                    if record and self.on_lapsed is not None:
                        fields = dict(zip(record[::2], record[1::2], strict=True))
                        log.warning("replica %s stopped answering session %s…: marking its answer interrupted", fields.get("replica"), session[:8])
                        await self.on_lapsed(session, fields)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("Redis: looking for lapsed answers failed: %s", e)
