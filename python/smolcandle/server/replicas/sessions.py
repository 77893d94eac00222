"""Session records on Redis (``smolcandle:s:ID``): what the browser chose (thinking, reasoning
budget) and the counter of element ids, so that a session is the same on every replica. A record
lives ``SESSION_SECONDS`` past its last use."""

from __future__ import annotations

from .connection import Link, session_key

SESSION_SECONDS = 365 * 24 * 3600


class SessionRecords:
    def __init__(self, link: Link) -> None:
        self._link = link

    async def load(self, session: str) -> dict[str, str]:
        async with self._link.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(session_key(session))
            pipe.expire(session_key(session), SESSION_SECONDS)
            record, _ = await pipe.execute()
        return record

    async def save(self, session: str, **fields: str) -> None:
        async with self._link.redis.pipeline(transaction=False) as pipe:
            pipe.hset(session_key(session), mapping=fields)
            pipe.expire(session_key(session), SESSION_SECONDS)
            await pipe.execute()

    async def next_number(self, session: str) -> int:
        """A number no other element of the session's pages has (for element ids)."""
        return int(await self._link.redis.hincrby(session_key(session), "dom", 1))
