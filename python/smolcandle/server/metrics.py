"""``/metrics`` in Prometheus' text format (the ``prometheus_client`` library), for the
operators and routers of one server or of many replicas.

Gauges are read from the engine and the server when scraped (never stale): the queue, the
sequences running, the key/value memory, the sessions and event streams. Counters and
histograms are fed as generations end: prompt and generated tokens, time to first token,
the time per output token, and the event delivery latency of the browser chat. Each app has a
registry of its own (several apps can live in one process, as in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_EVENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("smolcandle_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_prompt_tokens = Counter("smolcandle_prompt_cached_tokens", "Prompt tokens reused from the prefix cache", registry=r)
        self.generated_tokens = Counter("smolcandle_generated_tokens", "Tokens generated", registry=r)
        self.generations = Counter("smolcandle_generations", "Generations ended, by how they ended", ["finish_reason"], registry=r)
        self.time_to_first_token = Histogram(
            "smolcandle_time_to_first_token_seconds", "From a generation's request to its first output (queueing included)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "smolcandle_time_per_output_token_seconds", "Decode time per generated token, one observation per generation", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.event_latency = Histogram(
            "smolcandle_event_delivery_seconds", "From an event's publication to its hand-over to a tab's connection", buckets=_EVENT_BUCKETS, registry=r
        )

    def watch(self, read: Callable[[], dict[str, Any]]) -> None:
        """Registers the gauges ``read`` reports at each scrape (see :func:`_ServerCollector`)."""
        self.registry.register(_ServerCollector(read))

    def observe_generation(self, stream: Any, first_output_seconds: float | None) -> None:
        """Counts a generation that ended; called on any thread."""
        usage = getattr(stream, "usage", None)
        self.generations.labels(getattr(stream, "finish_reason", None) or "unknown").inc()
        if first_output_seconds is not None:
            self.time_to_first_token.observe(first_output_seconds)
        if usage is None:
            return
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_prompt_tokens.inc(usage.cached_tokens)
        self.generated_tokens.inc(usage.completion_tokens)
        if usage.completion_tokens > 1 and usage.decode_seconds > 0:
            self.time_per_output_token.observe(usage.decode_seconds / (usage.completion_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# name -> (kind, help); the values come from the server's read() at each scrape.
_GAUGES: dict[str, tuple[str, str]] = {
    "queue_depth": ("gauge", "Generations admitted and waiting for a slot"),
    "active_sequences": ("gauge", "Generations running in the engine"),
    "max_active_sequences": ("gauge", "Generations the engine runs at once"),
    "max_queue_depth": ("gauge", "Generations the engine queues before refusing"),
    "kv_cache_bytes": ("gauge", "Key/value cache memory in use"),
    "kv_cache_peak_bytes": ("gauge", "Most key/value cache memory in use at once"),
    "kv_reserved_bytes": ("gauge", "Key/value memory reserved by admitted generations"),
    "kv_budget_bytes": ("gauge", "Key/value memory admission may reserve"),
    "prefix_cache_bytes": ("gauge", "Memory held by the prefix cache"),
    "prefix_cache_entries": ("gauge", "Prefixes held by the prefix cache"),
    "prefix_cache_hits": ("counter", "Prompts that reused a cached prefix"),
    "prefix_cache_misses": ("counter", "Prompts that found no cached prefix"),
    "prefix_cache_reused_tokens": ("counter", "Prompt tokens taken from the prefix cache"),
    "drafted_tokens": ("counter", "Draft tokens verified by speculative decoding"),
    "accepted_draft_tokens": ("counter", "Draft tokens kept as the tokens chosen"),
    "admission_refused": ("counter", "Generations refused because the engine was full"),
    "sessions": ("gauge", "Browser sessions this replica holds"),
    "generating_sessions": ("gauge", "Browser answers this replica is writing"),
    "api_generating": ("gauge", "/v1 generations under way"),
    "event_subscribers": ("gauge", "Tabs following an event stream on this replica"),
    "dropped_subscribers": ("counter", "Tabs told to reload because they fell behind"),
    "draining": ("gauge", "1 while the server stops gracefully and refuses new work"),
    "model_ready": ("gauge", "1 when a model is loaded and answering"),
    "redis_pending_events": ("gauge", "Events waiting to be written to Redis"),
    "redis_dropped_events": ("counter", "Events Redis refused, or past the queue's bound while it was away"),
}


class _ServerCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        for name, (kind, text) in _GAUGES.items():
            value = values.get(name)
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"smolcandle_{name}", text, value=float(value))
