"""Commands between replicas (Stop, deleting a conversation being answered), published on
``smolcandle:control`` by any replica; the replica writing the answer acts on them
(``on_command``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .connection import Link

log = logging.getLogger("smolcandle.server")

CONTROL = "smolcandle:control"


class Control:
    def __init__(self, link: Link) -> None:
        self._link = link
        self._pubsub: Any = None
        #: Called with (session, command) for each command published by any replica.
        self.on_command: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None

    async def prepare(self) -> None:
        """Subscribes to the commands, once connected."""
        self._pubsub = self._link.redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(CONTROL)

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._listen()]

    async def command(self, session: str, op: str, **args: Any) -> None:
        await self._link.redis.publish(CONTROL, json.dumps({"session": session, "op": op, **args}))

    async def _listen(self) -> None:
        pubsub = self._pubsub
        while self._link.running:
            try:
                async for message in pubsub.listen():
                    if message.get("type") != "message" or self.on_command is None:
                        continue
                    try:
                        command = json.loads(message["data"])
                        await self.on_command(str(command.pop("session")), command)
                    except Exception:  # one bad command must not stop the listener (and is logged)
                        log.exception("Redis: a command could not be carried out")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect
                log.warning("Redis: the command channel dropped (%s); resubscribing", e)
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await pubsub.subscribe(CONTROL)
