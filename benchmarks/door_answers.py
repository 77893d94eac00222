"""The answers both doors give to a fixed set of requests, as one JSON file: run it before and
after a change to the server that must not change behaviour, and compare the files byte for byte.

    python benchmarks/door_answers.py MODEL.gguf OUT.json [--python PYTHON]

starts ``PYTHON -m smolcandle serve MODEL`` (greedy, two threads, a fresh ``SMOLCANDLE_HOME`` and
history database in a temporary directory, no ``SMOLCANDLE_*`` setting inherited) on a free
loopback port, then, one at a time (so no two generations ever share a batch):

- sends 20 requests to ``/v1`` (chat completions whole and streamed, system and developer messages,
  several turns, ``stop``, ``response_format``, tools, logprobs, a seeded sample, legacy
  completions, a ``prompt_cache_key`` used twice, two errors) and keeps each one's status, the
  headers a client reads, the body parsed (for a stream: the deltas put together, the finish
  reason, the usage) and the body itself, byte for byte, with only its ids, ``created`` and the
  counts of speculative decoding's draft tokens replaced (those follow measured step times);
- holds 5 conversations in the browser chat through the routes the page uses (``GET /`` for the
  session cookie, ``POST /send`` with ``HX-Request: true`` and the composer's form fields, the
  ``/events`` stream read until the answer's final fragment), and keeps each conversation's
  messages as the history database has them, the answers as the conversation's page renders
  them, and each answer's final fragment (with its speed figures replaced);

and writes it all with sorted keys. Two runs of the same code give the same file; a difference
between a run before and a run after a change is a change of behaviour (``diff`` the two files).
The model is meant to be the real SmolLM2-135M (about two minutes on two cores); any model the
server loads works. Only the standard library and ``httpx``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HX = {"HX-Request": "true"}
# The browser chat's answers are cut at this many tokens (the server's --max-tokens), to keep a
# run short; every /v1 request names its own max_tokens.
CHAT_MAX_TOKENS = 48
SYSTEM = "You are a helpful assistant."
# The headers of a /v1 answer that a client acts on.
API_HEADERS = ("content-type", "cache-control", "x-accel-buffering", "retry-after")
# The headers of a POST /send answer that htmx acts on.
HX_HEADERS = ("content-type", "hx-retarget", "hx-reswap", "hx-push-url", "hx-location")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}, "population_millions": {"type": "integer"}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}


def _chat(messages: list[dict[str, Any]], max_tokens: int = 32, **extra: Any) -> dict[str, Any]:
    return {"model": "MODEL", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


def _user(text: str, system: str | None = None) -> list[dict[str, Any]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# (name, path, body): "MODEL" stands for the served model's id. One at a time, in this order.
API_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("chat_system", "/v1/chat/completions", _chat(_user("What is the capital of France?", SYSTEM))),
    (
        "chat_system_stream",
        "/v1/chat/completions",
        _chat(_user("What is the capital of France?", SYSTEM), stream=True, stream_options={"include_usage": True}),
    ),
    (
        "chat_multi_turn_developer_parts",
        "/v1/chat/completions",
        {
            "model": "MODEL",
            "temperature": 0,
            "max_completion_tokens": 40,
            "messages": [
                {"role": "developer", "content": "Answer in one short sentence."},
                {"role": "user", "content": [{"type": "text", "text": "My name is Ada. "}, {"type": "text", "text": "I live in Paris."}]},
                {"role": "assistant", "content": "Nice to meet you, Ada!"},
                {"role": "user", "content": "What is my name, and where do I live?"},
            ],
        },
    ),
    (
        "chat_multi_turn_stream",
        "/v1/chat/completions",
        _chat(
            [
                {"role": "user", "content": "Name three colours."},
                {"role": "assistant", "content": "Red, green and blue."},
                {"role": "user", "content": "Which of them is the colour of the sky?"},
            ],
            stream=True,
        ),
    ),
    ("chat_stop", "/v1/chat/completions", _chat(_user("What is the capital of France?"), 32, stop=["Paris", "\n\n"])),
    (
        "chat_json_schema",
        "/v1/chat/completions",
        _chat(
            _user("Describe Paris as JSON with its city, country and population in millions."),
            48,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
        ),
    ),
    (
        "chat_json_object_stream",
        "/v1/chat/completions",
        _chat(_user("Give a JSON object with a key named colour."), 32, response_format={"type": "json_object"}, stream=True, stream_options={"include_usage": True}),
    ),
    (
        "chat_tools_required",
        "/v1/chat/completions",
        _chat(_user("What is the weather in Rome?"), 48, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required"),
    ),
    (
        "chat_tools_auto_stream",
        "/v1/chat/completions",
        _chat(_user("What is the weather in Oslo today?"), 48, tools=[WEATHER_TOOL], tool_choice="auto", stream=True, stream_options={"include_usage": True}),
    ),
    (
        "chat_tool_result",
        "/v1/chat/completions",
        _chat(
            [
                {"role": "user", "content": "What is the weather in Rome?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
            ],
            40,
            tools=[WEATHER_TOOL],
        ),
    ),
    ("chat_logprobs", "/v1/chat/completions", _chat(_user("Say hello."), 8, logprobs=True, top_logprobs=3)),
    ("chat_logprobs_stream", "/v1/chat/completions", _chat(_user("Say goodbye."), 8, logprobs=True, top_logprobs=2, stream=True)),
    (
        "chat_seeded_sample",
        "/v1/chat/completions",
        {**_chat(_user("Tell me a fun fact about cats."), 32), "temperature": 0.8, "top_p": 0.95, "top_k": 40, "seed": 1234},
    ),
    ("completion", "/v1/completions", {"model": "MODEL", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}),
    (
        "completion_echo_logprobs",
        "/v1/completions",
        {"model": "MODEL", "prompt": ["Once upon a time"], "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 2},
    ),
    (
        "completion_stream_stop",
        "/v1/completions",
        {"model": "MODEL", "prompt": "1, 2, 3, 4,", "max_tokens": 24, "temperature": 0, "stop": " 9", "stream": True, "stream_options": {"include_usage": True}},
    ),
    ("chat_cache_key_first", "/v1/chat/completions", _chat(_user("Name a big city in Japan.", SYSTEM), 24, prompt_cache_key="door-answers")),
    ("chat_cache_key_again", "/v1/chat/completions", _chat(_user("Name a big city in Japan.", SYSTEM), 24, prompt_cache_key="door-answers")),
    ("error_unknown_model", "/v1/chat/completions", {**_chat(_user("Hello?"), 8), "model": "no-such-model"}),
    ("error_out_of_range", "/v1/chat/completions", _chat(_user("Hello?"), 8, temperature=3.5)),
]
assert len(API_REQUESTS) == 20 and len({name for name, _, _ in API_REQUESTS}) == 20

# Browser conversations, in order: (session, the user's messages). Conversations of one session
# share its cookie.
CONVERSATIONS: list[tuple[str, list[str]]] = [
    ("alice", ["What is the capital of France?", "And what is its population?"]),
    ("alice", ["Name three colours.", "Which of them is the colour of the sky?"]),
    ("bob", ["Hi! I'm Marco and I live in Rome.", "Where do I live?"]),
    ("bob", ["Show me how to print hello world in Python."]),
    ("carol", ["Write a bulleted list of three fruits, in markdown."]),
]

# What changes from run to run and is no behaviour: replaced wherever it appears. The counts of
# speculative decoding's draft tokens are among them: the draft length adapts to measured step
# times (the output never depends on it).
_VOLATILE = [
    (re.compile(r'"id": "(chatcmpl|cmpl)-[0-9A-Za-z]+"'), r'"id": "\1-*"'),
    (re.compile(r'"created": \d+'), '"created": 0'),
    (re.compile(r"\bcall_[0-9a-f]{24}\b"), "call_*"),
    (re.compile(r'"(accepted|rejected)_prediction_tokens": \d+'), r'"\1_prediction_tokens": "N"'),
]
_SPECULATION = ("accepted_prediction_tokens", "rejected_prediction_tokens")
# In the browser's fragments: the session channel's event ids and the speed of an answer.
_VOLATILE_HTML = [
    (re.compile(r"\b[0-9a-f]{8,}-\d+\b"), "EVENT-ID"),
    (re.compile(r"\d+(?:\.\d+)? tok/s"), "N tok/s"),
    (re.compile(r"prompt \d+(?:\.\d+)? s"), "prompt N s"),
    (re.compile(r"\bcall_[0-9a-f]{24}\b"), "call_*"),
]


def scrub(text: str, rules: list[tuple[re.Pattern[str], str]] = _VOLATILE) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def scrub_json(value: Any) -> Any:
    """A parsed body with its volatile values replaced: the completion's id and ``created``,
    the tool calls' ids, the counts of draft tokens."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "id" and isinstance(v, str) and re.fullmatch(r"(chatcmpl|cmpl)-[0-9A-Za-z]+|call_[0-9a-f]{24}", v):
                v = re.sub(r"[-_].*", lambda m: m.group(0)[0] + "*", v)
            elif k == "created" and isinstance(v, int):
                v = 0
            elif k in _SPECULATION and isinstance(v, int):
                v = "N"
            out[k] = scrub_json(v)
        return out
    if isinstance(value, list):
        return [scrub_json(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


# -- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, python: str, model: Path, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "history.sqlite3"
        self.log = tmp / "serve.log"
        cmd = [
            python, "-m", "smolcandle", "serve", str(model),
            "--port", str(self.port), "--db", str(self.db), "--threads", "2", "--temperature", "0",
            "--max-tokens", str(CHAT_MAX_TOKENS), "--system", SYSTEM,
        ]  # fmt: skip
        # Nothing of the caller's SMOLCANDLE_* settings: the flags above are the whole configuration.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLCANDLE_")}
        env.update(SMOLCANDLE_HOME=str(tmp / "home"), PYTHONHASHSEED="0")
        # Run from the temporary directory: nothing of the caller's ./models, and PYTHON imports
        # the smolcandle it has installed.
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=self.url, timeout=120, trust_env=False)

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smolcandle serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                state = self.http.get("/healthz", timeout=5).json()["model"]["state"]
            except (httpx.HTTPError, ValueError, KeyError):
                state = None
            if state == "ready":
                return state
            if state in ("failed", "none"):
                raise RuntimeError(f"the model did not load ({state}):\n{self.log.read_text()}")
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.log.read_text()}")

    def model_id(self) -> str:
        data = self.http.get("/v1/models").json()["data"]
        return data[0]["id"]

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no browser answer and no /v1 generation is under way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.http.get("/status").json()
            if not s.get("generating") and not s.get("api_generating"):
                return
            time.sleep(0.05)
        raise TimeoutError("the server stayed busy")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- /v1 ------------------------------------------------------------------------------------------


