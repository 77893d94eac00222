"""The engine's scheduler and prefix cache, seen from the outside: chunked prefill beside
running streams, cancellation, reuse of kept prefixes and their eviction, the F16 and Q8_0 caches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import smolcandle

from models import ROOT

# Most prompt tokens a step of the scheduler computes (limits::PREFILL_CHUNK).
PREFILL_CHUNK = smolcandle.DEFAULTS["prefill_chunk"]


def long_prompt(model: smolcandle.Model, n: int) -> list[int]:
    words = model.tokenize(" ".join(f"word{i}" for i in range(n)))
    assert len(words) >= n
    return words[:n]


def test_a_long_prompt_does_not_stall_running_streams(smollm2_file):
    """A prompt of four prefill chunks arrives while a stream is decoding: the stream keeps
    getting a token every step, beside each chunk, rather than waiting for the whole prefill."""
    model = smolcandle.Model.load(smollm2_file, n_ctx=2048, prefix_cache_mib=0)
    running = model.generate("Count from one to a hundred:", max_tokens=300, temperature=0, ignore_eos=True)
    arrivals: list[float] = []

    def read() -> None:
        for chunk in running:
            arrivals.extend(time.monotonic() for _ in chunk.token_ids)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while len(arrivals) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(arrivals) >= 3, "the first stream is decoding"
    prompt = long_prompt(model, 4 * PREFILL_CHUNK - 100)
    submitted = time.monotonic()
    late = model.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True)
    first = next(iter(late))
    first_at = time.monotonic()
    assert first.token_ids
    during = sum(1 for t in arrivals if submitted <= t < first_at)
    running.cancel()
    reader.join()
    # Four steps carry the four chunks and the running stream decodes in each; at least the
    # first three of its tokens come before the last chunk's step samples the new one's. (A
    # scheduler that computed the whole prompt in one step would leave room for the token of
    # the step under way when it arrived, and that step's.)
    assert during >= 3, f"{during} tokens of the running stream while a {len(prompt)}-token prompt was computed"


def test_cancel_during_a_chunked_prefill_gives_cancelled_and_no_tokens(smollm2_file):
    model = smolcandle.Model.load(smollm2_file, n_ctx=2048, prefix_cache_mib=0)
    stream = model.generate(long_prompt(model, 3 * PREFILL_CHUNK), max_tokens=8, temperature=0)
    stream.cancel()
    assert [c for c in stream] == []
    assert stream.finish_reason == "cancelled"
    # The engine goes on serving.
    assert list(model.generate("Hello", max_tokens=2, temperature=0, ignore_eos=True))


def run(model: smolcandle.Model, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy tokens for ``prompt``, and how many of its tokens came from the prefix cache."""
    stream = model.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)
    tokens = [t for c in stream for t in c.token_ids]
    assert stream.usage is not None
    return tokens, stream.usage.cached_tokens


def test_prefix_cache_evicts_the_least_recently_used_and_reuse_equals_a_cold_start(fixture_path):
    """On a K-quant model (only prompt positions are kept), with room for 256 positions:
    every answer equals a cold start's, a follow-up reuses its kept prefix, and the entry used
    longest ago is the one evicted. New parts are at least 24 tokens, so that the kept
    positions and a cold start's go through the same prompt kernels."""
    path = fixture_path("kq-q4_k_m")
    warm = smolcandle.Model.load(path, prefix_cache_mib=1)  # 4 layers x 2 x 2 heads x 64 x 4 B = 4 KiB a position
    cold = smolcandle.Model.load(path, prefix_cache_mib=0)
    rng = np.random.default_rng(5)

    def tokens(n: int) -> list[int]:
        return rng.integers(0, 500, n).tolist()

    a, b, c, x, y, z = tokens(100), tokens(100), tokens(100), tokens(30), tokens(30), tokens(30)
    steps = [  # prompt, tokens expected from the cache
        (a, 0),
        (b, 0),
        (a + x, 100),  # replaces the entry for a
        (c, 0),  # 330 positions: b, used longest ago, goes
        (a + x + z, 130),
        (b + y, 0),  # evicted
    ]
    for i, (prompt, cached) in enumerate(steps):
        ours, reused = run(warm, prompt)
        assert reused == cached, (i, warm.prefix_cache_stats)
        assert ours == run(cold, prompt)[0], i
    assert warm.prefix_cache_stats["evictions"] >= 2


