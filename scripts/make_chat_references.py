#!/usr/bin/env python3
"""Renders conversations with transformers' ``apply_chat_template`` (tokenize=False) and writes
the prompts to tests/data/chat_templates.json, for the test that our renderer gives the same text.

Templates: SmolLM2-135M-Instruct's (read from its GGUF), our SmolLM3-style template
(tests/data/smollm3_style.jinja: reasoning on, off, by flag in the system message, tools,
multi-turn) and a training-style one (tests/data/generation_style.jinja: {% generation %}
blocks, dict(), namespace(), loop controls, tojson's options). ``strftime_now`` is pinned to a
fixed date.

    python scripts/make_chat_references.py [--smollm2 PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

Needs transformers, tokenizers and gguf.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FIXED_NOW = "2026-03-14T09:26:53"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]},
    },
}
TOOL_TURNS = [
    {"role": "user", "content": "What's the weather in Lyon?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
]
MULTI = [
    {"role": "user", "content": "Hi, I'm Ada."},
    {"role": "assistant", "content": "Hello Ada! How can I help?"},
    {"role": "user", "content": "What's 2+2? Answer with `code` and <b>tags</b>."},
]


def cases() -> list[dict]:
    sys_msg = {"role": "system", "content": "You are terse."}
    out = []
    for name, msgs in [("single", MULTI[:1]), ("system", [sys_msg, *MULTI[:1]]), ("multi", [sys_msg, *MULTI]), ("unicode", [{"role": "user", "content": "Ça va ? 你好 🎉\n\n  indented"}])]:
        out.append({"template": "smollm2", "name": name, "messages": msgs, "kwargs": {}, "add_generation_prompt": True})
    out.append({"template": "smollm2", "name": "no-generation-prompt", "messages": MULTI[:2], "kwargs": {}, "add_generation_prompt": False})
    s3 = [
        ("default", [*MULTI], {}),
        ("thinking-on", [*MULTI], {"enable_thinking": True}),
        ("thinking-off", [*MULTI], {"enable_thinking": False}),
        ("system-no-think", [{"role": "system", "content": "Be brief. /no_think"}, *MULTI], {}),
        ("system-think-overrides-flag", [{"role": "system", "content": "/think Be thorough."}, *MULTI], {"enable_thinking": False}),
        ("xml-tools", [*TOOL_TURNS], {"xml_tools": [WEATHER["function"]]}),
        ("tools-argument", [*TOOL_TURNS[:1]], {"tools": [WEATHER]}),
        ("python-tools", [*MULTI[:1]], {"python_tools": ["def add(a: int, b: int) -> int: ..."], "enable_thinking": False}),
        ("history-with-reasoning", [MULTI[0], {"role": "assistant", "content": "Hi!", "reasoning_content": "greet back"}, MULTI[2]], {"enable_thinking": False}),
    ]
    for name, msgs, kw in s3:
        out.append({"template": "smollm3_style", "name": name, "messages": msgs, "kwargs": kw, "add_generation_prompt": True})
    gen = [
        ("generation-blocks", [sys_msg, *MULTI[:2], MULTI[2]], {}, True),
        ("generation-tools", [*TOOL_TURNS, {"role": "assistant", "content": "It is 21 and clear in Lyon."}], {"tools": [WEATHER]}, False),
        ("generation-no-system", [*MULTI[:2]], {}, False),
    ]
    for name, msgs, kw, prompt in gen:
        out.append({"template": "generation_style", "name": name, "messages": msgs, "kwargs": kw, "add_generation_prompt": prompt})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, default=Path.home() / ".cache" / "smolcandle" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()

    import gguf
    import tokenizers
    import transformers
    import transformers.utils.chat_template_utils as ctu
    from transformers import PreTrainedTokenizerFast

    class FixedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromisoformat(FIXED_NOW)

    ctu.datetime = FixedDatetime  # strftime_now reads ctu.datetime.now()

    reader = gguf.GGUFReader(args.smollm2)
    field = reader.fields["tokenizer.chat_template"]
    smollm2_template = bytes(field.parts[field.data[0]]).decode()
    templates = {
        "smollm2": (smollm2_template, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
        "smollm3_style": ((DATA / "smollm3_style.jinja").read_text(), {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
        "generation_style": ((DATA / "generation_style.jinja").read_text(), {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
    }
    out = []
    for case in cases():
        source, special = templates[case["template"]]
        tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()), **special)
        kwargs = dict(case["kwargs"])
        tools = kwargs.pop("tools", None)
        text = tok.apply_chat_template(
            case["messages"], tools=tools, chat_template=source, tokenize=False,
            add_generation_prompt=case["add_generation_prompt"], **kwargs,
        )
        out.append({**case, "special_tokens": special, "expected": text})
    (DATA / "chat_templates.json").write_text(json.dumps(
        {"transformers_version": transformers.__version__, "now": FIXED_NOW, "smollm2_template": smollm2_template, "cases": out},
        ensure_ascii=False, indent=1))
    print(f"{len(out)} rendered conversations")


if __name__ == "__main__":
    main()