def _headers(r: httpx.Response, names: tuple[str, ...]) -> dict[str, str]:
    return {n: r.headers[n] for n in names if n in r.headers}


def _sse_data(raw: str) -> list[str]:
    """The data of each event of a text/event-stream body, in order."""
    events, data = [], []
    for line in raw.split("\n"):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "" and data:
            events.append("\n".join(data))
            data = []
    if data:
        events.append("\n".join(data))
    return events


def summarize_stream(raw: str) -> dict[str, Any]:
    """A streamed answer put together: the deltas joined, the tool calls, the finish reason, the
    usage, the logprobs, the number of chunks, and whether every chunk had the same id."""
    events = _sse_data(raw)
    done = bool(events) and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    ids = {c.get("id") for c in chunks}
    created = {c.get("created") for c in chunks}
    out: dict[str, Any] = {
        "chunks": len(chunks),
        "ends_with_done": done,
        "one_id": len(ids) == 1,
        "one_created": len(created) == 1,
        "heads": sorted({json.dumps({k: c.get(k) for k in ("object", "model", "system_fingerprint")}, sort_keys=True) for c in chunks}),
        "finish_reason": None,
        "usage": None,
    }
    roles, content, reasoning, text, tool_calls, logprobs = [], "", "", "", [], []
    for c in chunks:
        if "usage" in c and c["usage"] is not None:
            out["usage"] = c["usage"]
        for choice in c.get("choices") or []:
            if choice.get("finish_reason") is not None:
                out["finish_reason"] = choice["finish_reason"]
            lp = choice.get("logprobs")
            if lp is not None:
                logprobs.append(lp)
            if "text" in choice:  # legacy completions
                text += choice["text"]
                continue
            delta = choice.get("delta") or {}
            if "role" in delta:
                roles.append(delta["role"])
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            tool_calls.extend(delta.get("tool_calls") or [])
    if chunks and chunks[0].get("object") == "text_completion":
        out["text"] = text
    else:
        out.update(roles=roles, content=content, reasoning_content=reasoning, tool_calls=tool_calls)
    out["logprobs"] = logprobs
    return scrub_json(out)


