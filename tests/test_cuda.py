"""The CUDA path: a build with ``--features cuda`` on a machine with a GPU gives the CPU's
answers. Skipped elsewhere; with SMOLCANDLE_TEST_CUDA=1 (set where a GPU is expected) a build
or device that cannot run CUDA fails instead of skipping."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import smolcandle
from test_reference_llamacpp import assert_greedy_matches_until_a_near_tie
from test_reference_transformers import REFS

REQUIRED = os.environ.get("SMOLCANDLE_TEST_CUDA") == "1"


@pytest.fixture(scope="module")
def cuda(fixture_path):
    """Loads a fixture on the GPU: ``cuda(name, **load_options)``."""
    try:
        smolcandle.Model.load(fixture_path("gqa-q8_0"), device="cuda").close()
    except smolcandle.DeviceError as e:
        if REQUIRED:
            raise
        pytest.skip(f"no CUDA here: {e}")

    def load(name: str, **kw) -> smolcandle.Model:
        model = smolcandle.Model.load(fixture_path(name), device="cuda", **kw)
        assert model.device == "cuda:0"
        return model

    return load


@pytest.mark.parametrize("name", ["gqa-f32", "mqa-f32", "kq-f32"])
def test_f32_logits_match_transformers(cuda, name):
    got = cuda(name).logits(REFS[f"{name}/ids"].tolist())
    np.testing.assert_allclose(got, REFS[f"{name}/logits"], atol=1e-3, rtol=0)


def test_nope_layers_skip_rope_on_cuda(cuda):
    ids = REFS["gqa-f32/ids"].tolist()
    assert np.abs(cuda("gqa-f32-allrope").logits(ids) - REFS["gqa-f32/logits"]).max() > 1.0


@pytest.mark.parametrize("name", ["gqa-q8_0", "gqa-q4_0", "mqa-q8_0", "kq-q4_k_m", "kq-q6_k"])
def test_quantized_fixture_greedy_matches_llamacpp(cuda, fixture_refs, name):
    assert_greedy_matches_until_a_near_tie(cuda(name), fixture_refs["greedy"][name])


@pytest.mark.parametrize(("name", "f32"), [("gqa-q8_0", "gqa-f32"), ("mqa-q8_0", "mqa-f32"), ("kq-q4_k_m", "kq-f32"), ("kq-q6_k", "kq-f32")])
def test_quantized_logits_as_close_to_the_unquantized_model_as_the_cpu(cuda, fixture_path, name, f32):
    """Candle's CUDA kernels quantize activations to Q8_1 blocks of 32 (llama.cpp's CUDA
    scheme) where the CPU uses Q8_0/Q8_K as llama.cpp's CPU backend does, so the two devices do
    not agree bit for bit. Each is measured against the unquantized weights' logits
    (transformers): the GPU is as close as the CPU, and the devices differ by less than the
    weights' own quantization error."""
    ids = REFS[f"{f32}/ids"].tolist()
    ref = REFS[f"{f32}/logits"]
    gpu = cuda(name).logits(ids)
    cpu = smolcandle.Model.load(fixture_path(name)).logits(ids)
    gpu_err, cpu_err = np.abs(gpu - ref).mean(), np.abs(cpu - ref).mean()
    between = np.abs(gpu - cpu).mean()
    print(f"{name}: mean |gpu - f32| {gpu_err:.4f}, |cpu - f32| {cpu_err:.4f}, |gpu - cpu| {between:.4f}")
    assert gpu_err < 1.2 * cpu_err, (gpu_err, cpu_err)
    assert between < cpu_err, (between, cpu_err)
    assert (gpu.argmax(-1) == ref.argmax(-1)).mean() >= (cpu.argmax(-1) == ref.argmax(-1)).mean() - 0.05


def test_batched_streams_and_f16_cache_give_the_solo_answers(cuda):
    """Streams opened together share each forward pass on the GPU too; with an F16 KV cache the
    greedy answers are those of each prompt run alone."""
    for kv in ("f32", "f16"):
        model = cuda("kq-q4_k_m", kv_cache_dtype=kv)
        assert model.kv_cache_dtype == kv
        prompts = [list(range(5 + i, 40 + 7 * i)) for i in range(5)]
        solo = [[t for c in model.generate(p, max_tokens=24, temperature=0, ignore_eos=True) for t in c.token_ids] for p in prompts]
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            stream = model.generate(prompts[i], max_tokens=24, temperature=0, ignore_eos=True)
            results[i] = [t for c in stream for t in c.token_ids]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [results[i] for i in range(len(prompts))] == solo
        model.close()
