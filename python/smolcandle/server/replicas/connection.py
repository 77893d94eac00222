"""What the replicas' subsystems share: the connection to Redis, whether their background loops
go round, the keys of a session, and Redis' clock for their scripts."""

from __future__ import annotations

from typing import Any

# Connections to Redis per replica; requests wait for one past that.
POOL_SIZE = 64

# Lua: ``now``, Redis' clock in milliseconds (so that every replica's deadlines share one clock).
NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"


def session_key(session: str, part: str = "") -> str:
    return f"smolcandle:s:{session}" + (f":{part}" if part else "")


def import_redis() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError("--redis needs the redis package: pip install 'smolcandle[replicas]'") from None
    return aioredis


class Link:
    """This replica's connection to the shared Redis (``redis``, once :meth:`connect` returned),
    and the flag its background loops go round while it holds (``running``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis: Any = None
        self.running = False
        # The errors of a Redis away or restarting, which a later try may get past.
        self.transient: tuple[type[BaseException], ...] = ()

    async def connect(self) -> None:
        aioredis = import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

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
        self.transient = (RedisConnectionError, RedisTimeoutError, OSError)
        try:
            await self.redis.ping()
        except Exception as e:  # noqa: BLE001 - whatever the cause, one clear error at start
            raise RuntimeError(f"cannot reach Redis at {self.url}: {e}") from None
