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
