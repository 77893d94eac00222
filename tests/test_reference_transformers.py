"""The smollm3 architecture against Hugging Face transformers' SmolLM3ForCausalLM: logits of
the F32 fixtures at every position of a 64-token sequence (tests/data, written by
scripts/make_references.py)."""

from __future__ import annotations

import numpy as np
import pytest
import smolcandle

from models import ROOT

REFS = np.load(ROOT / "tests" / "data" / "fixtures_transformers.npz")


@pytest.mark.parametrize("name", ["gqa-f32", "mqa-f32", "kq-f32"])
def test_logits_match_transformers(fixture_path, name):
    ids = REFS[f"{name}/ids"].tolist()
    expected = REFS[f"{name}/logits"]
    model = smolcandle.Model.load(fixture_path(name))
    got = model.logits(ids)
    assert got.shape == (64, model.n_vocab) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_nope_layers_are_what_makes_the_match(fixture_path):
    """The same weights with RoPE in every layer (the file's no_rope_layers list all 1s) no
    longer match: the NoPE layers are really skipping rotary embeddings."""
    ids = REFS["gqa-f32/ids"].tolist()
    model = smolcandle.Model.load(fixture_path("gqa-f32-allrope"))
    assert model.config["use_rope"] == [True] * 4
    assert smolcandle.Model.load(fixture_path("gqa-f32")).config["use_rope"] == [True, True, True, False]
    assert np.abs(model.logits(ids) - REFS["gqa-f32/logits"]).max() > 1.0


def test_single_kv_head_and_separate_output_load(fixture_path):
    model = smolcandle.Model.load(fixture_path("mqa-f32"))
    assert model.config["n_head_kv"] == 1
    assert model.config["tied_embeddings"] is False


YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}


def test_yarn_matches_transformers_past_the_training_window(fixture_path):
    """The fixture says it was trained on 32 positions and reaches 64 with YaRN (the
    rope-scaling keys llama.cpp's converter writes); the 64-token sequence runs half of it past
    the window. transformers' reference is SmolLM3ForCausalLM with the same rope_scaling."""
    ids = REFS["gqa-f32-yarn/ids"].tolist()
    expected = REFS["gqa-f32-yarn/logits"]
    model = smolcandle.Model.load(fixture_path("gqa-f32-yarn"))
    assert model.config["rope_scaling"]["factor"] == 2.0
    assert model.config["rope_scaling"]["original_max_position_embeddings"] == 32
    assert model.config["max_context"] == model.n_ctx == 64
    got = model.logits(ids)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)

    # Plain RoPE on the same weights is far from it: YaRN is what makes the match.
    plain = smolcandle.Model.load(fixture_path("gqa-f32")).logits(ids)
    assert np.abs(plain[32:] - expected[32:]).max() > 1.0

    # The load option gives the file's keys' model bit for bit.
    asked = smolcandle.Model.load(fixture_path("gqa-f32"), rope_scaling=YARN, n_ctx=64)
    assert asked.config["rope_scaling"] == model.config["rope_scaling"]
    np.testing.assert_array_equal(asked.logits(ids), got)


@pytest.mark.parametrize(
    ("rope_scaling", "says"),
    [
        ({"rope_type": "linear", "factor": 2.0}, "not supported"),
        ({"factor": 2.0}, "rope_type"),
        ({"rope_type": "yarn"}, "factor"),
        ({"rope_type": "yarn", "factor": 0.5}, "at least 1"),
        ({"rope_type": "yarn", "factor": "2"}, "a number"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": -1}, "negative"),
        ({"rope_type": "yarn", "factor": 2.0, "mscale": 0.7}, "mscale"),
        ("yarn", "a dict"),
    ],
)
def test_bad_rope_scaling_is_refused_by_name(fixture_path, rope_scaling, says):
    with pytest.raises(smolcandle.errors.InvalidParameterError, match=says) as e:
        smolcandle.Model.load(fixture_path("gqa-f32"), rope_scaling=rope_scaling)
    assert e.value.param == "rope_scaling"
