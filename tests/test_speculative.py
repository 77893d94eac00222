"""Speculative decoding with the real SmolLM2-135M: drafts from the prompt and from a grammar,
verified in one step, never change the output (greedy, sampled with a seed, constrained), and
are counted in the usage and the engine's counters."""

from __future__ import annotations

import json

import pytest
import smolcandle

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper "
    "climbed the narrow stairs, trimmed the wick and wound the clockwork that turned the great lens, so that "
    "ships passing in the dark could find their way around the rocks."
)
REWRITE = [{"role": "user", "content": f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"}]


@pytest.fixture(scope="module")
def models(smollm2_file):
    on = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0)
    off = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0, speculative=False)
    return on, off


def _run(model, messages, **kw):
    stream = model.generate(model.render_chat(messages), **kw)
    ids = [t for chunk in stream for t in chunk.token_ids]
    return ids, stream.usage


def test_it_is_on_by_default_and_a_load_option_turns_it_off(models):
    on, off = models
    assert on.speculation["enabled"] == 1
    assert off.speculation == {"enabled": 0, "drafted_tokens": 0, "accepted_tokens": 0, "steps": 0}
    with pytest.raises(smolcandle.InvalidParameterError, match="speculative"):
        smolcandle.Model.load(on.path, speculative="yes")


def test_greedy_output_is_plain_decoding_token_for_token(models):
    on, off = models
    before = dict(on.speculation)
    a, usage = _run(on, REWRITE, max_tokens=96, temperature=0)
    b, plain = _run(off, REWRITE, max_tokens=96, temperature=0)
    assert a == b
    assert plain.drafted_tokens == plain.accepted_tokens == 0
    # Copying the prompt's paragraph, most drafts are kept.
    assert usage.accepted_tokens > 20 and usage.drafted_tokens >= usage.accepted_tokens, usage
    after = on.speculation
    assert after["drafted_tokens"] - before["drafted_tokens"] == usage.drafted_tokens
    assert after["accepted_tokens"] - before["accepted_tokens"] == usage.accepted_tokens
    assert usage.to_dict()["accepted_tokens"] == usage.accepted_tokens


def test_a_q8_0_cache_keeps_drafting_and_plain_decodings_output(smollm2_file):
    """Q8_0 keys and values are quantized row by row, so verifying a draft reads the same
    cache that one-by-one decoding writes: drafts stay on, and the output is plain decoding's."""
    on = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0, kv_cache_dtype="q8_0")
    off = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0, kv_cache_dtype="q8_0", speculative=False)
    assert on.speculation["enabled"] == 1
    a, usage = _run(on, REWRITE, max_tokens=96, temperature=0)
    assert a == _run(off, REWRITE, max_tokens=96, temperature=0)[0]
    assert usage.accepted_tokens > 20, usage


def test_sampled_output_is_plain_decodings_with_the_same_seed(models):
    on, off = models
    for seed in (1, 2, 3):
        a, usage = _run(on, REWRITE, max_tokens=64, temperature=0.7, top_p=0.95, seed=seed)
        b, _ = _run(off, REWRITE, max_tokens=64, temperature=0.7, top_p=0.95, seed=seed)
        assert a == b, seed
    assert usage.drafted_tokens > 0


def test_a_grammar_drafts_the_tokens_it_forces(models):
    on, off = models
    schema = {
        "type": "object",
        "properties": {"keeper_duty": {"type": "string"}, "years": {"type": "integer"}},
        "required": ["keeper_duty", "years"],
    }
    ask = [{"role": "user", "content": f"{PARAGRAPH}\n\nAnswer in JSON: what did the keeper do, and for how many years did the lighthouse stand?"}]
    a = on.chat(ask, stream=False, max_tokens=96, temperature=0, json_schema=schema)
    b = off.chat(ask, stream=False, max_tokens=96, temperature=0, json_schema=schema)
    assert a.content == b.content
    assert set(json.loads(a.content)) == {"keeper_duty", "years"}
    assert a.usage.accepted_tokens > 0, a.usage


def test_log_probabilities_are_plain_decodings(models):
    on, off = models

    def run(model):
        stream = model.generate(model.render_chat(REWRITE), max_tokens=48, temperature=0, logprobs=2)
        return [(lp.token_id, lp.logprob, lp.top_logprobs) for c in stream for lp in c.logprobs], stream.usage

    a, usage = run(on)
    b, _ = run(off)
    assert a == b
    assert usage.accepted_tokens > 0