def run_api(server: Server, model_id: str) -> list[dict[str, Any]]:
    results = []
    for name, path, body in API_REQUESTS:
        body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(model_id)))
        t0 = time.monotonic()
        r = server.http.post(path, json=body)
        raw = r.text
        entry: dict[str, Any] = {"name": name, "path": path, "request": body, "status": r.status_code, "headers": _headers(r, API_HEADERS), "raw": scrub(raw)}
        if body.get("stream") and r.status_code == 200:
            entry["stream"] = summarize_stream(raw)
        else:
            try:
                entry["body"] = scrub_json(json.loads(raw))
            except ValueError:
                entry["body"] = None
        results.append(entry)
        print(f"  {name}: {r.status_code} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        server.wait_idle()
    return results


# -- the browser chat ------------------------------------------------------------------------------

_AFTER = re.compile(r"after=([0-9a-f]+-\d+)")
_BODY = re.compile(r'class="body markdown">(.*?)</div>', re.DOTALL)


def _after(page: str) -> str | None:
    m = _AFTER.search(page)
    return m.group(1) if m else None


def _final_fragment(client: httpx.Client, view: str, after: str | None, limit: float = 120) -> str | None:
    """Reads the session's event stream (what the page's SSE extension reads) from ``after``
    until the fragment that ends an answer (``data-finish``), and returns it."""
    deadline = time.monotonic() + limit
    params = {"view": view} | ({"after": after} if after else {})
    with client.stream("GET", "/events", params=params, timeout=limit) as r:
        data: list[str] = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                event = "\n".join(data)
                data = []
                if "data-finish" in event:
                    return event
            if time.monotonic() > deadline:
                break
    return None


def _stored(db: Path, conversation_id: int, expected_answers: int, limit: float = 120) -> list[dict[str, Any]]:
    """The conversation's messages from the history database, once it holds ``expected_answers``
    finished answers."""
    deadline = time.monotonic() + limit
    while True:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            rows = con.execute(
                "SELECT role, content, reasoning, finish_reason, completion_tokens FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            ).fetchall()
        con.close()
        messages = [{"role": r[0], "content": scrub(r[1], _VOLATILE_HTML[3:]), "reasoning": r[2], "finish_reason": r[3], "completion_tokens": r[4]} for r in rows]
        done = [m for m in messages if m["role"] == "assistant" and m["finish_reason"] is not None]
        if len(done) >= expected_answers and all(m["finish_reason"] is not None for m in messages if m["role"] == "assistant"):
            return messages
        if time.monotonic() > deadline:
            raise TimeoutError(f"conversation {conversation_id}: {len(done)} of {expected_answers} answers finished")
        time.sleep(0.05)


def _title(db: Path, conversation_id: int) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        row = con.execute("SELECT title FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    con.close()
    return row[0] if row else None


def run_browser(server: Server) -> list[dict[str, Any]]:
    clients: dict[str, httpx.Client] = {}
    results = []
    try:
        for n, (session, texts) in enumerate(CONVERSATIONS, 1):
            t0 = time.monotonic()
            if session not in clients:
                clients[session] = httpx.Client(base_url=server.url, timeout=120, trust_env=False)
            client = clients[session]
            page = client.get("/")
            assert "smolcandle_session" in client.cookies, "GET / set no session cookie"
            after, conv_key, conversation_id = _after(page.text), "new", None
            sends, fragments = [], []
            for i, text in enumerate(texts, 1):
                t1 = time.monotonic()
                r = client.post("/send", data={"conversation": conv_key, "text": text}, headers=HX)
                sends.append({"status": r.status_code, "headers": _headers(r, HX_HEADERS)})
                if r.status_code != 200:
                    raise RuntimeError(f"POST /send answered {r.status_code}: {r.text[:300]}")
                if conversation_id is None:
                    conversation_id = int(r.headers["HX-Push-Url"].rsplit("/", 1)[1])
                    conv_key = str(conversation_id)
                fragment = _final_fragment(client, conv_key, after)
                fragments.append(scrub(fragment, _VOLATILE_HTML) if fragment is not None else None)
                stored = _stored(server.db, conversation_id, i)
                server.wait_idle()
                print(f"    message {i}: {stored[-1]['completion_tokens']} tokens, {stored[-1]['finish_reason']}, {time.monotonic() - t1:.1f} s", file=sys.stderr)
                page = client.get(f"/c/{conversation_id}")
                after = _after(page.text)
            messages = _stored(server.db, conversation_id, len(texts))
            rendered = [scrub(b, _VOLATILE_HTML) for b in _BODY.findall(page.text)]
            results.append(
                {
                    "session": session,
                    "conversation_id": conversation_id,
                    "title": _title(server.db, conversation_id),
                    "sends": sends,
                    "messages": messages,
                    "page_status": page.status_code,
                    "rendered_answers": rendered,
                    "final_fragments": fragments,
                }
            )
            print(f"  conversation {n} ({len(texts)} messages): {time.monotonic() - t0:.1f} s", file=sys.stderr)
    finally:
        for c in clients.values():
            c.close()
    return results


# -- the run ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a GGUF file (the real SmolLM2-135M-Instruct Q4_1 is the one meant)")
    ap.add_argument("out", type=Path, help="where the answers go (JSON)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose smolcandle serves (default: this one)")
    args = ap.parse_args()
    model = args.model.resolve()
    if not model.is_file():
        ap.error(f"no such file: {model}")

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="door-answers-") as tmp:
        server = Server(args.python, model, Path(tmp))
        try:
            server.wait_ready()
            model_id = server.model_id()
            print(f"serving {model_id} on {server.url} (ready in {time.monotonic() - t0:.1f} s)", file=sys.stderr)
            api = run_api(server, model_id)
            browser = run_browser(server)
        except BaseException:
            print(f"-- the server's log --\n{server.log.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            server.stop()
    answers = {
        "server": {"model_id": model_id, "chat_max_tokens": CHAT_MAX_TOKENS, "system": SYSTEM},
        "v1": api,
        "browser": browser,
    }
    args.out.write_text(json.dumps(answers, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
