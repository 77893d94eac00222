"""The OpenAI-compatible /v1 API, through the official ``openai`` package, against
``smolcandle serve`` with the real SmolLM2-135M model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import hypothesis
import jsonschema
import openai
import pytest
import schemathesis
from server import Server

from models import smollm2_path

MODEL = "SmolLM2-135M-Instruct.Q4_1"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FRANCE = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ORDER = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 30}, "tier": {"enum": ["free", "pro", "enterprise"]}},
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
        "priority": {"enum": ["low", "normal", "high"]},
        "gift": {"type": "boolean"},
    },
    "required": ["customer", "items", "priority"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "smolcandle"


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.system_fingerprint and r.created > 0
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # string content parts and developer messages are accepted
    parts = [{"role": "developer", "content": "You are a helpful assistant."}, {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=24).choices[0].message.content == choice.message.content


def test_usage_counts_the_drafted_tokens(chat_server, client):
    """Copying a given paragraph, speculative decoding keeps most of its drafts: usage counts
    them under OpenAI's names for a prediction's tokens, and /status the engine's totals."""
    paragraph = "The old lighthouse stood at the edge of the cliff for two hundred years, and every night its keeper climbed the stairs to light the lamp."
    ask = [{"role": "user", "content": f"Repeat this sentence exactly:\n\n{paragraph}"}]
    r = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=48)
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 5 and details.rejected_prediction_tokens >= 0, details
    status = httpx.get(chat_server.url + "/status").json()["speculation"]
    assert status["enabled"] == 1 and status["accepted_tokens"] >= details.accepted_prediction_tokens, status


def test_streaming_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_length_limit_and_seeded_sampling(client):
    r = client.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Write a long story."}], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    kw = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content


def test_async_clients_in_parallel(chat_server, client):
    """Four greedy requests at once are batched by the engine; each gets the answer it gets
    alone (batched steps give the solo answers)."""

    async def go():
        aclient = openai.AsyncOpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)
        questions = ["What is the capital of France?", "What is 2 + 2?", "Name a fruit.", "Say hello."]
        rs = await asyncio.gather(
            *(aclient.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": q}], temperature=0, max_tokens=16) for q in questions)
        )
        await aclient.close()
        return rs

    rs = asyncio.run(go())
    assert "Paris" in rs[0].choices[0].message.content
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a fruit.", "Say hello."]
    for q, r in zip(questions, rs):
        alone = client.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": q}], temperature=0, max_tokens=16)
        assert r.choices[0].message.content == alone.choices[0].message.content, q


def test_legacy_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text and r.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_json_schema_twenty_samples_at_temperature_one(chat_server):
    """Twenty concurrent requests, each sampled at temperature 1.0 with its own seed: every
    answer parses and validates against a schema with nested objects, arrays and enums."""
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    ask = [SYSTEM, {"role": "user", "content": "Make up an order for our shop, as JSON."}]

    async def go():
        aclient = openai.AsyncOpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        rs = await asyncio.gather(
            *(aclient.chat.completions.create(model=MODEL, messages=ask, temperature=1.0, seed=seed, max_tokens=200, response_format=fmt) for seed in range(20))
        )
        await aclient.close()
        return rs

    rs = asyncio.run(go())
    answers = [r.choices[0].message.content for r in rs]
    assert [r.choices[0].finish_reason for r in rs] == ["stop"] * 20, answers
    for text in answers:
        jsonschema.validate(json.loads(text), ORDER)
    assert len(set(answers)) > 10  # sampled, not one answer repeated


def test_json_object_and_a_length_cut(client):
    ask = [SYSTEM, {"role": "user", "content": "Describe a cat as JSON."}]
    # Greedy: a sampled free-form object may run past any token limit (seed 2 at 0.8 writes a
    # description that never closes within 400 tokens); schema-bound sampling is tested above.
    r = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=120, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}
    r = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=6, response_format=fmt)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    streamed = list(client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=200, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), ORDER)


def test_tool_calls_round_trip(client):
    ask = [SYSTEM, {"role": "user", "content": "What is the weather in Lyon?"}]
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, CLOCK], tool_choice="required", temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name in ("get_weather", "get_time")
    # A named function is the one called, its arguments following its schema.
    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=4, max_tokens=80
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    # Streamed (same request): the call arrives as one tool-call delta.
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ask, tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=4, max_tokens=80, stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == args
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The result goes back as a tool message; the model answers from it.
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": args["unit"], "sky": "sunny"})},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], temperature=0, max_tokens=60)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.content
    streamed = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], temperature=0, max_tokens=60, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r2.choices[0].message.content
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result were rendered


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy
    text = bytes(b for t in content for b in t.bytes).decode()
    assert text.strip() == r.choices[0].message.content
    assert client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=4).choices[0].logprobs is None
    streamed = [c for c in client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.token for c in streamed for t in c.choices[0].logprobs.content] == [t.token for t in content]
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "gpt-4o"}, 404, "model"),
        ({"n": 9}, 400, "n"),
        ({"temperature": 5}, 400, "temperature"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [SYSTEM, {"role": "user", "content": "word " * 9000}]}, 400, "messages"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, 400, "response_format"),
        ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"response_format": {"type": "yaml"}}, 400, "response_format"),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(client, kwargs, status, param):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 8, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    err = info.value
    assert err.status_code == status, err
    assert err.body["message"] and err.body["type"] == "invalid_request_error"
    assert (err.body["param"] or "").startswith(param), err.body


