"""Our tokenizer and decoder against llama.cpp's outputs on the same GGUF files
(tests/data, written by scripts/make_references.py with llama-cpp-python)."""

from __future__ import annotations

import numpy as np
import pytest

import smolcandle

# llama.cpp's top-1 minus top-2 logit below which a greedy choice is a near-tie, for the
# quantized smollm3 fixtures: their products run through kernels whose summation orders are
# not all llama.cpp's (Candle's Q4_0, our Q8_0, Candle's and our K-quant ones), so their logits
# differ from its by last bits amplified through each layer's Q8 rounding, and either choice
# is as right as the other there. On SmolLM2 (Q4_1, Q8_0) a prompt's arithmetic is
# llama.cpp's and no tolerance is needed for it. The references come from llama.cpp with an F32 KV cache, as we run
# by default.
NEAR_TIE = 0.5


def test_tokenize_matches_llamacpp_on_smollm2(smollm2, smollm2_refs):
    cases = smollm2_refs["tokenize"]
    assert len(cases) >= 200
    mismatches = [(c["text"], smollm2.tokenize(c["text"], add_bos=False)) for c in cases if smollm2.tokenize(c["text"], add_bos=False) != c["ids"]]
    assert not mismatches, mismatches[:5]


def test_tokenize_matches_llamacpp_on_smollm3_vocabulary(fixture_path, fixture_refs):
    model = smolcandle.Model.load(fixture_path("gqa-f32"))
    cases = fixture_refs["tokenize"]
    mismatches = [c["text"] for c in cases if model.tokenize(c["text"], add_bos=False) != c["ids"]]
    assert not mismatches, mismatches[:5]


def test_detokenize_round_trips(smollm2, smollm2_refs):
    for c in smollm2_refs["tokenize"]:
        assert smollm2.detokenize(c["ids"]) == c["text"]


def teacher_forced(model, runs) -> tuple[int, int]:
    """Feeds llama.cpp's greedy continuations back: at every position our argmax must be
    llama.cpp's token, except where llama.cpp's own margin marks a near-tie. Returns the
    number of positions checked and skipped."""
    checked = near_ties = 0
    for run in runs:
        ids = run["prompt_ids"] + run["tokens"]
        logits = model.logits(ids)
        n_prompt = len(run["prompt_ids"])
        for step, (token, margin) in enumerate(zip(run["tokens"], run["margins"])):
            if margin < NEAR_TIE:
                near_ties += 1
                continue
            checked += 1
            ours = int(np.argmax(logits[n_prompt - 1 + step]))
            assert ours == token, f"prompt {run['prompt_ids'][:8]}… step {step}: {ours} != {token} (llama.cpp margin {margin})"
    return checked, near_ties


def test_smollm2_predicts_llamacpp_greedy_tokens(smollm2, smollm2_refs):
    """llama.cpp's greedy continuations of 6 prompts (4 chat-formatted), 64 tokens or to the
    end of the turn: 253 positions, of which 191 are clear-cut (seen when written)."""
    checked, near_ties = teacher_forced(smollm2, smollm2_refs["greedy"])
    assert checked >= 150, (checked, near_ties)


def test_smollm2_greedy_generation_matches_llamacpp(smollm2, smollm2_refs):
    """Free-running greedy generation gives llama.cpp's tokens on all 6 prompts, to the end of
    the turn or to a near-tie where the two choose differently. A prompt's arithmetic is
    llama.cpp's step for step (RMSNorm, RoPE, attention, SwiGLU, Q8 activations), and so is a
    generated token's except one sum: its attention adds the positions in the order llama.cpp
    takes for a batch of rows, not the one it takes for a single token, so that its keys and
    values are those a later prompt holding it computes (kernels/attention.rs). That moves
    last bits, which a near-tie can turn into another token (seen when written: 2 runs, at
    steps 28 and 55, margins 0.13 and 0.15; the other 4 runs equal to the end)."""
    matched = 0
    for run in smollm2_refs["greedy"]:
        stream = smollm2.generate(run["prompt_ids"], max_tokens=64, temperature=0)
        ours = [t for chunk in stream for t in chunk.token_ids]
        theirs = run["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        matched += same
        if same < len(theirs):
            assert run["margins"][same] < NEAR_TIE, (run["prompt"], same, ours[same], theirs[same])
        else:
            assert ours == theirs, run["prompt"]
    assert matched >= 200, matched


def test_smollm2_logits_equal_llamacpp_where_it_runs_the_same_batch(smollm2, smollm2_refs):
    """Over a prompt evaluated as one batch, as llama.cpp evaluated it, our logits are its logits:
    its top-1/top-2 margins come out the same to the stored 4 decimals."""
    for run in smollm2_refs["greedy"]:
        ids = run["prompt_ids"] + run["tokens"][:1]
        logits = smollm2.logits(ids)[len(run["prompt_ids"]) - 1]
        top2 = np.sort(logits)[-2:]
        assert int(np.argmax(logits)) == run["tokens"][0]
        assert round(float(top2[1] - top2[0]), 4) == pytest.approx(run["margins"][0], abs=1e-4), run["prompt"]


@pytest.mark.parametrize("name", ["gqa-q8_0", "gqa-q4_0", "mqa-q8_0", "kq-q4_k_m", "kq-q6_k"])
def test_quantized_smollm3_fixture_greedy_matches_llamacpp(fixture_path, fixture_refs, name):
    model = smolcandle.Model.load(fixture_path(name))
    runs = fixture_refs["greedy"][name]
    assert_greedy_matches_until_a_near_tie(model, runs)


def assert_greedy_matches_until_a_near_tie(model, runs) -> None:
    """Teacher-forced predictions match at every clear-cut position, and free-running greedy
    generation gives llama.cpp's tokens up to its first near-tie."""
    checked, near_ties = teacher_forced(model, runs)
    assert checked >= 64, (checked, near_ties)
    for run in runs:
        stream = model.generate(run["prompt_ids"], max_tokens=64, temperature=0, ignore_eos=True)
        ours = [t for chunk in stream for t in chunk.token_ids]
        ties = [i for i, m in enumerate(run["margins"]) if m < NEAR_TIE]
        safe = ties[0] if ties else len(run["tokens"])
        assert ours[:safe] == run["tokens"][:safe]
