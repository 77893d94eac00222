"""What a hostile client costs a running server, on loopback: prints the figures.

- a history search of 80 repeated words and of 2,000 words, and the page-load latency
  meanwhile;
- 64 concurrent /v1 streams with a huge ``max_tokens`` for ``--seconds``: the answers' status
  codes, the server's resident memory and the ``/healthz`` latency meanwhile;
- a chat request of 2,000 short turns whose newest message does not fit the context;
- the prefix probe: a victim sends a secret, then a second client guesses it and reads
  ``cached_tokens`` for a right and a wrong guess.

    python benchmarks/hostile.py URL --pid PID [--seconds 20] [--json out.json]
    python benchmarks/hostile.py --seed-history DB   # first, before the server starts

URL is a running ``smolcandle serve`` with SmolLM2-135M, and PID its process (for its memory).
``--seed-history`` fills a history file with 20,000 messages of 60 words drawn from 5,000, so
that a search has an index worth the name to work through.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import time

import httpx

HX = {"HX-Request": "true"}
MODEL = "SmolLM2-135M-Instruct.Q4_1"
TIMEOUT = 120.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    try:
        result = await coro
    except httpx.TimeoutException:
        result = "timeout"
    return time.perf_counter() - t0, result


async def _poll(c: httpx.AsyncClient, path: str, until: asyncio.Event, pid: int | None = None) -> dict:
    latencies, memory = [], []
    while not until.is_set():
        seconds, _ = await _timed(c.get(path, timeout=TIMEOUT))
        latencies.append(seconds)
        if pid is not None:
            memory.append(rss_mib(pid))
        await asyncio.sleep(0.25)
    return {
        "median_s": round(statistics.median(latencies), 4) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "rss_mib": [round(m) for m in memory[:: max(1, len(memory) // 20)]],
        "max_rss_mib": round(max(memory)) if memory else None,
    }


async def searches(url: str) -> dict:
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        await c.get("/")
        for i in range(3):  # a history to search
            await c.post("/send", data={"text": f"Tell me about the sea, number {i}.", "conversation": "new"}, headers=HX)
            for _ in range(600):
                if (await c.get("/status")).json()["generating"] == 0:
                    break
                await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as other:
            for name, q in (("80 repeated words", " ".join(["w"] * 80)), ("2000 words", " ".join(f"w{i}" for i in range(2000)))):
                done = asyncio.Event()
                poller = asyncio.create_task(_poll(other, "/", done))
                seconds, r = await _timed(c.get("/search", params={"q": q}, timeout=60))
                done.set()
                pages = await poller
                out[name] = {"seconds": round(seconds, 3), "status": r if isinstance(r, str) else r.status_code, "page_load": pages}
    return out


async def streams(url: str, pid: int, seconds: float) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write the numbers from 1 to 100000, separated by commas."}], "max_tokens": 1_000_000, "temperature": 0, "stream": True}
    baseline = rss_mib(pid)
    tokens = [0] * 64
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=200)) as c:
        stop = asyncio.Event()

        async def one(i: int) -> int:
            try:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code == 200:
                        async for line in r.aiter_lines():
                            tokens[i] += '"content"' in line
                            if stop.is_set():
                                break
                    return r.status_code
            except httpx.HTTPError:
                return -1

        tasks = [asyncio.create_task(one(i)) for i in range(64)]
        poller = asyncio.create_task(_poll(c, "/healthz", stop, pid))
        await asyncio.sleep(seconds)
        stop.set()
        codes = await asyncio.gather(*tasks)
        health = await poller
    running = [t for t in tokens if t]
    return {
        "status_codes": {str(k): codes.count(k) for k in sorted(set(codes))},
        "rss_baseline_mib": round(baseline),
        "healthz": health,
        "streams_with_tokens": len(running),
        "chunks_per_second_per_running_stream": round(statistics.mean(running) / seconds, 1) if running else 0,
    }


async def long_conversation(url: str) -> dict:
    turns = [m for i in range(2000) for m in ({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"})]
    body = {"model": MODEL, "messages": [*turns, {"role": "user", "content": "sea " * 9000}], "max_tokens": 8}
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        seconds, r = await _timed(c.post("/v1/chat/completions", json=body))
    return {"seconds": round(seconds, 3), "status": r if isinstance(r, str) else r.status_code}


async def prefix_probe(url: str) -> dict:
    secret = "Note to self: the door PIN is 4921. "

    async def cached(text: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
            r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1})
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    await cached(secret + "Remember it.")
    right = await cached(secret.replace("4921", "4921") + "x")
    wrong = await cached(secret.replace("4921", "7777") + "x")
    return {"cached_tokens_right_guess": right, "cached_tokens_wrong_guess": wrong, "leaks": right != wrong}


async def main_async(args: argparse.Namespace) -> dict:
    parts = {
        "search": lambda: searches(args.url),
        "64_streams": lambda: streams(args.url, args.pid, args.seconds),
        "2000_turns": lambda: long_conversation(args.url),
        "prefix_probe": lambda: prefix_probe(args.url),
    }
    return {name: await run() for name, run in parts.items() if not args.only or name in args.only}


def seed_history(path: str) -> None:
    from smolcandle.server.history import SqliteHistory

    async def schema() -> None:
        history = SqliteHistory(path)
        await history.start()
        await history.close()

    asyncio.run(schema())
    rng = random.Random(0)
    vocab = [f"w{rng.randrange(10**6)}" for _ in range(5000)]
    db = sqlite3.connect(path)
    with db:
        cid = db.execute("INSERT INTO conversations (session, title, created, updated) VALUES ('seed', 'seed', 0, 0)").lastrowid
        db.executemany(
            "INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'user', ?, 0)",
            ((cid, " ".join(rng.choices(vocab, k=60))) for _ in range(20000)),
        )
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", nargs="?")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json")
    ap.add_argument("--seed-history", metavar="DB")
    ap.add_argument("--only", nargs="*", help="some of: search 64_streams 2000_turns prefix_probe")
    args = ap.parse_args()
    if args.seed_history:
        seed_history(args.seed_history)
        return
    if not args.url or not args.pid:
        ap.error("URL and --pid are needed")
    figures = asyncio.run(main_async(args))
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