def test_malformed_json_and_unknown_routes(chat_server):
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.get(chat_server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_context_overflow_has_its_code(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}], max_tokens=8)
    assert info.value.body["code"] == "context_length_exceeded"


def test_disconnect_cancels_the_generation(chat_server):
    before = chat_server.get_json("/status")["api_cancelled"]
    body = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any("content" in line for line in got)
        assert chat_server.get_json("/status")["api_generating"] == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = chat_server.get_json("/status")
        if status["api_generating"] == 0 and status["api_cancelled"] == before + 1:
            break
        time.sleep(0.05)
    assert status["api_generating"] == 0 and status["api_cancelled"] == before + 1, status


def test_openapi_document(chat_server):
    doc = httpx.get(chat_server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz"} <= set(doc["paths"])
    assert not any(p.startswith("/c/") for p in doc["paths"])
    props = json.dumps(doc)
    assert "max_completion_tokens" in props and "enable_thinking" in props


def test_api_key_and_cors(tmp_path):
    srv = Server(smollm2_path(), tmp_path, "--cors", "https://app.example", "--max-tokens", "8", env={"SMOLCANDLE_API_KEY": "sekrit"})
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0).models.list().data[0].id == MODEL
        assert httpx.get(srv.url + "/").status_code == 200  # the browser chat does not need the key
        pre = httpx.options(srv.url + "/v1/chat/completions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
        other = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer sekrit"})
        assert "Access-Control-Allow-Origin" not in other.headers
    finally:
        srv.stop()


def test_the_server_s_settings_apply_to_requests_that_set_none(tmp_path):
    """`serve --top-p --seed --system` reach /v1 as they reach the browser chat: a request that
    sets none samples exactly as one that sets the same values itself."""
    system = "Answer in one short sentence."
    srv = Server(smollm2_path(), tmp_path, "--temperature", "1.0", "--top-p", "0.5", "--seed", "7", "--system", system, "--max-tokens", "24")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "Tell me about the sea."}]
        bare = [client.chat.completions.create(model=MODEL, messages=question) for _ in range(2)]
        explicit = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, *question], temperature=1.0, top_p=0.5, seed=7, max_tokens=24
        )
        other_seed = client.chat.completions.create(model=MODEL, messages=question, seed=8, max_tokens=24)
        texts = [r.choices[0].message.content for r in (*bare, explicit)]
        assert texts[0] == texts[1] == texts[2], texts
        assert bare[0].usage.prompt_tokens == explicit.usage.prompt_tokens
        assert other_seed.choices[0].message.content != texts[0]
    finally:
        srv.stop()


# -- schemathesis: generated requests against the published schema ---------------------------

@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    # A short context bounds every generated request's work (max_tokens may be huge).
    srv = Server(smollm2_path(), tmp_path_factory.mktemp("fuzz"), "--ctx", "128", "--max-tokens", "8")
    yield schemathesis.openapi.from_url(srv.url + "/openapi.json")
    srv.stop()


def test_generated_requests_get_documented_answers(api_schema):
    """No 5xx, and every response matches the schema (status, content type, body), for
    requests that schemathesis generates from /openapi.json, valid and invalid."""

    def check(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # otherwise nearly every case stops at "no such model"
        # A schema-valid request may still be refused with a 400 the schema cannot express (a
        # prompt longer than the context): that check is left out; every other one runs.
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

    operations = [op.ok() for op in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"GET /healthz", "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "GET /v1/models"}
    for op in operations:
        test = hypothesis.given(case=op.as_strategy())(check)
        hypothesis.settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck))(test)()


@pytest.fixture(scope="module")
def thinking_client(tmp_path_factory):
    """A server whose template opens SmolLM2's reasoning block (tests/data/thinking_chatml.jinja)."""
    from models import ROOT

    template = ROOT / "tests" / "data" / "thinking_chatml.jinja"
    srv = Server(smollm2_path(), tmp_path_factory.mktemp("thinking"), "--chat-template", str(template), "--temperature", "0")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.stop()


def test_reasoning_content_whole_and_streamed(thinking_client):
    """The engine's reasoning comes back as reasoning_content, apart from the content, whole
    and streamed alike; max_reasoning_tokens bounds it and usage counts it."""
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Describe the water cycle."}], "max_tokens": 48, "extra_body": {"max_reasoning_tokens": 8}}
    r = thinking_client.chat.completions.create(**kw)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and msg.content and "<think>" not in msg.content and "</think>" not in msg.content
    assert 8 <= r.usage.completion_tokens_details.reasoning_tokens <= 14
    chunks = list(thinking_client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed_reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_reasoning.strip() == reasoning and streamed.strip() == msg.content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens
    # Thinking off: the template pre-fills an empty block, and nothing is reasoning.
    off = thinking_client.chat.completions.create(**{**kw, "extra_body": {"enable_thinking": False}})
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {}) and off.usage.completion_tokens_details.reasoning_tokens == 0


def test_structured_output_with_thinking_on(thinking_client):
    """response_format with thinking on: the reasoning is kept, the content validates."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"], "additionalProperties": False}
    r = thinking_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=80,
        temperature=1.0,
        seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        extra_body={"enable_thinking": True, "max_reasoning_tokens": 16},
    )
    assert r.choices[0].message.model_extra["reasoning_content"]
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
