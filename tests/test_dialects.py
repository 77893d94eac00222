"""The dialects other clients speak, through their official packages, unchanged, against
``smolcandle serve`` with the real SmolLM2-135M: Anthropic's Messages API (``anthropic``), OpenAI's
Responses API and the rest of ``/v1`` (``openai``), and LiteLLM through ``openai/…``. Thinking
runs on SmolLM2 under the thinking test template (tests/data/thinking_chatml.jinja), whose
reasoning block the engine closes at the budget."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import litellm
import openai
import pytest
from server import Server

from models import ROOT, smollm2_path

MODEL = "SmolLM2-135M-Instruct.Q4_1"
FRANCE = "What is the capital of France?"
KEY = "test-key-1234"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def claude(chat_server):
    return anthropic.Anthropic(base_url=chat_server.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """SmolLM2 under a template with a thinking switch, greedy, guarded by an API key."""
    srv = Server(
        smollm2_path(),
        tmp_path_factory.mktemp("thinking"),
        "--temperature",
        "0",
        "--max-tokens",
        "96",
        "--chat-template",
        str(ROOT / "tests" / "data" / "thinking_chatml.jinja"),
        env={"SMOLCANDLE_API_KEY": KEY},
    )
    yield srv
    srv.stop()


# -- Anthropic's Messages API --------------------------------------------------------------------


def test_messages_create_answers_with_a_text_block_and_usage(claude):
    r = claude.messages.create(model=MODEL, max_tokens=40, system="You are a helpful assistant.", messages=[{"role": "user", "content": FRANCE}])
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert [b.type for b in r.content] == ["text"] and "Paris" in r.content[0].text
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens > 10 and 0 < r.usage.output_tokens <= 40


def test_messages_stream_gives_the_same_answer_in_anthropics_event_order(claude, chat_server):
    body = {"model": MODEL, "max_tokens": 40, "system": [{"type": "text", "text": "You are a helpful assistant."}], "messages": [{"role": "user", "content": FRANCE}]}
    whole = claude.messages.create(**body)
    with claude.messages.stream(**body) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    with httpx.stream("POST", chat_server.url + "/v1/messages", json={**body, "stream": True}, timeout=60) as r:
        events = [line[len("event: ") :] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "ping", "content_block_start"], events
    assert set(events[3:-3]) == {"content_block_delta"} and events[-3:] == ["content_block_stop", "message_delta", "message_stop"], events


def test_a_forced_tool_use_follows_the_schema_and_its_result_is_answered(claude):
    tool = {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_SCHEMA}
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    r = claude.messages.create(model=MODEL, max_tokens=80, tools=[tool], tool_choice={"type": "tool", "name": "get_weather"}, messages=[ask])
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER_SCHEMA)
    back = [ask, {"role": "assistant", "content": r.content}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}]}]
    after = claude.messages.create(model=MODEL, max_tokens=60, tools=[tool], messages=back)
    assert after.content and after.stop_reason in ("end_turn", "tool_use")
    with claude.messages.stream(model=MODEL, max_tokens=80, tools=[tool], tool_choice={"type": "any"}, messages=[ask]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    jsonschema.validate(final.content[-1].input, WEATHER_SCHEMA)


def test_stop_sequences_and_max_tokens_are_the_stop_reason(claude):
    stopped = claude.messages.create(model=MODEL, max_tokens=40, stop_sequences=["Paris"], messages=[{"role": "user", "content": FRANCE}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris" and "Paris" not in stopped.content[0].text
    cut = claude.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Write a long poem about the sea."}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_count_tokens_counts_what_create_sends_and_the_tenant_reuses_the_prefix(claude):
    text = "You are a helpful assistant who answers in one sentence. " * 4
    system = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": FRANCE}]
    counted = claude.messages.count_tokens(model=MODEL, system=system, messages=messages).input_tokens
    first = claude.messages.create(model=MODEL, max_tokens=16, system=system, messages=messages)
    assert counted == first.usage.input_tokens + first.usage.cache_read_input_tokens
    # Reused within the tenant (this address) without a breakpoint.
    again = claude.messages.create(model=MODEL, max_tokens=16, system=text, messages=[{"role": "user", "content": "And of Spain?"}])
    assert again.usage.cache_read_input_tokens > 40


def test_bad_input_is_a_4xx_in_anthropics_shape(claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": e.value.body["error"]["message"]}}
    assert e.value.body["error"]["message"].startswith("this model reads text only")
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": 1.5})
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"


def test_thinking_blocks_carry_the_reasoning_within_its_budget(thinking_server):
    claude = anthropic.Anthropic(base_url=thinking_server.url, api_key=KEY, max_retries=0)
    r = claude.messages.create(model=MODEL, max_tokens=96, thinking={"type": "enabled", "budget_tokens": 4}, messages=[{"role": "user", "content": FRANCE}])
    assert [b.type for b in r.content] == ["thinking", "text"], r.content
    assert r.content[0].thinking and r.content[1].text
    with claude.messages.stream(model=MODEL, max_tokens=96, thinking={"type": "enabled", "budget_tokens": 4}, messages=[{"role": "user", "content": FRANCE}]) as stream:
        kinds = [ev.delta.type for ev in stream if ev.type == "content_block_delta"]
        final = stream.get_final_message()
    assert kinds[0] == "thinking_delta" and "text_delta" in kinds and final.content[0].thinking.strip() == r.content[0].thinking
    off = claude.messages.create(model=MODEL, max_tokens=48, thinking={"type": "disabled"}, messages=[{"role": "user", "content": FRANCE}])
    assert [b.type for b in off.content] == ["text"]


def test_the_key_is_read_from_x_api_key_and_authorization(thinking_server):
    body = {"model": MODEL, "max_tokens": 4, "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(thinking_server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=30).status_code == 200
    assert httpx.post(thinking_server.url + "/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=thinking_server.url, api_key="wrong", max_retries=0).messages.create(**body)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"


# -- OpenAI: the Responses API ---------------------------------------------------------------------


def test_responses_create_whole_and_streamed(client):
    r = client.responses.create(model=MODEL, input=FRANCE, instructions="You are a helpful assistant.", temperature=0, max_output_tokens=40)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed" and "Paris" in r.output_text
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 40
    events = []
    with client.responses.stream(model=MODEL, input=FRANCE, instructions="You are a helpful assistant.", temperature=0, max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == r.output_text
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"], kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text


def test_a_follow_up_sends_only_its_new_input_and_reuses_the_prefix(client):
    first = client.responses.create(model=MODEL, input=FRANCE, instructions="You are a helpful assistant.", temperature=0, max_output_tokens=40)
    second = client.responses.create(model=MODEL, input="And of Germany?", previous_response_id=first.id, temperature=0, max_output_tokens=40)
    assert second.previous_response_id == first.id and "Berlin" in second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 10
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_stored_responses_belong_to_their_tenant(client, chat_server):
    mine = client.responses.create(model=MODEL, input="hi", max_output_tokens=8)
    # Another address on loopback is another tenant.
    other = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0, http_client=httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")))
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.BadRequestError):
        other.responses.create(model=MODEL, input="and?", previous_response_id=mine.id, max_output_tokens=8)
    assert client.responses.retrieve(mine.id).id == mine.id


def test_function_calling_through_responses(client):
    tool = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_SCHEMA}
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool], tool_choice="required", temperature=0, max_output_tokens=80)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    after = client.responses.create(
        model=MODEL,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}],
        tools=[tool],
        temperature=0,
        max_output_tokens=60,
    )
    assert after.status == "completed" and after.output
    with client.responses.stream(model=MODEL, input="Weather in Rome?", tools=[tool], tool_choice={"type": "function", "name": "get_weather"}, temperature=0, max_output_tokens=80) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    jsonschema.validate(json.loads(final.output[-1].arguments), WEATHER_SCHEMA)


def test_responses_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30}}, "required": ["capital"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input=FRANCE, text={"format": {"type": "json_schema", "name": "answer", "schema": schema}}, temperature=0, max_output_tokens=40)
    jsonschema.validate(json.loads(r.output_text), schema)


# -- OpenAI: the gaps ------------------------------------------------------------------------------


def test_models_retrieve(client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "smolcandle"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-5")
    assert e.value.body["code"] == "model_not_found"


def test_n_choices_are_decoded_together(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}], n=2, temperature=0.9, seed=7, max_tokens=24)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens <= 48 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}], n=2, temperature=0, max_tokens=24, stream=True)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and texts[0] == texts[1] and "Paris" in texts[0]  # greedy: the same answer twice
    done = client.completions.create(model=MODEL, prompt="The capital of France is", n=2, temperature=0, max_tokens=6)
    assert [c.index for c in done.choices] == [0, 1] and done.choices[0].text == done.choices[1].text


def test_an_image_part_is_refused_in_one_sentence(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    assert e.value.body["message"].startswith("this model reads text only")


def test_reasoning_effort_switches_thinking_and_its_budget(thinking_server):
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key=KEY, max_retries=0)
    ask = [{"role": "user", "content": FRANCE}]
    off = client.chat.completions.create(model=MODEL, messages=ask, reasoning_effort="none", max_tokens=48)
    assert not getattr(off.choices[0].message, "reasoning_content", None) and off.usage.completion_tokens_details.reasoning_tokens == 0
    low = client.chat.completions.create(model=MODEL, messages=ask, reasoning_effort="low", max_tokens=400)
    assert low.choices[0].message.reasoning_content and 0 < low.usage.completion_tokens_details.reasoning_tokens <= 257
    r = client.responses.create(model=MODEL, input=FRANCE, reasoning={"effort": "low"}, max_output_tokens=400)
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text and r.output[-1].type == "message"
    assert r.usage.output_tokens_details.reasoning_tokens > 0


def test_reasoning_effort_is_ignored_by_a_model_without_thinking(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}], reasoning_effort="high", temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content and r.usage.completion_tokens_details.reasoning_tokens == 0


# -- LiteLLM through openai/… ----------------------------------------------------------------------


def test_litellm_completion_and_responses(chat_server):
    base = chat_server.url + "/v1"
    r = litellm.completion(model=f"openai/{MODEL}", api_base=base, api_key="unused", messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    out = litellm.responses(model=f"openai/{MODEL}", api_base=base, api_key="unused", input=FRANCE, temperature=0, max_output_tokens=24)
    text = "".join(c.text for o in out.output if o.type == "message" for c in o.content)
    assert "Paris" in text
