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


def assert_batch_logits_match(model, runs, *, max_tol: float, median_tol: float) -> None:
    """Over each run's prompt and continuation evaluated as one batch, at every position, our
    logits of llama.cpp's 8 most likely tokens are its logits: no position is more than
    ``max_tol`` of the logits' standard deviation off, half of them no more than ``median_tol``,
    and where llama.cpp's choice is clear (a margin over 0.5) it is ours. Quantized products
    re-quantize their input, so last-bit differences in any kernel's summation order move the
    logits by tenths a few layers later; a broken layer moves them by whole units."""
    for run in runs:
        batch = run["batch"]
        ours = model.logits(batch["ids"])
        scale = float(ours.std())
        diffs = []
        for pos, (ids, theirs) in enumerate(zip(batch["top_ids"], batch["top_logits"])):
            diffs.append(float(np.abs(ours[pos, ids] - np.asarray(theirs)).max()))
            if theirs[0] - theirs[1] > 0.5:
                assert int(np.argmax(ours[pos])) == ids[0], (pos, theirs[:2])
        worst = int(np.argmax(diffs))
        assert diffs[worst] <= max_tol * scale, f"position {worst}: {diffs[worst]:.4f} off (logits' std {scale:.2f})"
        assert float(np.median(diffs)) <= median_tol * scale, (float(np.median(diffs)), scale)


def test_smollm2_logits_match_llamacpp_at_every_position(smollm2, smollm2_refs):
    """llama.cpp's logits (this build's, see the file's ``batch_llama_cpp_build``) over each
    greedy run's prompt and answer as one batch: seen when written, at most 0.14 and in the
    median 0.04 of the logits' standard deviation (1.1 and 0.3 logits)."""
    runs = smollm2_refs["greedy"]
    assert sum(len(r["batch"]["ids"]) for r in runs) >= 340
    assert_batch_logits_match(smollm2, runs, max_tol=0.2, median_tol=0.06)


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


QUANTIZED = ["gqa-q8_0", "gqa-q4_0", "mqa-q8_0", "kq-q4_k_m", "kq-q6_k"]


@pytest.mark.parametrize("name", QUANTIZED)
def test_fixture_is_the_one_the_references_were_computed_on(fixture_path, fixture_refs, name):
    from models import make_fixtures

    assert make_fixtures.tensor_digest(fixture_path(name)) == fixture_refs["tensor_sha256"][name], (
        f"{name} is not the file its references came from: run scripts/make_references.py"
    )


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_smollm3_fixture_greedy_matches_llamacpp(fixture_path, fixture_refs, name):
    model = smolcandle.Model.load(fixture_path(name))
    runs = fixture_refs["greedy"][name]
    assert_greedy_matches_until_a_near_tie(model, runs)


def assert_greedy_matches_until_a_near_tie(model, runs) -> None:
    """Logits match at every position of the batch, and free-running greedy generation gives
    llama.cpp's tokens up to its first near-tie."""
    # Seen when written: at most 0.046 and in the median 0.018 of the logits' std.
    assert_batch_logits_match(model, runs, max_tol=0.1, median_tol=0.03)
    for run in runs:
        stream = model.generate(run["prompt_ids"], max_tokens=64, temperature=0, ignore_eos=True)
        ours = [t for chunk in stream for t in chunk.token_ids]
        ties = [i for i, m in enumerate(run["margins"]) if m < NEAR_TIE]
        safe = ties[0] if ties else len(run["tokens"])
        assert ours[:safe] == run["tokens"][:safe]
