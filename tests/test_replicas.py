"""Two replicas of ``smolcandle serve`` behind nginx, sharing a real Redis and a real PostgreSQL
(started by pytest-redis and pytest-postgresql from Debian's binaries), driven by Chromium
through nginx with the real SmolLM2-135M model.

nginx runs deploy/nginx/smolcandle.conf as shipped (its replicas' ports filled in), plus one
port per replica that reaches only that replica, so a test can hold a tab on each."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server import Server, free_port
from test_browser import LONG_PROMPT, Tab, browser  # noqa: F401 - browser: the module fixture

from models import ROOT, smollm2_path

pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "benchmarks"))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SITE = ROOT / "deploy" / "nginx" / "smolcandle.conf"
ARTIFACTS = ROOT / "artifacts"
HX = {"HX-Request": "true"}


def nginx_config(tmp: Path, port: int, replicas: list[int], pinned: dict[int, int]) -> Path:
    """A whole nginx.conf for a test: the shipped site with these replicas, and for each
    ``pinned`` port a copy of its chat routes that reaches one replica."""
    site = SITE.read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in replicas)
    site = re.sub(r"(    server 127\.0\.0\.1:800\d [^\n]*\n)+", servers, site)
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    server_block = site[site.index("server {") :]
    for own_port, replica in pinned.items():
        name = f"smolcandle_only_{replica}"
        site += f"\nupstream {name} {{\n    server 127.0.0.1:{replica};\n    keepalive 16;\n}}\n"
        copy = server_block.replace(f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{own_port};")
        site += copy.replace("http://smolcandle_chat", f"http://{name}").replace("http://smolcandle_api", f"http://{name}")
    (tmp / "site.conf").write_text(site)
    temp = tmp / "nginx-temp"
    temp.mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n"
        + "".join(f"  {kind}_temp_path {temp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {tmp}/site.conf;\n}}\n"
    )
    return conf


class Cluster:
    def __init__(self, tmp: Path, redis_url: str, database_url: str) -> None:
        self.tmp = tmp
        self.args = ("--redis", redis_url, "--database", database_url, "--temperature", "0", "--max-tokens", "400", "--max-active", "2", "--system", "You are a helpful assistant.")
        # --max-active 2: the load test's 8 answers queue, so the queue gauge has something to show
        # One thread each: two replicas on this 2-core machine use its cores as one server does
        # with 2 threads (the figures compared with one server's are of the same machine).
        one_thread = {"RAYON_NUM_THREADS": "1", "CANDLE_NUM_THREADS": "1"}
        self.replicas = [Server(smollm2_path(), tmp, *self.args, "--threads", "1", env=one_thread) for _ in range(2)]
        self.port = free_port()
        self.pinned = {free_port(): r.port for r in self.replicas}
        conf = nginx_config(tmp, self.port, [r.port for r in self.replicas], self.pinned)
        subprocess.run([NGINX, "-t", "-q", "-c", str(conf)], check=True)
        self.nginx = subprocess.Popen([NGINX, "-c", str(conf)], stderr=subprocess.STDOUT, stdout=(tmp / "nginx.out").open("w"))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp / "nginx-error.log").read_text()
            time.sleep(0.05)

    def via(self, i: int) -> str:
        """The nginx address that reaches only replica ``i``."""
        return f"http://127.0.0.1:{next(p for p, r in self.pinned.items() if r == self.replicas[i].port)}"

    def generating(self) -> list[int]:
        return [r.get_json("/status")["generating"] for r in self.replicas]

    def stop(self) -> None:
        self.nginx.terminate()
        self.nginx.wait(10)
        for r in self.replicas:
            if r.proc.poll() is None:
                r.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, postgresql_proc):
    from pytest_postgresql.janitor import DatabaseJanitor

    p = postgresql_proc
    janitor = DatabaseJanitor(user=p.user, host=p.host, port=p.port, dbname="replicas", password=p.password)
    janitor.init()
    redis_url = f"redis://{redis_server.host}:{redis_server.port}/1"
    c = Cluster(tmp_path_factory.mktemp("replicas"), redis_url, f"postgresql://{p.user}@{p.host}:{p.port}/replicas")
    yield c
    c.stop()
    janitor.drop()


def _writing(tab: Tab, chars: int = 40) -> None:
    tab.page.wait_for_function(
        f"() => {{ const b = [...document.querySelectorAll('article.assistant .body')].pop(); return b && b.textContent.length > {chars}; }}", timeout=60_000
    )


def _long_answer_on_replica_0_watched_on_1(browser, cluster: Cluster) -> tuple:
    """A long answer posted through replica 0, being written, and a tab of the same session
    showing its conversation through replica 1."""
    ctx = browser.new_context()
    tab_a = Tab(ctx, cluster.via(0))
    tab_a.send(LONG_PROMPT)
    tab_a.page.wait_for_url("**/c/*")
    tab_b = Tab(ctx, cluster.via(1) + "/c/" + tab_a.page.url.rsplit("/c/", 1)[1])
    _writing(tab_b)
    return ctx, tab_a, tab_b


def _wait_idle(cluster: Cluster) -> None:
    deadline = time.monotonic() + 120
    while any(cluster.generating()) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_an_answer_written_on_one_replica_streams_into_a_tab_on_the_other(browser, cluster):
    ctx = browser.new_context()
    tab_a = Tab(ctx, cluster.via(0))
    tab_a.send("Write a bulleted list of three fruits, in markdown.")
    tab_a.page.wait_for_url("**/c/*")
    path = "/c/" + tab_a.page.url.rsplit("/c/", 1)[1]
    tab_b = Tab(ctx, cluster.via(1) + path)  # the same session (cookie), on the other replica
    tab_b.record()
    tab_a.wait_answers(1)
    tab_b.wait_answers(1)
    assert cluster.generating() == [0, 0]
    assert tab_b.last_body() == tab_a.last_body() and tab_b.last_body().strip()
    assert tab_b.page.locator("article.assistant").count() == 1

    # a second message, posted on the other replica this time, streams into the first tab
    tab_a.record()
    tab_b.send("Name one more fruit.")
    tab_a.wait_answers(2)
    tab_b.wait_answers(2)
    assert tab_a.last_body() == tab_b.last_body()
    assert len([s for s in tab_a.states() if s.strip()]) >= 2  # it streamed there, not only ended
    assert tab_a.page.locator("article.user").count() == 2

    # the history, its titles and its search, equal on both (one PostgreSQL)
    cookies = {c["name"]: c["value"] for c in ctx.cookies()}
    pages = [httpx.get(cluster.via(i) + path, cookies=cookies).text for i in (0, 1)]
    bodies = [re.findall(r'class="body markdown">(.*?)</div>', p, re.DOTALL) for p in pages]
    assert bodies[0] == bodies[1] and len(bodies[0]) == 2
    word = re.sub(r"<[^>]+>", " ", bodies[0][0]).split()[0].strip(".,*:")
    hits = [httpx.get(cluster.via(i) + "/search", params={"q": word[:4]}, cookies=cookies).text for i in (0, 1)]
    assert hits[0] == hits[1] and "<mark>" in hits[0], hits[0]
    assert not tab_a.errors and not tab_b.errors
    ctx.close()


def test_a_reload_mid_answer_on_the_other_replica_resumes_without_loss_or_doubling(browser, cluster):
    ctx, tab_a, tab_b = _long_answer_on_replica_0_watched_on_1(browser, cluster)
    assert tab_b.page.locator("footer[data-finish]").count() == 0
    tab_b.page.reload()
    tab_b.connected()
    tab_b.wait_answers(1, timeout=180_000)
    tab_a.wait_answers(1, timeout=180_000)
    assert tab_b.page.locator("article.assistant").count() == 1
    assert tab_b.last_body() == tab_a.last_body()
    assert "tok/s" in tab_b.answers().last.locator("footer").inner_text()
    assert not tab_a.errors and not tab_b.errors
    ctx.close()


def test_stop_pressed_on_the_other_replica_stops_the_answer(browser, cluster):
    ctx, tab_a, tab_b = _long_answer_on_replica_0_watched_on_1(browser, cluster)
    assert cluster.generating() == [1, 0]
    tab_b.page.click("#stop")
    for tab in (tab_a, tab_b):
        tab.page.wait_for_selector('footer[data-finish="cancelled"]', timeout=10_000)
    assert tab_b.last_body() == tab_a.last_body()
    _wait_idle(cluster)
    ctx.close()


def test_the_api_through_nginx_keeps_a_cache_key_on_one_replica(cluster):
    """The openai client through nginx: requests naming a prompt cache key (in the header nginx
    hashes, and in the body) reach one replica, whose prefix cache serves the later ones."""
    from openai import OpenAI

    client = OpenAI(base_url=cluster.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    before = [r.get_json("/status")["prefix_cache"]["hits"] for r in cluster.replicas]
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}, {"role": "user", "content": "Say hello."}]
    for _ in range(4):
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, prompt_cache_key="team-a", extra_headers={"X-Prompt-Cache-Key": "team-a"}
        )
        assert reply.choices[0].message.content
    hits = [r.get_json("/status")["prefix_cache"]["hits"] - b for r, b in zip(cluster.replicas, before, strict=True)]
    assert sorted(hits) == [0, 3], hits  # one replica served all four: the last three reused the first's prefix
    assert reply.usage.prompt_tokens_details.cached_tokens > 0


def _load(base: str, replicas: list[str] | None = None) -> dict:
    import load_chat

    # on a thread of its own: Playwright's sync API holds this thread's event loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, load_chat.run(base, quotes=200, answers=8, replicas=replicas)).result()


def test_load_across_two_replicas_through_nginx(cluster, tmp_path):
    """200 /quote sessions and 8 model answers through nginx, /metrics of each replica scraped
    meanwhile; and the same load on one server without Redis, for comparison."""
    single = Server(smollm2_path(), tmp_path, *cluster.args[4:])  # the same settings, no --redis, SQLite
    try:
        alone = _load(single.url)
    finally:
        single.stop()
    assert alone["failed"] == [], alone["failed"][:5]

    scrapes: list[dict[str, float]] = []
    stop = threading.Event()

    def scrape() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                row: dict[str, float] = {}
                for r in cluster.replicas:
                    for line in c.get(r.url + "/metrics").text.splitlines():
                        name, _, value = line.partition(" ")
                        if name in ("smolcandle_queue_depth", "smolcandle_active_sequences", "smolcandle_kv_cache_bytes", "smolcandle_event_subscribers"):
                            row[name] = row.get(name, 0.0) + float(value)
                scrapes.append(row)
                stop.wait(0.25)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        figures = _load(cluster.url, [r.url for r in cluster.replicas])
    finally:
        stop.set()
        scraper.join()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load_chat_replicas.json").write_text(json.dumps({"one_server": alone, "two_replicas": figures, "metrics_scrapes": scrapes}, indent=2))
    for name, f in (("one server", alone), ("2 replicas + nginx", figures)):
        lat, hz = f["server_event_latency"], f["healthz_ms"]
        print(f"| {name} | {f['completed']} | {f['events_received']} | {f['wall_seconds']} | {lat.get('p50_ms')} / {lat.get('p99_ms')} | {hz['p50']} / {hz['p99']} / {hz['max']} |")
    assert figures["failed"] == [] and figures["completed"] == 208, figures["failed"][:5]
    assert figures["dropped_subscribers"] == 0
    served = [r["events"] for r in figures["replica_event_latency"]]
    assert all(n > 0 for n in served), served  # both replicas delivered events
    assert sum(served) == figures["events_received"]
    for name in ("smolcandle_queue_depth", "smolcandle_active_sequences", "smolcandle_kv_cache_bytes", "smolcandle_event_subscribers"):
        seen = [row.get(name, 0.0) for row in scrapes]
        assert max(seen) > min(seen), (name, seen)  # the gauges moved with the load
    assert max(row.get("smolcandle_active_sequences", 0) for row in scrapes) >= 1


def test_killing_the_generating_replica_marks_its_answer_interrupted_everywhere(browser, cluster):
    """Runs last: it kills a replica."""
    _wait_idle(cluster)
    ctx = browser.new_context()
    tab = Tab(ctx, cluster.url)  # through the balanced port: whichever replica nginx picks
    tab.send(LONG_PROMPT)
    tab.page.wait_for_url("**/c/*")
    path = "/c/" + tab.page.url.rsplit("/c/", 1)[1]
    _writing(tab)
    generating = cluster.generating()
    assert sorted(generating) == [0, 1], generating
    writer = generating.index(1)
    survivor = 1 - writer
    watcher = Tab(ctx, cluster.via(survivor) + path)
    assert watcher.page.locator("footer[data-finish]").count() == 0
    cluster.replicas[writer].proc.kill()  # no drain, no goodbye
    killed = time.monotonic()
    for t in (watcher, tab):  # the tab on the dead replica reconnects through nginx to the other
        t.page.wait_for_selector('footer[data-finish="interrupted"]', timeout=15_000)
    marked = time.monotonic() - killed
    assert marked < 10, marked
    page = httpx.get(cluster.via(survivor) + path, cookies={c["name"]: c["value"] for c in ctx.cookies()}).text
    assert 'data-finish="interrupted"' in page and "interrupted" in page  # and in the history
    (ARTIFACTS / "replica_killed.txt").write_text(f"answer marked interrupted in both tabs {marked:.2f} s after its replica was killed\n")
    ctx.close()
