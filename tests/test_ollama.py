"""Ollama's API under /api, through the official ``ollama`` package, unchanged, against
``smolcandle serve`` with the real SmolLM2-135M model; and the access log the server writes
for each request."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import ollama
import pytest
from server import Server

from models import smollm2_path

MODEL = "SmolLM2-135M-Instruct.Q4_1"
TAGGED = f"{MODEL}:latest"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# One earlier call in the conversation is what SmolLM2-135M needs to call a tool again.
ASKS_LONDON = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "user", "content": "Weather in London?"},
]
PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(chat_server):
    return ollama.Client(host=chat_server.url)


def access_lines(server: Server, method: str, path: str) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if f'"{method} {path}"' in line]


def test_list_version_and_ps(client, chat_server):
    (model,) = client.list().models
    assert model.model == TAGGED and model.size > 50_000_000 and len(model.digest) == 64
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.quantization_level == "Q4_1" and model.details.parameter_size == "135M"
    (running,) = client.ps().models
    assert running.model == TAGGED and running.context_length == 8192
    assert re.fullmatch(r"\d+\.\d+\.\d+", httpx.get(chat_server.url + "/api/version").json()["version"])


def test_show(client):
    shown = client.show(MODEL)
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.embedding_length"] == 576
    assert "<|im_start|>" in shown.template and "num_ctx 8192" in shown.parameters
    assert client.show(TAGGED).details.family == "llama"


def test_chat_whole_and_streamed(client):
    r = client.chat(model=MODEL, messages=FRANCE, options={"num_predict": 30})
    assert r.model == TAGGED and r.done and r.done_reason == "stop"
    assert "Paris" in r.message.content and r.message.role == "assistant"
    # The engine's counts and times, in nanoseconds.
    assert r.prompt_eval_count > 10 and r.eval_count > 3
    assert 0 < r.prompt_eval_duration < r.total_duration and 0 < r.eval_duration < r.total_duration
    assert r.total_duration < 60e9
    parts = list(client.chat(model=MODEL, messages=FRANCE, options={"num_predict": 30}, stream=True))
    assert len(parts) > 3 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == r.message.content  # greedy: the same answer
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == r.eval_count
    # num_predict bounds the answer.
    short = client.chat(model=MODEL, messages=FRANCE, options={"num_predict": 2})
    assert short.done_reason == "length" and short.eval_count == 2


def test_generate(client):
    r = client.generate(model=MODEL, prompt="What is the capital of France?", options={"num_predict": 30})
    assert "Paris" in r.response and r.done and r.prompt_eval_count > 10
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"num_predict": 4})
    assert raw.prompt_eval_count < 10 and raw.eval_count == 4 and raw.done_reason == "length"
    streamed = "".join(p.response for p in client.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"num_predict": 4}, stream=True))
    assert streamed == raw.response


def test_the_same_answer_as_the_openai_door(client, chat_server):
    r = client.chat(model=MODEL, messages=FRANCE, options={"num_predict": 40})
    v1 = httpx.post(chat_server.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 40}, timeout=60).json()
    assert v1["choices"][0]["message"]["content"] == r.message.content


def test_options_map_to_sampling(client):
    hot = {"temperature": 1.5, "top_k": 50, "top_p": 0.95, "min_p": 0.01, "repeat_penalty": 1.1, "num_predict": 12}
    a = client.chat(model=MODEL, messages=FRANCE, options={**hot, "seed": 7})
    b = client.chat(model=MODEL, messages=FRANCE, options={**hot, "seed": 7})
    assert a.message.content == b.message.content
    others = {client.chat(model=MODEL, messages=FRANCE, options={**hot, "seed": s}).message.content for s in range(1, 5)}
    assert len(others) > 1, "the seed and temperature had no effect"
    stopped = client.chat(model=MODEL, messages=FRANCE, options={"stop": ["Paris"], "num_predict": 30})
    assert "Paris" not in stopped.message.content and stopped.done_reason == "stop"


def test_tool_calls(client):
    r = client.chat(model=MODEL, messages=ASKS_LONDON, tools=[WEATHER], options={"num_predict": 60})
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "London"}
    parts = list(client.chat(model=MODEL, messages=ASKS_LONDON, tools=[WEATHER], options={"num_predict": 60}, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "London"})]


def test_format_json_schema_and_json(client):
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a city and its country as JSON."}], format=PLACE, options={"num_predict": 80})
    jsonschema.validate(json.loads(r.message.content), PLACE)
    r = client.generate(model=MODEL, prompt="Describe Paris in JSON.", format="json", options={"num_predict": 60})
    assert r.done_reason == "length" or isinstance(json.loads(r.response), dict)


def test_embed(client):
    e = client.embed(model=MODEL, input=["The cat sat on the mat.", "Stock markets fell today."])
    assert len(e.embeddings) == 2 and all(len(v) == 576 for v in e.embeddings)
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in e.embeddings)
    assert e.prompt_eval_count > 8 and e.total_duration > 0
    one = client.embed(model=MODEL, input="The cat sat on the mat.")
    assert one.embeddings[0] == pytest.approx(e.embeddings[0], abs=1e-6)
    legacy = client.embeddings(model=MODEL, prompt="The cat sat on the mat.")
    assert list(legacy.embedding) == pytest.approx(e.embeddings[0], abs=1e-6)


@pytest.mark.parametrize(
    ("call", "status", "says"),
    [
        (lambda c: c.chat(model="llama3", messages=FRANCE), 404, "not found"),
        (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi", "images": ["aGk="]}]), 400, "text only"),
        (lambda c: c.chat(model=MODEL, messages=FRANCE, options={"temperature": -1}), 400, "temperature"),
        (lambda c: c.chat(model=MODEL, messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
        (lambda c: c.generate(model=MODEL, prompt="x", suffix="y"), 400, "suffix"),
        (lambda c: c.embed(model=MODEL, input=""), 400, "empty"),
        (lambda c: c.embed(model=MODEL, input="hi", dimensions=8), 400, "dimensions"),
        (lambda c: c.pull("llama3"), 501, "smolcandle models pull"),
        (lambda c: c.delete("llama3"), 501, "smolcandle models pull"),
    ],
    ids=["unknown-model", "image", "temperature", "role", "suffix", "empty-embed", "dimensions", "pull", "delete"],
)
def test_errors_in_ollamas_shape(client, call, status, says):
    with pytest.raises(ollama.ResponseError) as caught:
        call(client)
    assert caught.value.status_code == status and says in caught.value.error, caught.value


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/api/nope", 404), ("POST", "/api/tags", 405), ("GET", "/api/chat", 405)])
def test_unknown_paths_and_methods_are_json(chat_server, method, path, status):
    r = httpx.request(method, chat_server.url + path)
    assert r.status_code == status and r.headers["content-type"].startswith("application/json")
    assert path in r.json()["error"]


def test_bad_json_is_a_400_in_ollamas_shape(chat_server):
    for content in (b"{not json", b"[1, 2]", b'{"model": "' + MODEL.encode() + b'", "messages": "hi"}'):
        r = httpx.post(chat_server.url + "/api/chat", content=content)
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text


def test_each_request_has_its_access_log_line(client, chat_server):
    client.chat(model=MODEL, messages=FRANCE, options={"num_predict": 5})
    list(client.chat(model=MODEL, messages=FRANCE, options={"num_predict": 5}, stream=True))
    client.embed(model=MODEL, input="hello")
    httpx.get(chat_server.url + "/api/nope")
    httpx.post(chat_server.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 5}, timeout=60)
    line = re.compile(r'^\d{4}-\d\d-\d\dT[\d:.]+Z 127\.0\.0\.1 "(\w+) (\S+)" (\d{3}) (\d+\.\d+)s(.*)$')
    chats = [line.match(x) for x in access_lines(chat_server, "POST", "/api/chat")]
    assert len(chats) >= 2 and all(chats)
    for m in chats[-2:]:  # whole, then streamed (its line is written when the stream ends)
        assert m[3] == "200" and re.search(r"prompt_tokens=\d+ completion_tokens=5 ttft_s=\d", m[5]), m[0]
    (embed_line, *_) = access_lines(chat_server, "POST", "/api/embed")[-1:]
    assert re.search(r" 200 \d+\.\d+s prompt_tokens=1$", embed_line), embed_line
    assert '" 404 ' in access_lines(chat_server, "GET", "/api/nope")[-1]
    assert "completion_tokens=5" in access_lines(chat_server, "POST", "/v1/chat/completions")[-1]
    assert not any("hypercorn" in x.lower() for x in chat_server.log.read_text().splitlines())
    # /metrics counts requests by route (the URL rule) and status.
    metrics = httpx.get(chat_server.url + "/metrics").text
    assert re.search(r'smolcandle_http_requests_total\{route="/api/chat",status="200"\} [1-9]', metrics)
    assert re.search(r'smolcandle_http_requests_total\{route="unmatched",status="404"\} [1-9]', metrics)


def test_the_access_log_as_json_and_quiet(tmp_path):
    srv = Server(smollm2_path(), tmp_path, "--log-format", "json")
    try:
        httpx.post(srv.url + "/api/chat", json={"model": MODEL, "messages": FRANCE, "stream": False, "options": {"num_predict": 3}}, timeout=60)
        httpx.get(srv.url + "/c/12345")
        entries = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        chat = next(e for e in entries if e["path"] == "/api/chat")
        assert chat["status"] == 200 and chat["route"] == "/api/chat" and chat["client"] == "127.0.0.1" and chat["method"] == "POST"
        assert chat["completion_tokens"] == 3 and chat["prompt_tokens"] > 0 and 0 < chat["ttft_s"] <= chat["duration_s"]
        page = next(e for e in entries if e["path"].startswith("/c/"))
        assert page["route"].startswith("/c/<int") and page["route"].endswith(":conversation_id>"), page
    finally:
        srv.stop()
    quiet = Server(smollm2_path(), tmp_path, env={"SMOLCANDLE_QUIET": "1"})
    try:
        httpx.get(quiet.url + "/api/tags")
        assert '"GET /api/tags"' not in quiet.log.read_text()
    finally:
        quiet.stop()


def test_think_switches_reasoning_and_returns_it_as_thinking(tmp_path):
    """A template with a thinking switch (tests/data/thinking_chatml.jinja over SmolLM2): ``think``
    turns it on and off, and the reasoning comes back as ``thinking``, apart from the content."""
    from models import ROOT

    template = ROOT / "tests" / "data" / "thinking_chatml.jinja"
    srv = Server(smollm2_path(), tmp_path, "--chat-template", str(template), "--temperature", "0", "--max-reasoning-tokens", "8")
    try:
        c = ollama.Client(host=srv.url)
        assert "thinking" in c.show(MODEL).capabilities
        ask = [{"role": "user", "content": "Describe the water cycle."}]
        on = c.chat(model=MODEL, messages=ask, think=True, options={"num_predict": 40})
        assert on.message.thinking and on.message.content and "<think>" not in on.message.content + on.message.thinking
        parts = list(c.chat(model=MODEL, messages=ask, think=True, options={"num_predict": 40}, stream=True))
        thinking = "".join(p.message.thinking or "" for p in parts)
        assert thinking.strip() == on.message.thinking.strip()
        first_content = next(i for i, p in enumerate(parts) if p.message.content)
        assert all(not p.message.thinking for p in parts[first_content:])
        off = c.chat(model=MODEL, messages=ask, think=False, options={"num_predict": 40})
        assert not off.message.thinking and off.message.content
        generated = c.generate(model=MODEL, prompt="Describe the water cycle.", think=True, options={"num_predict": 40})
        assert generated.thinking and generated.response
    finally:
        srv.stop()
