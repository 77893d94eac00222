"""The chat server without a browser: broadcast channels, markdown sanitizing, sessions,
history across restarts, serving without a model, and a load test on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import sys
import time
from html.parser import HTMLParser

import httpx
import pytest
from server import Server
from smolcandle.server import hub
from smolcandle.server.render import ALLOWED_TAGS, markdown

from models import ROOT, smollm2_path

sys.path.insert(0, str(ROOT / "benchmarks"))
HX = {"HX-Request": "true"}

# -- broadcast channels ------------------------------------------------------------------------


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["process", "redis"])
def channels(request):
    """Makes session channels: in this process, or on Redis Streams (a real redis-server) as
    replicas share them. The same tests hold for both."""
    if request.param == "process":

        @contextlib.asynccontextmanager
        async def local(**limits):
            yield lambda: hub.Channel(**{k: v for k, v in limits.items() if k in ("replay_events", "queue_size")})

        return local
    url = request.getfixturevalue("redis_url")

    @contextlib.asynccontextmanager
    async def shared(**limits):
        from smolcandle.server import replicas as replicas_module

        old = replicas_module.STREAM_EVENTS
        replicas_module.STREAM_EVENTS = limits.get("replay_events", old)
        r = replicas_module.Replicas(url)
        await r.start()
        try:
            yield lambda: r.channel(secrets.token_urlsafe(8))
        finally:
            replicas_module.STREAM_EVENTS = old
            await r.close()

    return shared


async def _drain(sub, n: int) -> list:
    return [await sub.next(2.0) for _ in range(n)]


def test_replay_resumes_after_the_last_event_seen(channels):
    async def go():
        async with channels() as new:
            ch = new()
            for i in range(2):
                ch.publish(f"e{i}")
            mark = await ch.last_event_id()
            for i in range(2, 5):
                ch.publish(f"e{i}")
            sub = await ch.subscribe(mark)
            assert [e.data for e in await _drain(sub, 3)] == ["e2", "e3", "e4"]
            live = await ch.subscribe(None)  # no position: live events only
            ch.publish("e5")
            assert (await sub.next(2.0)).data == "e5" and (await live.next(2.0)).data == "e5"
            assert ch.subscribers == 2
            # ids count without gaps, so a tab resuming anywhere sees what it missed
            again = await ch.subscribe(mark)
            assert [int(e.id.rsplit("-", 1)[1]) for e in await _drain(again, 4)] == [3, 4, 5, 6]
            sub.close()
            again.close()
            assert ch.subscribers == 1

    _run(go())


def test_resume_that_cannot_be_gap_free_asks_for_a_reload(channels):
    async def go():
        async with channels(replay_events=3) as new:
            ch = new()
            ids = []
            for i in range(10):
                ch.publish(f"e{i}")
                ids.append(await ch.last_event_id())
            assert isinstance(await (await ch.subscribe(ids[2])).next(2.0), hub.Reload)  # evicted from the buffer
            assert [e.data for e in await _drain(await ch.subscribe(ids[6]), 3)] == ["e7", "e8", "e9"]
            assert isinstance(await (await ch.subscribe("0000-3")).next(2.0), hub.Reload)  # another server process
            incarnation = ids[0].rsplit("-", 1)[0]
            assert isinstance(await (await ch.subscribe(f"{incarnation}-99")).next(2.0), hub.Reload)  # ahead
            assert isinstance(await (await ch.subscribe("garbage")).next(2.0), hub.Reload)

    _run(go())


def test_a_stalled_subscriber_is_dropped_without_holding_up_others():
    async def go():
        ch = hub.Channel(queue_size=4)
        slow, fast = ch.subscribe_now(None), ch.subscribe_now(None)
        got = []
        for i in range(20):
            ch.publish(f"e{i}")  # never waits
            got.append(fast.queue.get_nowait().data)
        assert got == [f"e{i}" for i in range(20)]
        assert slow.dropped and ch.dropped_subscribers == 1 and ch.subscribers == 1
        item = slow.queue.get_nowait()
        assert isinstance(item, hub.Reload) and slow.queue.empty()

    _run(go())


async def _two_views(ch) -> str:
    """Two tabs of a session on different views: each gets its own fragments and the shared
    ones. Returns the position they started from."""
    start = await ch.last_event_id()
    one, two = await ch.subscribe(start, view="1"), await ch.subscribe(start, view="2")
    ch.publish("for 1", scope="1")
    ch.publish("sidebar")
    assert [e.data for e in await _drain(one, 2)] == ["for 1", "sidebar"]
    assert (await two.next(2.0)).data == "sidebar" and await two.next(0.2) is None
    return start


def test_views_only_get_their_own_fragments(channels):
    async def go():
        async with channels() as new:
            ch = new()
            start = await _two_views(ch)
            late = await ch.subscribe(start, view="2")
            assert (await late.next(2.0)).data == "sidebar"

    _run(go())


def test_events_published_while_redis_is_away_are_written_when_it_is_back(redis_restartable):
    """Publishing never waits: events queue while Redis is down and are written, in order, when it
    is back; a tab following the stream meanwhile gets them all, once."""
    from smolcandle.server.replicas import Replicas

    async def go():
        import redis.asyncio as aioredis

        url = f"redis://{redis_restartable.host}:{redis_restartable.port}/0"
        admin = aioredis.Redis.from_url(url)
        await admin.config_set("timeout", 0)
        await admin.aclose()
        replicas = Replicas(url)
        await replicas.start()
        try:
            ch = replicas.channel("s" * 43)
            ch.publish("before")
            tab = await ch.subscribe(await ch.last_event_id())
            redis_restartable.stop()
            for i in range(3):
                ch.publish(f"while away {i}")  # never waits
            await asyncio.sleep(0.5)
            assert replicas.pending_events == 3
            redis_restartable.start()  # it saved its data on the way down, and loads it
            await asyncio.wait_for(replicas.flushed(), 20)
            assert replicas.pending_events == 0 and replicas.dropped_events == 0
            # the tab that followed the stream throughout gets them in order, after "before"
            assert [e.data for e in await _drain(tab, 3)] == ["while away 0", "while away 1", "while away 2"]
            ch.publish("after")
            assert (await tab.next(10)).data == "after"
        finally:
            await replicas.close()

    _run(go())


def test_a_replica_always_closes(redis_url):
    """Closing ends the replica's background tasks within a bound, round after round: a
    cancellation consumed inside a Redis call must not leave a task going round for ever."""
    from smolcandle.server.replicas import Replicas

    async def go():
        replicas = Replicas(redis_url)
        await replicas.start()
        await _two_views(replicas.channel(secrets.token_urlsafe(8)))
        await asyncio.wait_for(replicas.close(), 10)
        assert all(task.done() for task in replicas._tasks)

    for _ in range(10):
        _run(go())


def test_event_encoding_keeps_multiline_html_in_one_event():
    e = hub.Event("abc-1", "<p>a</p>\n<p>b</p>", 0.0)
    assert e.encode() == b"id: abc-1\ndata: <p>a</p>\ndata: <p>b</p>\n\n"


# -- markdown ----------------------------------------------------------------------------------

ATTACKS = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "![x](javascript:alert(1))",
    "<a href='javascript:alert(1)'>x</a>",
    '<iframe src="https://example.com"></iframe>',
    "<svg onload=alert(1)>",
    "```html\n<script>alert(1)</script>\n```",
    "<details open ontoggle=alert(1)>",
    '<div style="background:url(javascript:alert(1))">x</div>',
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.parametrize("text", ATTACKS)
def test_markdown_output_carries_no_active_content(text):
    parser = _Tags()
    parser.feed(str(markdown(text)))
    for tag, attrs in parser.tags:
        assert tag in ALLOWED_TAGS, tag
        assert not any(name.startswith("on") or name == "style" for name in attrs), attrs
        href = (attrs.get("href") or "").strip().lower()
        assert not href or href.startswith(("http://", "https://", "mailto:")), href


def test_markdown_renders_the_usual_things():
    html = str(markdown("# Title\n\n- a\n- b\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n```python\ndef f():\n    return 1\n```\n\n~~old~~ **new** [link](https://example.com)"))
    for tag in ("<h1>", "<li>a</li>", "<table>", "<td>1</td>", '<code class="language-python">', "<s>old</s>", "<strong>new</strong>"):
        assert tag in html, html
    assert '<span class="tok-k">def</span>' in html  # highlighted by Pygments
    assert 'href="https://example.com"' in html and 'rel="noopener noreferrer nofollow"' in html


# -- the running server ------------------------------------------------------------------------


def _new_session(url: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=url, timeout=30)
    page = client.get("/").text
    after = re.search(r"after=([0-9a-f]+-\d+)", page).group(1)
    return client, after


def _read_events(client: httpx.Client, view: str, after: str, until: str, limit: float = 60) -> list[str]:
    events, deadline = [], time.monotonic() + limit
    with client.stream("GET", "/events", params={"view": view, "after": after}, timeout=limit) as r:
        data: list[str] = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                events.append("\n".join(data))
                data = []
                if until in events[-1] or time.monotonic() > deadline:
                    break
    return events


def test_sessions_cannot_see_each_other(chat_server):
    alice, alice_after = _new_session(chat_server.url)
    bob, bob_after = _new_session(chat_server.url)
    assert alice.cookies["smolcandle_session"] != bob.cookies["smolcandle_session"]
    r = bob.post("/send", data={"conversation": "new", "text": "Say hello."}, headers=HX)
    conv = r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    events = _read_events(bob, conv, bob_after, "data-finish")
    assert any("data-finish" in e for e in events)
    # Alice's stream, subscribed from the same point, never carries Bob's answer ...
    alice_events = []
    with alice.stream("GET", "/events", params={"view": conv, "after": alice_after}, timeout=3) as resp:
        try:
            alice_events.extend(resp.iter_lines())
        except httpx.ReadTimeout:
            pass
    assert not any("data-finish" in line or "Say hello" in line for line in alice_events), alice_events
    # ... and his conversation is not hers to open, rename, delete or find.
    assert alice.get(f"/c/{conv}").status_code == 404
    assert alice.post(f"/c/{conv}/rename", data={"title": "x"}, headers=HX).status_code == 404
    assert alice.post(f"/c/{conv}/delete", headers=HX).status_code == 404
    assert "Say hello" not in alice.get("/search", params={"q": "hello"}).text
    assert "Say hello" in bob.get("/search", params={"q": "hello"}).text


def test_a_carriage_return_cannot_start_an_sse_field():
    """An SSE parser ends a line at CR as at LF: a bare CR in text must not let the text after
    it be read as a field of its own (an id, an event name, a retry)."""
    event = hub.Event(7, "before\rid: 999\r\nevent: evil\nafter", 0.0)
    lines = re.split(r"\r\n|\r|\n", event.encode().decode())
    assert [line for line in lines if line and not line.startswith("data: ")] == [f"id: {event.id}"]
    assert lines.count("data: id: 999") == 1


def test_malformed_ids_are_400_or_404_never_500(chat_server):
    client, _ = _new_session(chat_server.url)
    for bad in ("²", "1" * 25, "-1", "1e3", " 7", "٣"):
        r = client.post("/send", data={"conversation": bad, "text": "hi"}, headers=HX)
        assert r.status_code == 400, (bad, r.status_code)
    for path in ("/c/" + "9" * 25, "/c/²", "/c/-1"):
        assert client.get(path).status_code == 404, path
    assert client.post("/c/" + "9" * 25 + "/delete", headers=HX).status_code == 404
    for last in ("1" * 5000, "x-" + "9" * 5000, "²", "-"):
        with client.stream("GET", "/events", headers={"Last-Event-ID": last.encode()}, timeout=3) as resp:
            assert resp.status_code == 200, last
            assert next(resp.iter_lines()).startswith("retry:"), last
    nested = "[" * 100_000 + "]" * 100_000
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=nested, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text[:200]


def test_security_headers_and_the_host_check(chat_server):
    r = httpx.get(chat_server.url + "/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(chat_server.url + "/v1/models").headers["x-content-type-options"] == "nosniff"
    # A server on loopback answers loopback names only: a page whose name was rebound to
    # 127.0.0.1 sends its own name as the Host.
    port = chat_server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
        assert httpx.get(chat_server.url + "/healthz", headers={"Host": host}).status_code == 403, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(chat_server.url + "/healthz", headers={"Host": host}).status_code == 200, host


def test_state_changes_need_the_htmx_header(chat_server):
    client, _ = _new_session(chat_server.url)
    r = client.post("/send", data={"conversation": "new", "text": "hi"})
    assert r.status_code == 400 and "chat page" in r.text


def test_healthz_answers_while_the_model_generates(chat_server):
    client, _ = _new_session(chat_server.url)
    client.post("/send", data={"conversation": "new", "text": "Write a long story about a dragon who learns to fly."}, headers=HX)
    answered_during = 0
    for _ in range(20):
        assert client.get("/healthz").json()["status"] == "ok"
        answered_during += chat_server.get_json("/status")["generating"] == 1
        time.sleep(0.05)
    assert answered_during >= 10  # the health check was served while the answer was being written
    client.post("/stop", headers=HX)


def test_one_answer_at_a_time_per_session(chat_server):
    client, _ = _new_session(chat_server.url)
    r = client.post("/send", data={"conversation": "new", "text": "Write a long story about a dragon who learns to fly."}, headers=HX)
    url = r.headers["HX-Push-Url"]
    busy = client.post("/send", data={"conversation": url.rsplit("/", 1)[1], "text": "And another one?"}, headers=HX)
    assert busy.status_code == 204 and busy.headers["HX-Reswap"] == "none"
    client.post("/stop", headers=HX)
    deadline = time.monotonic() + 30
    while chat_server.get_json("/status")["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    page = client.get(url).text
    assert "And another one?" not in page and 'data-finish="cancelled"' in page


def test_history_survives_a_restart_and_is_fed_to_the_model(tmp_path):
    def serve() -> Server:
        # as tests/test_chat.py's recall test: greedy, the template's own system message
        return Server(smollm2_path(), tmp_path, "--temperature", "0", "--max-tokens", "48")

    def wait_idle(srv: Server) -> None:
        deadline = time.monotonic() + 60
        while srv.get_json("/status")["generating"] and time.monotonic() < deadline:
            time.sleep(0.1)

    srv = serve()
    try:
        client, _ = _new_session(srv.url)
        r = client.post("/send", data={"conversation": "new", "text": "Hi! I'm Marco and I live in Rome."}, headers=HX)
        url = r.headers["HX-Push-Url"]
        wait_idle(srv)
        cookie = client.cookies["smolcandle_session"]
    finally:
        srv.stop()
    srv = serve()  # a new process, the same database
    try:
        client = httpx.Client(base_url=srv.url, cookies={"smolcandle_session": cookie}, timeout=30)
        page = client.get(url).text
        assert "I live in Rome" in page and 'data-finish="' in page
        assert "Hi! I&#39;m Marco" in client.get("/").text  # listed in the sidebar
        client.post("/send", data={"conversation": url.rsplit("/", 1)[1], "text": "Where do I live?"}, headers=HX)
        wait_idle(srv)
        answers = re.findall(r'class="body markdown">(.*?)</div>', client.get(url).text, re.DOTALL)
        assert len(answers) == 2 and ("Rome" in answers[1] or "Roma" in answers[1]), answers
    finally:
        srv.stop()


def test_serves_without_a_model_and_says_why(tmp_path):
    for model, state in ((None, "none"), (tmp_path / "broken.gguf", "failed")):
        if model is not None:
            model.write_bytes(b"GGUF" + b"\0" * 60)
        srv = Server(model, tmp_path)
        try:
            health = srv.get_json("/healthz")
            assert health["status"] == "degraded" and health["model"]["state"] == state and health["model"]["error"]
            client, _ = _new_session(srv.url)
            assert "no model:" in client.get("/").text
            r = client.post("/send", data={"conversation": "new", "text": "Hello?"}, headers=HX)
            assert r.status_code == 200 and 'class="msg system"' in r.text
            assert "/help" in client.post("/send", data={"conversation": "new", "text": "/help"}, headers=HX).text
        finally:
            srv.stop()


@pytest.mark.slow
def test_load_100_quote_sessions_and_8_model_answers(tmp_path):
    import load_chat

    srv = Server(smollm2_path(), tmp_path, "--temperature", "0", "--max-tokens", "96", "--system", "You are a helpful assistant.")
    try:
        figures = asyncio.run(load_chat.run(srv.url, quotes=100, answers=8))
    finally:
        srv.stop()
    out = ROOT / "artifacts" / "load_chat.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    assert figures["failed"] == [] and figures["completed"] == 108
    assert figures["dropped_subscribers"] == 0
    assert figures["server_event_latency"]["count"] == figures["events_received"]


def test_metrics_count_generations_in_prometheus_format(chat_server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        r = httpx.get(chat_server.url + "/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {s.name: s.value for family in text_string_to_metric_families(r.text) for s in family.samples if not s.labels or s.name.endswith("_total")}

    before = scrape()
    r = httpx.post(chat_server.url + "/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    after = scrape()
    usage = r.json()["usage"]
    assert after["smolcandle_generated_tokens_total"] - before.get("smolcandle_generated_tokens_total", 0) == usage["completion_tokens"]
    assert after["smolcandle_prompt_tokens_total"] - before.get("smolcandle_prompt_tokens_total", 0) == usage["prompt_tokens"]
    assert after["smolcandle_time_to_first_token_seconds_count"] == before.get("smolcandle_time_to_first_token_seconds_count", 0) + 1
    assert after["smolcandle_max_active_sequences"] >= 1 and after["smolcandle_model_ready"] == 1 and after["smolcandle_draining"] == 0
    assert after["smolcandle_kv_budget_bytes"] > 0 and "smolcandle_queue_depth" in after
