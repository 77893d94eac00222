"""A soak test: minutes of mixed traffic against one real server on loopback (browser answers and
commands, page loads, searches, /v1 streams read whole or dropped halfway, requests refused at
the limits), with the server's resident memory sampled every half second. Once the traffic
stops, memory must come back to where it stood after warming up, plus the prefix cache's
budget. ``SMOLCANDLE_SOAK_SECONDS`` sets the traffic's length (default 90); the curve is written
to ``soak-memory.json`` in the test's directory and summarised on failure."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import httpx
from server import Server

from models import smollm2_path

MODEL = "SmolLM2-135M-Instruct.Q4_1"
HX = {"HX-Request": "true"}
PREFIX_MIB = 32
# What glibc's arenas and Python's heap may keep of the traffic's peak, beyond the caches.
SLACK = 32 << 20


def test_memory_returns_to_its_baseline_after_minutes_of_mixed_traffic(tmp_path):
    seconds = float(os.environ.get("SMOLCANDLE_SOAK_SECONDS", "90"))
    srv = Server(smollm2_path(), tmp_path, "--max-tokens", "48", "--max-active", "4", "--max-queued", "8", "--prefix-cache-mib", str(PREFIX_MIB))
    curve: list[tuple[float, int]] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    try:
        # Warm up: the first answers allocate what every later one reuses (thread pools, buffers).
        for _ in range(3):
            httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}, timeout=120)
        baseline = srv.rss()
        t0 = time.monotonic()
        stop_at = t0 + seconds

        def count(what: str) -> None:
            with lock:
                outcomes[what] = outcomes.get(what, 0) + 1

        def api_client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                while time.monotonic() < stop_at:
                    body = {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"Tell me about the number {rng.randrange(10**6)}."}],
                        "max_tokens": rng.choice([8, 32, 64]),
                        "prompt_cache_key": rng.choice([None, "a", "b"]),
                    }
                    if rng.random() < 0.5:
                        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                            lines = r.iter_lines()
                            for i, _ in enumerate(lines):
                                if rng.random() < 0.05 and i > 2:
                                    count("dropped")
                                    break  # the client goes away halfway
                            count(f"stream {r.status_code}")
                    else:
                        count(f"whole {c.post('/v1/chat/completions', json=body).status_code}")

        def browser(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                c.get("/")
                conversation = "new"
                while time.monotonic() < stop_at:
                    roll = rng.random()
                    if roll < 0.3:
                        r = c.post("/send", data={"text": rng.choice(["/quote", "/status", "/help"]), "conversation": "new"}, headers=HX)
                    elif roll < 0.6:
                        r = c.post("/send", data={"text": f"Say something about {rng.randrange(1000)}.", "conversation": conversation}, headers=HX)
                        conversation = r.headers.get("HX-Push-Url", f"/c/{conversation}").rsplit("/", 1)[-1]
                    elif roll < 0.8:
                        r = c.get("/search", params={"q": rng.choice(["number", "say something", "sea"])})
                    else:
                        r = c.get("/" if conversation == "new" else f"/c/{conversation}")
                    count(f"browser {r.status_code}")
                    time.sleep(0.2)

        threads = [threading.Thread(target=api_client, args=(i,)) for i in range(6)] + [threading.Thread(target=browser, args=(100 + i,)) for i in range(3)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            curve.append((round(time.monotonic() - t0, 1), srv.rss()))
            time.sleep(0.5)
        for t in threads:
            t.join()
        # The traffic is over: once the last answers end, memory settles.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = srv.get_json("/status")
            if status["generating"] == 0 and status["admission"]["active"] == 0 and status["admission"]["queued"] == 0:
                break
            time.sleep(0.2)
        for _ in range(10):
            curve.append((round(time.monotonic() - t0, 1), srv.rss()))
            time.sleep(0.5)
        status = srv.get_json("/status")
    finally:
        srv.stop()
    (tmp_path / "soak-memory.json").write_text(json.dumps({"baseline": baseline, "curve": curve, "outcomes": outcomes, "status": status}))
    settled = curve[-1][1]
    peak = max(m for _, m in curve)
    summary = f"baseline {baseline >> 20} MiB, peak {peak >> 20} MiB, settled {settled >> 20} MiB; {outcomes}"
    assert sum(v for k, v in outcomes.items() if k.endswith(" 200")) > 50, summary
    assert not any(k.endswith(" 500") for k in outcomes), summary
    assert status["prefix_cache"]["bytes"] <= PREFIX_MIB << 20, status
    assert settled <= baseline + (PREFIX_MIB << 20) + SLACK, summary
