"""Reasoning end to end with the engine's real output: ``<think>`` blocks parsed into reasoning
events, the reasoning budget the engine enforces, and structured output that applies from the
end of the reasoning. SmolLM2 knows no thinking, so it is driven there: by a grammar that writes
the block, or by a chat template that opens it (tests/data/thinking_chatml.jinja), in which case
the engine closes it when the budget runs out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import smolcandle
from smolcandle.chat import ChatDone, ContentDelta, ReasoningDelta, tool_call_grammar

from models import smollm2_path

DATA = Path(__file__).parent / "data"
THINKING_TEMPLATE = (DATA / "thinking_chatml.jinja").read_text()
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def thinker() -> smolcandle.Model:
    """SmolLM2 under a template with a thinking switch that opens the reasoning block."""
    model = smolcandle.Model.load(smollm2_path(), n_threads=2, n_ctx=2048, chat_template=THINKING_TEMPLATE)
    yield model
    model.close()


def reasoning_tokens(model: smolcandle.Model, text: str) -> int:
    return len(model.tokenize(text, add_bos=False, special=False))


def test_a_think_block_the_engine_writes_becomes_reasoning_events(smollm2):
    """A grammar makes the model write a <think> block and then an answer: the stream's text,
    parsed as it arrives, gives reasoning events, then content events."""
    grammar = 'start: "<think>" /[a-z ]{12,60}/ "</think>" /[A-Z][a-z ,]{8,60}/'
    events = list(smollm2.chat(QUESTION, grammar=grammar, temperature=0.7, seed=3, max_tokens=80))
    kinds = [type(e) for e in events if isinstance(e, (ReasoningDelta, ContentDelta))]
    assert kinds[0] is ReasoningDelta and kinds[-1] is ContentDelta
    assert kinds.index(ContentDelta) > 0 and ReasoningDelta not in kinds[kinds.index(ContentDelta) :]
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert re.fullmatch(r"[a-z ]+", reasoning.strip())
    assert "<think>" not in content and "</think>" not in content and content.strip()[0].isupper()
    assert isinstance(events[-1], ChatDone) and events[-1].finish_reason == "stop"


def test_the_template_says_whether_thinking_switches(smollm2, thinker):
    assert thinker.chat_template.has_thinking_switch
    assert not smollm2.chat_template.has_thinking_switch
    assert thinker.render_chat(QUESTION).endswith("<|im_start|>assistant\n<think>\n")
    assert thinker.render_chat(QUESTION, enable_thinking=False).endswith("<think>\n\n</think>\n")


@pytest.mark.parametrize("budget", [4, 16])
def test_the_reasoning_budget_closes_the_block_and_the_answer_follows(thinker, budget):
    """However the model would go on, the reasoning holds at most ``budget`` tokens; then the
    engine closes the block and the model answers."""
    prompts = ["Explain how a bicycle stays upright.", "Describe the water cycle in detail.", "What is the capital of France?"]
    streams = [
        thinker.chat([{"role": "user", "content": p}], max_reasoning_tokens=budget, max_tokens=budget + 48, temperature=0.8, seed=seed)
        for seed, p in enumerate(prompts * 2)
    ]
    for stream in streams:
        result = stream.collect()
        assert result.reasoning, "the answer opened inside the reasoning block"
        assert reasoning_tokens(thinker, result.reasoning) <= budget
        assert result.usage.reasoning_tokens <= budget + 6  # and the closing tag's few tokens
        if result.usage.reasoning_tokens >= budget:  # the budget, not the model, ended it
            assert result.content, f"no answer after the reasoning: {result}"


def test_without_a_budget_reasoning_runs_its_course(thinker):
    result = thinker.chat(QUESTION, max_tokens=24, temperature=0.8, seed=1, stream=False)
    assert result.reasoning and result.usage.reasoning_tokens >= min(result.usage.completion_tokens, 24) - 1


def _sampled(model, n: int, **kwargs):
    # Started together, the engine batches them.
    streams = [model.chat(QUESTION, enable_thinking=True, temperature=1.0, seed=seed, stream=True, **kwargs) for seed in range(n)]
    return [s.collect() for s in streams]


@pytest.mark.parametrize("which", ["smollm2", "thinker"])
def test_a_json_schema_applies_after_free_reasoning(smollm2, thinker, which):
    """Thinking on with a schema: 20 sampled answers at temperature 1.0 each reason in free
    text, then give JSON that validates. SmolLM2's template has no thinking switch, so the block
    is opened for it; the thinking template opens it itself."""
    model = smollm2 if which == "smollm2" else thinker
    for result in _sampled(model, 20, json_schema=CITY, max_tokens=160, max_reasoning_tokens=32):
        assert result.reasoning.strip(), result
        assert result.finish_reason == "stop", result
        jsonschema.validate(json.loads(result.content), CITY)
        assert reasoning_tokens(model, result.reasoning) <= 32


def test_a_forced_tool_call_applies_after_free_reasoning(smollm2):
    """Thinking on with a forced tool call: 20 sampled answers reason, then call the tool with
    arguments that follow its schema."""
    grammar = tool_call_grammar([WEATHER], "get_weather")
    for result in _sampled(smollm2, 20, tools=[WEATHER], grammar=grammar, max_tokens=160, max_reasoning_tokens=32):
        assert result.reasoning.strip(), result
        assert result.finish_reason == "tool_calls", result
        (call,) = result.tool_calls
        assert call.name == "get_weather"
        jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])


def test_with_a_constraint_the_reasoning_cannot_end_the_turn(thinker):
    """The model may not stop inside its reasoning when a constrained answer is due; without a
    budget given, half of max_tokens is the reasoning's."""
    for result in _sampled(thinker, 6, json_schema=CITY, max_tokens=120):
        assert result.finish_reason == "stop" and result.reasoning
        jsonschema.validate(json.loads(result.content), CITY)
        assert reasoning_tokens(thinker, result.reasoning) <= 60


def test_the_engine_feeds_the_closing_tag_at_the_budget(smollm2):
    """At the budget the engine feeds the closing tag's tokens itself, right after the budget's
    last token; the generation goes on after it."""
    prompt = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    stream = smollm2.generate(prompt, reasoning=True, max_reasoning_tokens=5, max_tokens=24, temperature=0, ignore_eos=True)
    chunks = list(stream)
    ids = [t for c in chunks for t in c.token_ids]
    closing = smollm2.tokenize("\n</think>\n\n", add_bos=False)
    assert ids[5 : 5 + len(closing)] == closing and len(ids) == 24
    assert stream.usage.reasoning_tokens == 5 + closing.index(smollm2.tokenize(">", add_bos=False)[0]) + 1
    plain = smollm2.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True)
    assert [t for c in plain for t in c.token_ids][:5] == ids[:5]  # the same model until then
