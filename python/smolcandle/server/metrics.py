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
        self._gauges: dict[str, tuple[str, str, Callable[[], float | int | None]]] = {}
        r.register(_Gauges(self._gauges))
        self.prompt_tokens = Counter("smolcandle_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_prompt_tokens = Counter("smolcandle_prompt_cached_tokens", "Prompt tokens reused from the prefix cache", registry=r)
        self.generated_tokens = Counter("smolcandle_generated_tokens", "Tokens generated", registry=r)
        self.embedded_inputs = Counter("smolcandle_embedded_inputs", "Inputs embedded", registry=r)
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

    def gauge(self, name: str, kind: str, text: str, read: Callable[[], float | int | None]) -> None:
        """Reports ``smolcandle_NAME`` at each scrape as what ``read()`` returns then (``None``:
        not reported); ``kind`` is ``"gauge"`` or ``"counter"`` (a total kept elsewhere, such
        as the engine's)."""
        assert kind in ("gauge", "counter") and name not in self._gauges, name
        self._gauges[name] = (kind, text, read)

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


class _Gauges(Collector):
    """The values registered with :meth:`Metrics.gauge`, read at each scrape."""

    def __init__(self, gauges: dict[str, tuple[str, str, Callable[[], float | int | None]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, (kind, text, read) in list(self._gauges.items()):
            value = read()
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"smolcandle_{name}", text, value=float(value))