def test_f16_cache_on_the_cpu_halves_the_memory_and_stays_close(fixture_path):
    """The F16 cache rounds keys, values, queries and attention weights to F16 (Candle's
    attention on the CPU): half the bytes of the F32 cache, and logits within F16's rounding of
    the F32 cache's, not equal to them."""
    path = fixture_path("gqa-f32")
    f32 = smolcandle.Model.load(path, prefix_cache_mib=0)
    f16 = smolcandle.Model.load(path, kv_cache_dtype="f16", prefix_cache_mib=0)
    assert (f32.kv_cache_dtype, f16.kv_cache_dtype) == ("f32", "f16")
    ids = np.random.default_rng(3).integers(0, 500, 64).tolist()
    a, b = f32.logits(ids), f16.logits(ids)
    diff = np.abs(a - b)
    assert 0 < diff.max() < 0.05 * a.std(), (diff.max(), a.std())
    assert (np.argmax(a, axis=1) == np.argmax(b, axis=1)).mean() > 0.9
    for model in (f32, f16):
        list(model.generate(ids, max_tokens=4, temperature=0, ignore_eos=True))
    assert f16.kv_cache_bytes["peak_bytes"] * 2 == f32.kv_cache_bytes["peak_bytes"]


def test_q8_0_cache_takes_a_quarter_of_the_memory_and_stays_close(smollm2_file):
    """The Q8_0 cache stores each row of keys and values as llama.cpp's 8-bit blocks (34 bytes
    for 32 values): 34/128 of the F32 cache's bytes, next-token predictions of real text as
    good as the F32 cache's, and the model stays batch-invariant, so a generated answer is
    reused as a prompt would be."""
    f32 = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0)
    q8 = smolcandle.Model.load(smollm2_file, kv_cache_dtype="q8_0")
    assert (f32.kv_cache_dtype, q8.kv_cache_dtype) == ("f32", "q8_0")
    ids = f32.tokenize((ROOT / "docs" / "design.md").read_text())[:300]
    a, b = f32.logits(ids), q8.logits(ids)
    assert not np.array_equal(a, b)
    assert (np.argmax(a, axis=1) == np.argmax(b, axis=1)).mean() > 0.9
    nll_a, nll_b = _nll(a, ids), _nll(b, ids)
    assert abs(nll_b - nll_a) < 0.01 * nll_a, (nll_a, nll_b)
    for model in (f32, q8):
        list(model.generate(ids[:64], max_tokens=4, temperature=0, ignore_eos=True))
    assert q8.kv_cache_bytes["peak_bytes"] * 128 == f32.kv_cache_bytes["peak_bytes"] * 34
    assert f32.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4  # layers, keys and values, KV heads, floats
    assert q8.kv_bytes_per_token * 128 == f32.kv_bytes_per_token * 34
    # The answer's keys and values are kept for a prompt that continues it.
    prompt = ids[:64]
    answer = [t for c in q8.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True) for t in c.token_ids]
    follow = prompt + answer + ids[64:70]
    warm = q8.generate(follow, max_tokens=6, temperature=0, ignore_eos=True)
    warm_ids = [t for c in warm for t in c.token_ids]
    assert warm.usage.cached_tokens >= len(prompt) + len(answer) - 1, warm.usage
    cold = smolcandle.Model.load(smollm2_file, kv_cache_dtype="q8_0", prefix_cache_mib=0)
    assert warm_ids == [t for c in cold.generate(follow, max_tokens=6, temperature=0, ignore_eos=True) for t in c.token_ids]


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of each next token of ``ids`` under ``logits``."""
    x = logits[:-1].astype(np.float64)
    top = x.max(axis=1)
    lse = np.log(np.exp(x - top[:, None]).sum(axis=1)) + top
    return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).mean())


def test_a_cache_type_the_model_cannot_take_is_refused(fixture_path):
    with pytest.raises(smolcandle.InvalidParameterError, match='"q8_0"'):
        smolcandle.Model.load(fixture_path("kq-q4_k_m"), kv_cache_dtype="q4_0")
    # Heads of 16 values are not whole 32-value blocks.
    with pytest.raises(smolcandle.InvalidParameterError, match="heads of 16 values"):
        smolcandle.Model.load(fixture_path("gqa-f32"), kv_cache_dtype="q8_0")


# -- admission -------------------------------------------------------------------------------


def _wait(predicate, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_requests_past_the_active_limit_wait_in_order_and_past_the_queue_are_refused(smollm2_file):
    model = smolcandle.Model.load(smollm2_file, n_ctx=2048, prefix_cache_mib=0, max_active=1, max_queued=2)
    assert model.admission["max_active"] == 1 and model.admission["max_queued"] == 2
    first = model.generate("Count from one to a hundred:", max_tokens=400, temperature=0, ignore_eos=True)
    assert _wait(lambda: model.admission["active"] == 1)
    second = model.generate("Name a colour:", max_tokens=4, temperature=0, ignore_eos=True)
    third = model.generate("Name a fruit:", max_tokens=4, temperature=0, ignore_eos=True)
    assert _wait(lambda: (second.queue_position, third.queue_position) == (1, 2)), (second.queue_position, third.queue_position)
    assert first.queue_position == 0
    with pytest.raises(smolcandle.errors.BusyError, match="2 requests are already waiting"):
        model.generate("One too many:", max_tokens=4)
    assert model.admission["refused"] == 1
    # A queued request cancelled while it waits ends without running; the one behind moves up.
    second.cancel()
    assert list(second) == [] and second.finish_reason == "cancelled" and second.usage.completion_tokens == 0
    assert _wait(lambda: third.queue_position == 1)
    first.cancel()
    assert list(first) and first.finish_reason == "cancelled"
    assert "".join(c.text for c in third) and third.finish_reason == "length" and third.queue_position == 0
    assert _wait(lambda: model.admission["active"] == 0 and model.admission["queued"] == 0), model.admission


def test_admission_limits_are_checked_at_load(smollm2_file):
    for name in ("max_active", "max_queued", "kv_budget_mib"):
        with pytest.raises(smolcandle.InvalidParameterError) as e:
            smolcandle.Model.load(smollm2_file, **{name: 0})
        assert e.value.param == name and "at least 1" in str(e.value)


def test_the_key_value_budget_bounds_what_runs_at_once(smollm2_file):
    """Each sequence reserves what its prompt and max_tokens can fill: with a budget of one
    such reservation, sequences run one at a time whatever max_active allows."""
    model = smolcandle.Model.load(smollm2_file, n_ctx=2048, prefix_cache_mib=0, max_active=8, kv_budget_mib=20)
    per_position = 2 * model.config["n_layer"] * model.config["n_head_kv"] * model.config["head_dim"] * 4
    assert 300 * per_position < 20 << 20 < 2 * 300 * per_position
    streams = [model.generate(f"Say {i}:", max_tokens=200, temperature=0, ignore_eos=True) for i in range(3)]
    readers = [threading.Thread(target=lambda s=s: list(s)) for s in streams]
    for r in readers:
        r.start()
    peak = 0
    while any(r.is_alive() for r in readers):
        a = model.admission
        peak = max(peak, a["active"])
        assert a["kv_reserved_bytes"] <= a["kv_budget_bytes"], a
        time.sleep(0.005)
    assert all(s.finish_reason == "length" for s in streams)
    assert peak == 1


def test_cached_prefixes_are_reused_within_a_tenant_only(smollm2_file):
    model = smolcandle.Model.load(smollm2_file, n_ctx=2048)
    secret = "My PIN is 4921 and my password is hunter2. " * 8

    def cached(**kw) -> int:
        s = model.generate(secret + "Repeat it:", max_tokens=2, temperature=0, **kw)
        list(s)
        return s.usage.cached_tokens

    assert cached(tenant="alice") == 0
    assert cached(tenant="mallory") == 0, "another tenant's prefix was reused"
    assert cached() == 0, "a request without a tenant reused a tenant's prefix"
    assert cached(reuse_prefix=False) == 0
    assert cached(tenant="alice") > 0, "a tenant's own prefix was not reused"


def test_waiting_requests_start_by_turns_among_clients(smollm2_file):
    """One client queues three requests, then another client one: when the running one ends,
    the other client's starts before the first client's second."""
    model = smolcandle.Model.load(smollm2_file, n_ctx=2048, prefix_cache_mib=0, max_active=1)
    a = [model.generate(f"Say {i}:", max_tokens=30, temperature=0, ignore_eos=True, client="a") for i in range(3)]
    b = model.generate("Say b:", max_tokens=30, temperature=0, ignore_eos=True, client="b")
    assert _wait(lambda: a[0].queue_position == 0 and b.queue_position == 3)
    started: list[str] = []
    deadline = time.monotonic() + 60
    while len(started) < 3 and time.monotonic() < deadline:
        for name, s in (("a1", a[1]), ("a2", a[2]), ("b", b)):
            if name not in started and s.queue_position == 0:
                started.append(name)
        time.sleep(0.001)
    assert started == ["b", "a1", "a2"], started
    for s in (*a, b):
        list(s)


def test_the_disk_tier_survives_a_restart_and_refuses_another_models_files(smollm2_file, fixture_path, tmp_path):
    """A conversation computed by one engine is read back from disk by the next one (after a
    restart), bit for bit: the answer equals a cold start's. A file written by another model
    file is refused when placed where that model looks, and removed."""
    disk = tmp_path / "kv"
    messages = [
        {"role": "system", "content": "You are a helpful assistant who answers briefly and precisely. " * 6},
        {"role": "user", "content": "What is the capital of Italy?"},
    ]
    first = smolcandle.Model.load(smollm2_file, disk_cache_dir=disk)
    answer = first.chat(messages, stream=False, temperature=0, max_tokens=16, tenant="t")
    assert answer.usage.cached_tokens == 0
    first.close()  # waits for the disk tier's writer
    files = list(disk.rglob("*.kv"))
    assert len(files) == 1, files
    written = files[0].read_bytes()
    follow_up = [*messages, answer.to_message(), {"role": "user", "content": "And of Spain?"}]

    restarted = smolcandle.Model.load(smollm2_file, disk_cache_dir=disk)
    assert restarted.prefix_cache_stats["disk_files"] == 1
    warm = restarted.chat(follow_up, stream=False, temperature=0, max_tokens=16, tenant="t")
    other_tenant = restarted.chat(follow_up, stream=False, temperature=0, max_tokens=16, tenant="u")
    assert warm.usage.cached_tokens >= answer.usage.prompt_tokens, warm.usage
    assert other_tenant.usage.cached_tokens == 0, "another tenant read the file"
    stats = restarted.prefix_cache_stats
    assert (stats["disk_hits"], stats["disk_refused"]) == (1, 0), stats
    cold = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0)
    assert warm.content == other_tenant.content == cold.chat(follow_up, stream=False, temperature=0, max_tokens=16).content
    restarted.close()

    # Another model file looks in a directory of its own; a file of SmolLM2's put there is
    # refused and removed.
    other = smolcandle.Model.load(fixture_path("gqa-f32"), disk_cache_dir=disk)
    other.close()
    (mine,) = {f.parent for f in disk.rglob("*.kv")}
    (theirs,) = [d for d in disk.iterdir() if d != mine]
    planted = theirs / files[0].name
    planted.write_bytes(written)
    other = smolcandle.Model.load(fixture_path("gqa-f32"), disk_cache_dir=disk)
    stats = other.prefix_cache_stats
    assert (stats["disk_files"], stats["disk_refused"]) == (0, 1), stats
    assert not planted.exists()
