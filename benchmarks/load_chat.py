"""Load test of the browser chat's event streams, on loopback.

Many sessions at once each do what the page does: load ``/``, open the SSE stream of their view,
post a message through the htmx endpoint, follow the answer to its end. ``--quotes`` sessions
ask for ``/quote`` (streamed without the model), ``--answers`` sessions ask the model. Every
session checks that its events arrive in order, none missing (a quote's "i of N words" counter
goes 1…N; a model answer's last streamed state equals the stored one). Meanwhile ``/healthz`` is
polled to show the event loop keeps answering during generation. Prints a table; ``--json``
writes the figures.

    python benchmarks/load_chat.py URL [--quotes 100] [--answers 8] [--replica URL ...] [--json out.json]

URL is a running ``smolcandle serve`` (with a model, for ``--answers``), or a load balancer in
front of replicas: then name each replica's own address with ``--replica`` so that their
counters (per-event latency, dropped tabs) are read from each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

HX = {"HX-Request": "true"}
ANSWER_PROMPTS = ["Tell me a short story about a cat.", "Explain what a rainbow is.", "Write a poem about the sea.", "Describe a busy city street."]


@dataclass
class SessionResult:
    kind: str
    ok: bool = False
    events: int = 0
    problem: str = ""
    seconds: float = 0.0
    ids: list[int] = field(default_factory=list)


def _after(html: str) -> str:
    m = re.search(r'sse-connect="/events\?view=([^&"]+)&amp;after=([^"]+)"', html)
    if not m:
        raise RuntimeError("no event stream in the page")
    return m.group(2)


async def _events(client: httpx.AsyncClient, view: str, after: str, sink: asyncio.Queue) -> None:
    async with client.stream("GET", "/events", params={"view": view, "after": after}, timeout=None) as r:
        r.raise_for_status()
        event_id, data = None, []
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                await sink.put((event_id, "\n".join(data)))
                event_id, data = None, []


def _seq(event_id: str | None) -> int:
    return int((event_id or "x-0").rsplit("-", 1)[1])


async def _follow(sink: asyncio.Queue, dom_id: str, result: SessionResult, timeout: float) -> str:
    """Consumes events until ``dom_id`` finishes; returns the last body fragment."""
    last_body = ""
    deadline = time.monotonic() + timeout
    while True:
        event_id, data = await asyncio.wait_for(sink.get(), max(0.1, deadline - time.monotonic()))
        seq = _seq(event_id)
        if result.ids and seq <= result.ids[-1]:
            raise AssertionError(f"event {seq} after {result.ids[-1]}: out of order or doubled")
        result.ids.append(seq)
        result.events += 1
        m = re.search(rf'<div id="{dom_id}-body" hx-swap-oob="innerHTML">(.*?)</div><footer', data, re.DOTALL)
        if m:
            last_body = m.group(1)
        if f'id="{dom_id}-foot"' in data and "data-finish=" in data:
            return data if not m else last_body


async def quote_session(base: str, timeout: float) -> SessionResult:
    result = SessionResult("quote")
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        page = (await client.get("/")).text
        sink: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(_events(client, "new", _after(page), sink))
        try:
            r = await client.post("/send", data={"conversation": "new", "text": "/quote"}, headers=HX)
            dom_id = re.findall(r'<article id="(e\d+)"', r.text)[-1]
            counters = []
            while True:
                event_id, data = await asyncio.wait_for(sink.get(), timeout)
                seq = _seq(event_id)
                if result.ids and seq <= result.ids[-1]:
                    raise AssertionError(f"event {seq} after {result.ids[-1]}")
                result.ids.append(seq)
                result.events += 1
                m = re.search(r"(\d+) of (\d+) words", data)
                if m and f'id="{dom_id}-foot"' in data:
                    counters.append((int(m.group(1)), int(m.group(2))))
                if f'id="{dom_id}-foot"' in data and "data-finish=" in data:
                    break
            n = counters[-1][1] if counters else 0
            if [c for c, _ in counters] != list(range(1, n + 1)):
                raise AssertionError(f"word counters {counters} are not 1…{n}")
            result.ok = True
        except Exception as e:  # noqa: BLE001 - reported per session
            result.problem = f"{type(e).__name__}: {e}"
        finally:
            reader.cancel()
    result.seconds = time.perf_counter() - t0
    return result


async def answer_session(base: str, prompt: str, timeout: float) -> SessionResult:
    result = SessionResult("answer")
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await client.get("/")
        r = await client.post("/send", data={"conversation": "new", "text": prompt}, headers=HX)
        reader = None
        try:
            url = r.headers["HX-Push-Url"]  # the new conversation; the page swaps in its view
            conv = url.rsplit("/", 1)[1]
            dom_id = re.findall(r'<article id="(m\d+)" class="msg assistant"', r.text)[-1]
            sink: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(_events(client, conv, _after(r.text), sink))
            streamed = await _follow(sink, dom_id, result, timeout)
            stored_page = (await client.get(url)).text
            m = re.search(rf'<div id="{dom_id}-body" class="body markdown">(.*?)</div>\n<footer', stored_page, re.DOTALL)
            if m is None or m.group(1) != streamed:
                raise AssertionError("the streamed answer differs from the stored one")
            result.ok = True
        except Exception as e:  # noqa: BLE001
            result.problem = f"{type(e).__name__}: {e}"
        finally:
            if reader is not None:
                reader.cancel()
    result.seconds = time.perf_counter() - t0
    return result


def poll_health(base: str, stop: threading.Event, samples: list[float]) -> None:
    """Times ``/healthz`` every 50 ms, on a thread of its own so that the load generator's busy
    event loop does not delay the measurement."""
    with httpx.Client(base_url=base, timeout=30) as client:
        while not stop.is_set():
            t = time.perf_counter()
            client.get("/healthz").raise_for_status()
            samples.append(time.perf_counter() - t)
            stop.wait(0.05)


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


async def _statuses(urls: list[str]) -> list[dict]:
    async with httpx.AsyncClient() as c:
        return [(await c.get(u + "/status")).json() for u in urls]


async def run(base: str, quotes: int = 100, answers: int = 8, timeout: float = 300, replicas: list[str] | None = None) -> dict:
    servers = replicas or [base]
    before = await _statuses(servers)
    stop, health = threading.Event(), []
    poller = threading.Thread(target=poll_health, args=(base, stop, health))
    poller.start()
    t0 = time.perf_counter()
    tasks = [quote_session(base, timeout) for _ in range(quotes)]
    tasks += [answer_session(base, ANSWER_PROMPTS[i % len(ANSWER_PROMPTS)], timeout) for i in range(answers)]
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    after = await _statuses(servers)
    failed = [r for r in results if not r.ok]
    per_server = [
        {"server": u, "events": a["event_latency"].get("count", 0) - b["event_latency"].get("count", 0), **a["event_latency"]}
        for u, b, a in zip(servers, before, after, strict=True)
    ]
    return {
        "quote_sessions": quotes,
        "answer_sessions": answers,
        "completed": sum(r.ok for r in results),
        "failed": [f"{r.kind}: {r.problem}" for r in failed],
        "events_received": sum(r.events for r in results),
        "wall_seconds": round(wall, 2),
        "answer_seconds_median": round(statistics.median([r.seconds for r in results if r.kind == "answer"] or [0]), 2),
        # one server's, or the busiest replica's (each replica's below)
        "server_event_latency": _worst(per_server),
        "replica_event_latency": per_server,
        "healthz_ms": {
            "count": len(health),
            "p50": round(_pct(health, 0.5) * 1000, 2),
            "p99": round(_pct(health, 0.99) * 1000, 2),
            "max": round(max(health) * 1000, 2) if health else None,
        },
        "dropped_subscribers": sum(a.get("dropped_subscribers", 0) for a in after),
    }


def _worst(per_server: list[dict]) -> dict:
    """The latency figures of the server with the highest p99."""
    worst = max(per_server, key=lambda x: x.get("p99_ms", 0))
    return {k: v for k, v in worst.items() if k not in ("server", "events")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--quotes", type=int, default=100)
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--replica", action="append", help="a replica's own address (repeat for each) when URL is a load balancer")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    figures = asyncio.run(run(args.url.rstrip("/"), args.quotes, args.answers, replicas=[u.rstrip("/") for u in args.replica or []] or None))
    lat, hz = figures["server_event_latency"], figures["healthz_ms"]
    print("| sessions | completed | events | wall s | event latency p50 / p99 / max ms | /healthz p50 / p99 / max ms |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.quotes} /quote + {args.answers} model | {figures['completed']} | {figures['events_received']} | {figures['wall_seconds']} |"
        f" {lat.get('p50_ms')} / {lat.get('p99_ms')} / {lat.get('max_ms')} | {hz['p50']} / {hz['p99']} / {hz['max']} |"
    )
    for problem in figures["failed"]:
        print("FAILED", problem, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if not figures["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
