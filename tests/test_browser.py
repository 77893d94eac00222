"""The browser chat in real headless Chromium (Debian's), driven by Playwright, against
``smolcandle serve`` with the real SmolLM2-135M model."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from models import ROOT

playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "artifacts"
LONG_PROMPT = "Write a long story about a dragon who learns to fly."

# Records every state the newest answer's body goes through, to tell streaming from a single swap.
RECORDER = """() => {
  window.__states = [];
  new MutationObserver(() => {
    const bodies = document.querySelectorAll('article.msg:not(.user) .body');
    const b = bodies[bodies.length - 1];
    if (b && window.__states[window.__states.length - 1] !== b.textContent) window.__states.push(b.textContent);
  }).observe(document.getElementById('main'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "Debian's chromium is not installed (.ci/run installs it)"
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Tab:
    def __init__(self, context, url: str) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.accept_dialogs = False
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # The page's Content-Security-Policy refuses inline and evaluated script: a violation
        # is something of ours that no longer runs.
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)
        self.page.on("dialog", self._dialog)
        self.page.goto(url)
        self.connected()

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept() if self.accept_dialogs else dialog.dismiss()

    def connected(self) -> None:
        # The SSE extension marks nothing; wait until the event stream is open.
        self.page.wait_for_function("() => { const d = document.getElementById('events')?.['htmx-internal-data']; return d?.sseEventSource?.readyState === 1; }")

    def record(self) -> None:
        self.page.evaluate(RECORDER)

    def states(self) -> list[str]:
        return self.page.evaluate("window.__states")

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answers(self):
        return self.page.locator("article.assistant, article.system")

    def wait_answers(self, n: int, timeout: float = 90_000) -> None:
        self.page.wait_for_function(f"() => document.querySelectorAll('article.msg:not(.user) footer[data-finish]').length >= {n}", timeout=timeout)

    def last_body(self) -> str:
        return self.answers().last.locator(".body").inner_text()


def test_streamed_markdown_answer_reaches_every_tab(browser, chat_server):
    ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    tab1 = Tab(ctx, chat_server.url)
    tab1.record()
    tab1.send("Write a bulleted list of three fruits, in markdown.")
    tab1.wait_answers(1)
    assert tab1.page.input_value("#prompt") == ""  # the composer was cleared once sent
    answer = tab1.answers().last
    assert answer.locator(".body li").count() >= 2, answer.inner_html()  # rendered as a list
    states = tab1.states()
    assert len([s for s in states if s.strip()]) >= 3, states  # it arrived in pieces
    assert max(states, key=len) == states[-1], states  # growing to the final text
    assert "tok/s" in answer.locator("footer").inner_text()
    assert "/c/" in tab1.page.url  # the new conversation has its own address

    tab2 = Tab(ctx, tab1.page.url)  # the same session (cookie), the same conversation
    assert tab2.last_body() == tab1.last_body()
    tab2.record()
    tab1.record()
    tab1.send("Name one more fruit.")
    tab1.wait_answers(2)
    tab2.wait_answers(2)
    assert tab2.last_body() == tab1.last_body()
    assert len(tab2.states()) >= 2  # tab 2 saw it stream too, not just the end
    assert tab2.page.locator("article.user").count() == 2
    ARTIFACTS.mkdir(exist_ok=True)
    tab1.page.screenshot(path=str(ARTIFACTS / "browser-chat.png"), full_page=True)
    assert (ARTIFACTS / "browser-chat.png").stat().st_size > 10_000
    assert not tab1.errors and not tab2.errors
    ctx.close()


def test_reload_mid_answer_ends_complete_without_doubling(browser, chat_server):
    ctx = browser.new_context()
    tab = Tab(ctx, chat_server.url)
    tab.send(LONG_PROMPT)
    tab.page.wait_for_function("() => { const b = document.querySelector('article.assistant .body'); return b && b.textContent.length > 40; }")
    assert tab.page.locator("footer[data-finish]").count() == 0
    tab.page.reload()
    tab.connected()
    partial = tab.page.locator("article.assistant .body").inner_text()
    assert partial, "the reloaded page shows the answer so far"
    tab.wait_answers(1)
    live = tab.last_body()
    assert tab.page.locator("article.assistant").count() == 1 and tab.page.locator("article.user").count() == 1
    # The same conversation rendered afresh from the database: the stored answer.
    tab.page.goto(tab.page.url)
    assert tab.last_body() == live
    assert tab.answers().last.locator("footer").get_attribute("data-finish") in ("stop", "length")
    ctx.close()


def test_stop_button_cancels_the_answer(browser, chat_server):
    ctx = browser.new_context()
    tab = Tab(ctx, chat_server.url)
    before = chat_server.get_json("/status")["generations_cancelled"]
    tab.send(LONG_PROMPT)
    tab.page.wait_for_function("() => { const b = document.querySelector('article.assistant .body'); return b && b.textContent.length > 10; }")
    tab.page.click("#stop")
    tab.wait_answers(1, timeout=10_000)
    foot = tab.answers().last.locator("footer")
    assert foot.get_attribute("data-finish") == "cancelled"
    assert "stopped" in foot.inner_text()
    assert chat_server.get_json("/status")["generations_cancelled"] == before + 1
    assert chat_server.get_json("/status")["generating"] == 0
    ctx.close()


INJECTION = "<img src=x onerror=\"window.__pwned='img'\"><script>window.__pwned='script'</script>[x](javascript:window.__pwned='link')"


def test_injected_html_never_runs(browser, chat_server):
    ctx = browser.new_context()
    tab = Tab(ctx, chat_server.url)
    # In user input, and in the model's output (the model is asked to repeat it; whatever it
    # writes goes through the same renderer).
    tab.send(f"Repeat exactly: {INJECTION}")
    tab.wait_answers(1)
    log = tab.page.locator("#log")
    assert INJECTION in log.locator("article.user").first.inner_text()  # shown as text
    # A model answer that is an attack, stored as if the model had written it, rendered both
    # live-path and from history.
    conv_id = int(tab.page.url.rsplit("/", 1)[1])
    db = sqlite3.connect(str(Path(chat_server.log).parent / "history.sqlite3"))
    with db:
        db.execute("INSERT INTO messages (conversation_id, role, content, finish_reason, created) VALUES (?, 'assistant', ?, 'stop', 0)", (conv_id, INJECTION + "\n\n<iframe src=javascript:alert(1)></iframe>"))
    db.close()
    tab.page.reload()
    tab.connected()
    assert tab.page.evaluate("window.__pwned") is None
    assert log.locator("img, script, iframe").count() == 0
    assert tab.page.locator("a[href^='javascript']").count() == 0
    assert "onerror" in log.locator("article.assistant").last.inner_text()  # visible as text
    assert not tab.dialogs and not tab.errors
    ctx.close()


def test_slash_commands(browser, chat_server):
    ctx = browser.new_context()
    tab = Tab(ctx, chat_server.url)
    tab.send("/help")
    tab.wait_answers(1)
    assert "/quote" in tab.answers().last.locator("table").inner_text()
    tab.record()
    tab.send("/quote")
    tab.wait_answers(2)
    assert len(tab.states()) >= 4  # streamed a word at a time
    assert tab.answers().last.locator("blockquote").count() == 1
    # SmolLM2's template has no thinking switch: the toggle is disabled, and says why.
    assert tab.page.locator("#thinking").is_disabled()
    assert "no thinking switch" in tab.page.inner_text("#thinking-why")
    tab.send("/no_think")
    tab.wait_answers(3)
    assert "no thinking switch" in tab.last_body()
    tab.send("/think")
    tab.wait_answers(4)
    tab.send("/status")
    tab.wait_answers(5)
    status = tab.answers().last.inner_text()
    assert "SmolLM2-135M" in status and "active sessions" in status and "uptime" in status
    tab.send("/reset")
    tab.page.wait_for_function("() => document.querySelectorAll('article.msg').length === 0")
    assert tab.page.inner_text("#title") == "New chat"
    ctx.close()


def test_sidebar_search_rename_delete(browser, chat_server):
    ctx = browser.new_context()
    tab = Tab(ctx, chat_server.url)
    tab.send("Tell me about the planet Jupiter.")
    tab.wait_answers(1)
    conv_id = tab.page.url.rsplit("/", 1)[1]
    item = tab.page.locator(f"#conv-item-{conv_id}")
    assert "Jupiter" in item.inner_text()
    # full-text search, prefix matching
    tab.page.goto(chat_server.url)
    tab.page.fill("#search", "Jupit")
    tab.page.wait_for_selector("#search-results a.hit")
    assert "Jupiter" in tab.page.inner_text("#search-results")
    tab.page.click("#search-results a.hit")
    tab.page.wait_for_function(f"() => location.pathname === '/c/{conv_id}'")
    tab.wait_answers(1)
    # rename
    item.locator(".rename summary").click()
    item.locator("input[name=title]").fill("Gas giants")
    item.locator("input[name=title]").press("Enter")
    tab.page.wait_for_function(f"() => document.querySelector('#conv-item-{conv_id} a').textContent === 'Gas giants'")
    # delete the open conversation (confirmed): it leaves the list and the page opens a new chat
    tab.accept_dialogs = True
    item.locator("button.delete").click()
    item.wait_for(state="detached")
    tab.page.wait_for_function("() => document.getElementById('title').textContent === 'New chat'")
    assert tab.dialogs and "Gas giants" in tab.dialogs[-1]
    assert tab.page.url.rstrip("/") == chat_server.url
    ctx.close()


def test_reasoning_shows_in_a_collapsible_block(browser, tmp_path):
    """A model whose template opens the reasoning block (SmolLM2 under
    tests/data/thinking_chatml.jinja), a reasoning budget set in the page: the engine's
    reasoning streams into the thinking block, which folds, and the answer follows it."""
    from server import Server

    from models import smollm2_path

    srv = Server(smollm2_path(), tmp_path, "--chat-template", str(ROOT / "tests" / "data" / "thinking_chatml.jinja"), "--temperature", "0", "--max-tokens", "60")
    ctx = browser.new_context()
    try:
        tab = Tab(ctx, srv.url)
        assert tab.page.locator("#thinking").is_enabled() and tab.page.locator("#thinking").is_checked()
        tab.page.fill("#reasoning-budget", "10")
        tab.page.dispatch_event("#reasoning-budget", "change")
        tab.page.wait_for_function("() => true")  # the setting is posted before the message
        tab.send("Describe the water cycle.")
        tab.wait_answers(1)
        answer = tab.answers().last
        think = answer.locator("details.thinking")
        assert think.is_visible() and think.get_attribute("open") is not None
        reasoning = think.locator(".think-body").inner_text().strip()
        assert reasoning and "<think>" not in reasoning
        body = answer.locator(".body").inner_text().strip()
        assert body and "</think>" not in body and reasoning not in body
        think.locator("summary").click()
        assert think.get_attribute("open") is None and not think.locator(".think-body").is_visible()
        status = srv.get_json("/status")
        assert status["thinking_switch"] is True
        # A reload shows the saved reasoning in its block again.
        tab.page.reload()
        tab.connected()
        assert tab.page.locator("details.thinking .think-body").last.inner_text().strip() == reasoning
        assert tab.page.input_value("#reasoning-budget") == "10"
        assert not tab.errors, tab.errors
    finally:
        ctx.close()
        srv.stop()


def test_the_demo_model_answers_a_first_question_with_its_defaults(browser, tmp_path):
    """`smolcandle serve` with nothing but the demo model and a seed: the store's recommended
    system prompt and sampling make its first answer a sensible one."""
    from server import Server

    from models import smollm2_path

    srv = Server(smollm2_path(), tmp_path, "--seed", "1")
    ctx = browser.new_context()
    try:
        status = srv.get_json("/status")
        assert status["recommended"] == {"system_prompt": "You are a helpful assistant.", "temperature": 0.0}
        tab = Tab(ctx, srv.url)
        tab.send("What is the capital of France?")
        tab.wait_answers(1)
        assert "Paris" in tab.last_body()
    finally:
        ctx.close()
        srv.stop()
