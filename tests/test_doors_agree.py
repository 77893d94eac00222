"""One conversation through every door, with each door's official client unchanged: OpenAI's
chat completions and Responses API, Anthropic's Messages API, Ollama's chat. Greedy, they give
the same text, since every door hands the same conversation to the one generation service;
and each request has its line in the server's access log."""

from __future__ import annotations

import re

import anthropic
import ollama
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct.Q4_1"
MAX_TOKENS = 24
FIRST = "My name is Ada and I live in Lisbon."
REPLY = "Nice to meet you, Ada! Lisbon is a beautiful city."
SECOND = "Where do I live? Answer in one sentence."


@pytest.fixture(scope="module")
def answers(chat_server) -> dict[str, str]:
    url = chat_server.url
    gpt = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    claude = anthropic.Anthropic(base_url=url, api_key="unused")
    llama = ollama.Client(host=url)
    turns = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": REPLY}, {"role": "user", "content": SECOND}]
    out = {}
    chat = gpt.chat.completions.create(model=MODEL, messages=turns, max_tokens=MAX_TOKENS, temperature=0)
    out["/v1/chat/completions"] = chat.choices[0].message.content
    responses_input = [
        {"role": "user", "content": FIRST},
        {"role": "assistant", "content": [{"type": "output_text", "text": REPLY}]},
        {"role": "user", "content": SECOND},
    ]
    response = gpt.responses.create(model=MODEL, input=responses_input, max_output_tokens=MAX_TOKENS, temperature=0, store=False)
    out["/v1/responses"] = response.output_text
    message = claude.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=turns, extra_body={"temperature": 0})
    out["/v1/messages"] = "".join(b.text for b in message.content if b.type == "text")
    reply = llama.chat(model=MODEL, messages=turns, options={"num_predict": MAX_TOKENS, "temperature": 0})
    out["/api/chat"] = reply.message.content
    return out


def test_greedy_answers_are_the_same_text_through_every_door(answers):
    assert answers["/v1/chat/completions"].strip(), answers
    assert len(set(answers.values())) == 1, answers


def test_each_door_logs_its_request_with_tokens_and_time_to_first_token(answers, chat_server):
    lines = chat_server.log.read_text().splitlines()
    for path in answers:
        logged = [x for x in lines if f'"POST {path}" 200 ' in x]
        assert logged, f"no access-log line for {path}"
        assert re.search(r"prompt_tokens=\d+ completion_tokens=[1-9]\d* ttft_s=\d", logged[-1]), logged[-1]
