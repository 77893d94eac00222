"""Constrained sampling (llguidance token masks in the engine) and per-token log-probabilities,
through the Python API, with the real SmolLM2-135M model."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import smolcandle
from smolcandle.chat import parse_tool_call, tool_call_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def test_json_schema_holds_at_high_temperature(smollm2):
    for seed in range(5):
        r = smollm2.chat([{"role": "user", "content": "Describe a user as JSON."}], json_schema=PERSON, temperature=1.5, seed=seed, max_tokens=80, stream=False)
        assert r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.content), PERSON)


def test_regex_and_lark_grammars(smollm2):
    s = smollm2.generate("Is the sky blue? Answer:", regex=r" ?(yes|no)", temperature=1.0, seed=3, max_tokens=8)
    assert re.fullmatch(r" ?(yes|no)", "".join(c.text for c in s)) and s.finish_reason == "stop"
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/\n'
    s = smollm2.generate("2 + 2 =", grammar=lark, temperature=1.0, seed=1, max_tokens=16)
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", "".join(c.text for c in s)), s.finish_reason


def test_a_length_limit_is_reported_not_hidden(smollm2):
    s = smollm2.generate("A user as JSON:", json_schema=PERSON, temperature=0, max_tokens=4)
    text = "".join(c.text for c in s)
    assert s.finish_reason == "length" and text.startswith("{")


def test_forced_tool_call_follows_the_tool_schema(smollm2):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]},
        },
    }
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    msgs = [{"role": "user", "content": "What is the weather in Lyon?"}]
    r = smollm2.chat(msgs, tools=[weather, clock], grammar=tool_call_grammar([weather, clock], "get_weather"), temperature=1.0, seed=2, max_tokens=60, stream=False)
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1, r
    call = r.tool_calls[0]
    assert call.name == "get_weather"
    jsonschema.validate(call.arguments, weather["function"]["parameters"])
    with pytest.raises(smolcandle.InvalidParameterError, match="tool_choice"):
        tool_call_grammar([weather], "nope")
    assert parse_tool_call(json.dumps({"name": "get_time", "arguments": {}})).name == "get_time"


def test_bad_grammars_are_refused_naming_the_parameter(smollm2):
    for kwargs, param in (
        ({"json_schema": {"type": "nope"}}, "json_schema"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"grammar": "start: undefined_rule"}, "grammar"),
        ({"regex": "(unclosed"}, "regex"),
        ({"json_schema": {"type": "object"}, "regex": "x"}, "regex"),
        ({"logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(smolcandle.InvalidParameterError, match=param):
            smollm2.generate("x", **kwargs)


def test_logprobs_are_the_models_own(smollm2):
    prompt = smollm2.tokenize("The capital of France is")
    s = smollm2.generate(prompt, temperature=0, max_tokens=6, logprobs=3)
    chunks = list(s)
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == [t for c in chunks for t in c.token_ids]
    for lp in lps:
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0][0] == lp.token_id  # greedy
        assert lp.logprob <= 0 and lp.top_logprobs[0][1] >= lp.top_logprobs[1][1] >= lp.top_logprobs[2][1]
    # The first token's distribution equals log_softmax of the last prompt position's logits.
    row = smollm2.logits(prompt)[-1].astype(np.float64)
    log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
    assert abs(lps[0].logprob - log_softmax[lps[0].token_id]) < 1e-4
    top = np.argsort(-log_softmax, kind="stable")[:3]
    assert [t for t, _ in lps[0].top_logprobs] == list(top)
    assert all(c.logprobs == [] for c in smollm2.generate(prompt, temperature=0, max_tokens=3))
