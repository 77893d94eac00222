"""What the server holds while it runs: its configuration, the model slot, the generation
service, the browser sessions, the history and the replicas' shared services, the metrics.
Every door reads it as :func:`current` inside a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from quart import current_app

from .auth import Auth
from .config import ChatSettings, ServerConfig
from .generations import Generations, ModelSlot
from .history import HistoryStore
from .hub import LatencyStats
from .metrics import Metrics
from .replicas import Replicas
from .sessions import Sessions

EXTENSION = "smolcandle"


@dataclass(eq=False)
class ServerState:
    config: ServerConfig
    model: ModelSlot
    history: HistoryStore
    generations: Generations
    auth: Auth
    metrics: Metrics
    sessions: Sessions = field(default_factory=Sessions)
    # The Redis that replicas share (None: one server, everything in this process).
    replicas: Replicas | None = None
    latency: LatencyStats = field(default_factory=LatencyStats)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._watch()

    @property
    def settings(self) -> ChatSettings:
        return self.config.settings

    @property
    def draining(self) -> bool:
        return self.generations.draining

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def _watch(self) -> None:
        """The gauges ``/metrics`` reads at each scrape, each where its value lives."""
        g = self.metrics.gauge
        sessions = self.sessions
        g("sessions", "gauge", "Browser sessions this replica holds", lambda: len(sessions))
        g("generating_sessions", "gauge", "Browser answers this replica is writing", sessions.generating)
        g("event_subscribers", "gauge", "Tabs following an event stream on this replica", lambda: sum(s.channel.subscribers for s in sessions.all()))
        g("dropped_subscribers", "counter", "Tabs told to reload because they fell behind", self.dropped_subscribers)
        g("model_ready", "gauge", "1 when a model is loaded and answering", lambda: int(self.model.state == "ready"))
        if self.replicas is not None:
            replicas = self.replicas
            g("redis_pending_events", "gauge", "Events waiting to be written to Redis", lambda: replicas.pending_events)
            g("redis_dropped_events", "counter", "Events Redis refused, or past the queue's bound while it was away", lambda: replicas.dropped_events)

        def engine(read: Any) -> Any:
            return lambda: None if self.model.model is None else read(self.model.model)

        for name, kind, text, read in (
            ("queue_depth", "gauge", "Generations admitted and waiting for a slot", lambda m: m.admission["queued"]),
            ("active_sequences", "gauge", "Generations running in the engine", lambda m: m.admission["active"]),
            ("max_active_sequences", "gauge", "Generations the engine runs at once", lambda m: m.admission["max_active"]),
            ("max_queue_depth", "gauge", "Generations the engine queues before refusing", lambda m: m.admission["max_queued"]),
            ("kv_reserved_bytes", "gauge", "Key/value memory reserved by admitted generations", lambda m: m.admission["kv_reserved_bytes"]),
            ("kv_budget_bytes", "gauge", "Key/value memory admission may reserve", lambda m: m.admission["kv_budget_bytes"]),
            ("admission_refused", "counter", "Generations refused because the engine was full", lambda m: m.admission["refused"]),
            ("kv_cache_bytes", "gauge", "Key/value cache memory in use", lambda m: m.kv_cache_bytes["bytes"]),
            ("kv_cache_peak_bytes", "gauge", "Most key/value cache memory in use at once", lambda m: m.kv_cache_bytes["peak_bytes"]),
            ("prefix_cache_bytes", "gauge", "Memory held by the prefix cache", lambda m: m.prefix_cache_stats["bytes"]),
            ("prefix_cache_entries", "gauge", "Prefixes held by the prefix cache", lambda m: m.prefix_cache_stats["entries"]),
            ("prefix_cache_hits", "counter", "Prompts that reused a cached prefix", lambda m: m.prefix_cache_stats["hits"]),
            ("prefix_cache_misses", "counter", "Prompts that found no cached prefix", lambda m: m.prefix_cache_stats["misses"]),
            ("prefix_cache_reused_tokens", "counter", "Prompt tokens taken from the prefix cache", lambda m: m.prefix_cache_stats["reused_tokens"]),
            ("prefix_cache_segments", "gauge", "Token segments holding the cached prefixes (a shared part once)", lambda m: m.prefix_cache_stats["segments"]),
            ("disk_cache_files", "gauge", "Prefixes kept on disk", lambda m: m.prefix_cache_stats.get("disk_files", 0)),
            ("disk_cache_bytes", "gauge", "Bytes of prefixes kept on disk", lambda m: m.prefix_cache_stats.get("disk_bytes", 0)),
            ("disk_cache_hits", "counter", "Prompts that read a prefix from disk", lambda m: m.prefix_cache_stats.get("disk_hits", 0)),
            ("disk_cache_refused", "counter", "Files on disk refused (another model's, or damaged)", lambda m: m.prefix_cache_stats.get("disk_refused", 0)),
            ("drafted_tokens", "counter", "Draft tokens verified by speculative decoding", lambda m: m.speculation["drafted_tokens"]),
            ("accepted_draft_tokens", "counter", "Draft tokens kept as the tokens chosen", lambda m: m.speculation["accepted_tokens"]),
        ):
            g(name, kind, text, engine(read))

    def dropped_subscribers(self) -> int:
        return sum(s.channel.dropped_subscribers for s in self.sessions.all())


def current() -> ServerState:
    """The state of the app serving the request at hand."""
    return current_app.extensions[EXTENSION]
