"""Per-session broadcast channels for Server-Sent Events.

Every event a session produces is published to its :class:`Channel`, numbered, kept in a bounded
replay buffer and handed to each subscriber (one per open tab) through a bounded queue. Publishing
never waits: a subscriber whose queue is full is dropped and told to reload, so a stalled tab
cannot hold up the generator or the other tabs. A tab that connects late or reconnects names the
last event it has (``Last-Event-ID``, or ``after=`` in the URL for a freshly rendered page) and
first gets everything after it from the buffer, then live events: nothing lost, nothing doubled,
because subscribing and replaying happen in one step on the event loop.

Event ids are ``EPOCH-SEQ``; the epoch changes with every server process, so a page from before a
restart is told to reload instead of silently missing events.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

EPOCH = secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    data: str
    # When it was published (wall clock: it may be delivered by another replica).
    created: float
    # The conversation view the event is for (None: every view of the session, e.g. the
    # sidebar); a tab subscribes for the view it shows, so it gets no fragments aimed at
    # elements it does not have.
    scope: str | None = None

    def visible_in(self, view: str | None) -> bool:
        return self.scope is None or self.scope == view

    def encode(self) -> bytes:
        # An SSE parser ends a line at CR, LF or CRLF: split on all three, so that no text in
        # the data (a bare CR in a user's message) can start a field of its own.
        lines = "".join(f"data: {line}\n" for line in self.data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        return f"id: {self.id}\n{lines}\n".encode()


class Reload:
    """Given to a subscriber that cannot be given a gap-free stream; says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Subscription(Protocol):
    """One tab's view of a session's events: what it missed, then live ones."""

    async def next(self, timeout: float) -> Event | Reload | None:
        """The next event, a :class:`Reload` (after which nothing more comes), or ``None`` when
        ``timeout`` seconds passed without one."""

    def close(self) -> None: ...


class SessionChannel(Protocol):
    """A session's event stream: in this process (:class:`Channel`) or shared by replicas
    (Redis Streams, :mod:`.replicas`). Ids are ``INCARNATION-SEQ``, SEQ counting 1, 2, 3…
    without gaps, so a subscriber sees at once whether it missed anything."""

    dropped_subscribers: int

    def publish(self, data: str, *, scope: str | None = None) -> None:
        """Adds an event. Never waits; events published from one process keep their order."""

    async def last_event_id(self) -> str:
        """The id of the last event, counting every one published from here so far: a page
        rendered after this call reflects every event up to it."""

    async def subscribe(self, after: str | None, *, view: str | None = None) -> Subscription:
        """The events after ``after`` (``None``: live ones only) visible in ``view``."""

    @property
    def subscribers(self) -> int:
        """Tabs of this process following the stream."""


@dataclass(eq=False)
class Subscriber:
    view: str | None
    queue: asyncio.Queue[Event | Reload]
    backlog: deque[Event | Reload] = field(default_factory=deque)
    dropped: bool = False
    channel: Channel | None = None

    async def next(self, timeout: float) -> Event | Reload | None:
        if self.backlog:
            return self.backlog.popleft()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.unsubscribe(self)


# How many events a session's stream keeps for tabs that reconnect, and how many a tab may have
# waiting before it is told to reload: in one process and on Redis alike.
REPLAY_EVENTS = 1024
TAB_QUEUE = 512

MAX_ID = 2**63 - 1
"""The largest id the server accepts anywhere (SQLite's largest integer)."""


def parse_id(text: str) -> int | None:
    """``text`` as an id: ASCII digits only, at most :data:`MAX_ID`; anything else is no id
    (``"²"`` passes ``str.isdigit`` and ``int`` refuses it; 5,000 digits exceed ``int``'s limit)."""
    if not (0 < len(text) <= len(str(MAX_ID)) and text.isascii() and text.isdigit()):
        return None
    n = int(text)
    return n if n <= MAX_ID else None


def parse_event_id(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    epoch, _, seq = text.strip().rpartition("-")
    n = parse_id(seq)
    if not epoch or n is None:
        return None
    return epoch, n


class Channel:
    """One session's stream of events, in this process."""

    def __init__(self, *, replay_events: int = REPLAY_EVENTS, replay_bytes: int = 4 << 20, queue_size: int = TAB_QUEUE) -> None:
        self._buffer: deque[Event] = deque()
        self._buffer_bytes = 0
        self._replay_events = replay_events
        self._replay_bytes = replay_bytes
        self._queue_size = queue_size
        self._seq = 0
        self._subscribers: set[Subscriber] = set()
        self.dropped_subscribers = 0

    async def last_event_id(self) -> str:
        return f"{EPOCH}-{self._seq}"

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, data: str, *, scope: str | None = None) -> None:
        """Numbers, buffers and fans out one event. Never waits; call it on the event loop."""
        self._seq += 1
        event = Event(f"{EPOCH}-{self._seq}", data, time.time(), scope)
        self._buffer.append(event)
        self._buffer_bytes += len(data)
        while len(self._buffer) > 1 and (len(self._buffer) > self._replay_events or self._buffer_bytes > self._replay_bytes):
            self._buffer_bytes -= len(self._buffer.popleft().data)
        for sub in list(self._subscribers):
            if not event.visible_in(sub.view):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(sub, "this tab fell behind the live stream")

    async def subscribe(self, after: str | None, *, view: str | None = None) -> Subscriber:
        return self.subscribe_now(after, view=view)

    def subscribe_now(self, after: str | None, *, view: str | None = None) -> Subscriber:
        """A new subscription for one view whose ``backlog`` holds every buffered event after
        ``after`` (``None``: live events only)."""
        sub = Subscriber(view, asyncio.Queue(self._queue_size), channel=self)
        position = parse_event_id(after)
        if after is not None and position is None:
            sub.backlog.append(Reload("the event id this tab sent is not one of ours"))
            return sub
        if position is not None:
            epoch, seq = position
            oldest = self._seq - len(self._buffer) + 1
            if epoch != EPOCH:
                sub.backlog.append(Reload("the server restarted"))
                return sub
            if seq > self._seq:
                sub.backlog.append(Reload("this tab is ahead of the server"))
                return sub
            if seq < oldest - 1:
                sub.backlog.append(Reload("this tab missed more events than the server keeps"))
                return sub
            skip = len(self._buffer) - (self._seq - seq)
            sub.backlog.extend(e for e in list(self._buffer)[skip:] if e.visible_in(view))
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def _drop(self, sub: Subscriber, reason: str) -> None:
        self._subscribers.discard(sub)
        sub.dropped = True
        self.dropped_subscribers += 1
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(Reload(reason))


class LatencyStats:
    """Seconds from an event's publication to its hand-over to the server's socket writer,
    over the most recent ``size`` events."""

    def __init__(self, size: int = 100_000) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1

    def summary(self) -> dict[str, float | int]:
        s = sorted(self._samples)
        if not s:
            return {"count": 0}

        def q(p: float) -> float:
            return round(s[min(len(s) - 1, int(p * len(s)))] * 1000, 3)

        return {"count": self.count, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "max_ms": round(s[-1] * 1000, 3)}
