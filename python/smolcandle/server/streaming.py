"""From the engine to the browser and the API: one bridge from an engine stream (a blocking
iterator) to the event loop, and one Server-Sent Events response."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

from quart import Response

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Relay(Generic[T]):
    """A generation read on a worker thread and handed to the event loop item by item.

    :meth:`start` starts the stream on a worker thread (its errors are raised there, before
    anything is sent; ``start`` is given an event that is set if the caller goes away first, so
    that long preparation can stop); a second thread reads it, passes each item through ``prepare`` (work
    that should not hold the loop, such as rendering; ``None`` skips the item) and queues what
    comes out for the loop. The engine never waits on us: its stream buffers what we have not
    read yet. Iterating a relay yields the prepared items and raises the stream's error;
    ``finished`` says whether it ran to its end, and :meth:`cancel` stops the generation.
    ``observe``, if given, is called on the reading thread once the stream ends, with the stream
    and the seconds from the call to its first item (``None`` if none came): for the metrics.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.finished = False
        #: Seconds from the call to the stream's first item, once it came.
        self.first_output_seconds: float | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    @classmethod
    async def start(
        cls,
        start: Callable[[threading.Event], Iterable[Any]],
        prepare: Callable[[Any], T | None] | None = None,
        *,
        observe: Callable[[Any, float | None], None] | None = None,
    ) -> Relay[T]:
        t0 = time.perf_counter()
        abandoned = threading.Event()
        starting = asyncio.ensure_future(asyncio.to_thread(start, abandoned))
        try:
            stream = await asyncio.shield(starting)
        except asyncio.CancelledError:
            abandoned.set()
            # A stream that starts after its caller left is stopped at once.
            starting.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().cancel())
            raise
        relay: Relay[T] = cls(stream)
        loop = asyncio.get_running_loop()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(relay._queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: the server stopped
                stream.cancel()

        def pump() -> None:
            first: float | None = None
            try:
                for item in stream:
                    if first is None:
                        first = relay.first_output_seconds = time.perf_counter() - t0
                    out = item if prepare is None else prepare(item)
                    if out is not None:
                        put(out)
            except BaseException as e:  # noqa: BLE001 - re-raised on the loop
                put(_Failed(e))
            finally:
                if observe is not None:
                    observe(stream, first)
                put(_END)

        threading.Thread(target=pump, name="smolcandle-relay", daemon=True).start()
        return relay

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            item = await self._queue.get()
            if item is _END:
                self.finished = True
                return
            if isinstance(item, _Failed):
                self.finished = True
                raise item.exc
            yield item

    def cancel(self) -> None:
        self.stream.cancel()


def sse_response(body: AsyncIterator[bytes]) -> Response:
    """A ``text/event-stream`` response of ``body``'s events, never buffered by a proxy and
    never timed out."""
    response = Response(body, 200, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response
