"""Generation through the Python API with the real SmolLM2-135M model."""

from __future__ import annotations

import threading
import time

import pytest
import smolcandle

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


KQUANT_INVARIANT = pytest.mark.skipif(
    smolcandle.build_info()["simd"] != "avx512", reason="K-quant products are batch-invariant with AVX-512 only"
)


def collect(stream) -> tuple[str, list[int]]:
    text, ids = "", []
    for chunk in stream:
        text += chunk.text
        ids += chunk.token_ids
    return text, ids


def test_answers_a_question(smollm2):
    stream = smollm2.generate(CHAT, max_tokens=32, temperature=0)
    text, ids = collect(stream)
    assert "Paris" in text
    assert stream.finish_reason == "stop"
    usage = stream.usage
    assert usage.prompt_tokens == len(smollm2.tokenize(CHAT))
    assert usage.completion_tokens == len(ids) + 1  # the end-of-turn token is counted, not shown
    assert usage.prefill_seconds > 0 and usage.decode_seconds > 0
    assert smollm2.detokenize(ids) == text


def test_properties(smollm2):
    assert smollm2.architecture == "llama"
    assert smollm2.n_vocab == 49152
    assert smollm2.n_ctx == 2048
    assert smollm2.metadata["tokenizer.ggml.pre"] == "smollm"
    assert "tokenizer.ggml.tokens" not in smollm2.metadata  # too long to copy
    assert smollm2.token_to_id("<|im_end|>") in smollm2.eog_token_ids
    assert smollm2.tokenize("<|im_start|>", special=True) == [smollm2.token_to_id("<|im_start|>")]
    assert len(smollm2.tokenize("<|im_start|>", special=False)) > 1


def test_max_tokens_gives_length(smollm2):
    stream = smollm2.generate("Once upon a time", max_tokens=5, temperature=0)
    _, ids = collect(stream)
    assert len(ids) == 5
    assert stream.finish_reason == "length"


def test_same_seed_same_output_and_temperature_varies(smollm2):
    def sample(seed):
        return collect(smollm2.generate("My favourite animal is", max_tokens=24, temperature=1.0, seed=seed))[1]

    assert sample(11) == sample(11)
    assert len({tuple(sample(s)) for s in range(4)}) > 1


def test_sampling_filters_act(smollm2):
    prompt = "Colors: red, green,"

    def tokens(**kwargs) -> list[int]:
        return collect(smollm2.generate(prompt, max_tokens=24, **kwargs))[1]

    greedy = tokens(temperature=0)
    assert len(greedy) == 24
    # At temperature 5 the draw wanders; filters that keep only the most likely token make it
    # greedy again: top_k=1, a top_p below the top token's probability, min_p=1.
    assert tokens(temperature=5.0, seed=3) != greedy
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert tokens(temperature=5.0, seed=3, **kwargs) == greedy, kwargs
    # Penalties on tokens already seen change a greedy answer that repeats itself.
    for kwargs in (dict(repeat_penalty=1.5), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        assert tokens(temperature=0, **kwargs) != greedy, kwargs
    for kwargs in (dict(top_p=0.5), dict(min_p=0.2), dict(top_k=20, top_p=0.9, min_p=0.05)):
        stream = smollm2.generate(prompt, max_tokens=8, temperature=0.7, seed=1, **kwargs)
        assert collect(stream)[1] and stream.finish_reason == "length"


def test_stop_string_is_never_emitted(smollm2):
    full, _ = collect(smollm2.generate("Count: 1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=30, temperature=0))
    assert "12" in full, full
    stream = smollm2.generate("Count: 1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=30, temperature=0, stop=["12"])
    text, _ = collect(stream)
    assert stream.finish_reason == "stop"
    assert "12" not in text
    assert full.startswith(text) and full[len(text):].startswith("12")


def test_stop_token_ids(smollm2):
    greedy = collect(smollm2.generate("Count: 1, 2, 3,", max_tokens=10, temperature=0))[1]
    at = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    stream = smollm2.generate("Count: 1, 2, 3,", max_tokens=10, temperature=0, stop_token_ids=[greedy[at]])
    _, ids = collect(stream)
    assert ids == greedy[:at] and stream.finish_reason == "stop"


def test_streamed_text_never_splits_a_character(smollm2):
    """Emoji and CJK take several byte-level tokens each: a chunk is emitted only when its
    character is complete, so the streamed text is exactly the decoding of all the tokens at
    once (a split character would show up as U+FFFD in the stream only). Bytes that can never
    complete (the model stopped mid-character) end the stream as U+FFFD, as in the full decode."""
    prompt = "<|im_start|>user\nReply with many emoji and Chinese characters: 😀🎉你好<|im_end|>\n<|im_start|>assistant\n😀🎉"
    stream = smollm2.generate(prompt, max_tokens=48, temperature=1.0, seed=5)
    chunks = list(stream)
    assert any(len(c.token_ids) > 1 for c in chunks), "no character spanned several tokens"
    ids = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == smollm2.detokenize(ids)
    assert all("\ufffd" not in c.text for c in chunks[:-1])


def test_cancel_from_another_thread(smollm2):
    stream = smollm2.generate("Write a very long story about dragons.", max_tokens=2000, temperature=0.8, seed=1, ignore_eos=True)
    next(stream)
    threading.Timer(0.2, stream.cancel).start()
    rest = list(stream)
    assert stream.finish_reason == "cancelled"
    assert len(rest) < 1000


def test_several_streams_at_once_from_threads(smollm2):
    prompts = ["The sun is", "Water boils at", "Cats like to", "Python is a"]
    solo = {p: collect(smollm2.generate(p, max_tokens=16, temperature=0))[1] for p in prompts}
    results: dict[str, list[int]] = {}

    def run(p):
        results[p] = collect(smollm2.generate(p, max_tokens=16, temperature=0))[1]

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == solo


def test_batched_steps_give_the_solo_answers(smollm2):
    """Streams opened together share each forward pass (decode rows and prompt chunks in one
    matrix); a long prompt is prefilled in chunks while the others decode. Greedy output is the
    same as each prompt run alone."""
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 150) + ". The last fruit was"
    prompts = ["The sun is", "Water boils at", long_prompt, "Cats like to", "Python is a"]
    assert len(smollm2.tokenize(long_prompt)) > 1024
    solo = [collect(smollm2.generate(p, max_tokens=24, temperature=0))[1] for p in prompts]
    streams = [smollm2.generate(p, max_tokens=24, temperature=0) for p in prompts]
    assert [collect(s)[1] for s in streams] == solo


def test_gil_is_released_while_waiting_for_tokens(smollm2):
    """A Python thread keeps counting at full pace while another iterates a stream."""

    def count_for(seconds: float) -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    baseline = count_for(0.5)
    counted = []
    done = threading.Event()

    def counter():
        n = 0
        while not done.is_set():
            n += 1
        counted.append(n)

    stream = smollm2.generate("Tell me about the ocean.", max_tokens=400, temperature=0.8, seed=2, ignore_eos=True)
    next(stream)
    t = threading.Thread(target=counter)
    start = time.perf_counter()
    t.start()
    n_chunks = sum(1 for _ in stream)
    elapsed = time.perf_counter() - start
    done.set()
    t.join()
    assert n_chunks > 10 and elapsed > 0.5
    rate = counted[0] / elapsed
    # Holding the GIL while waiting would starve the counter; releasing it lets it run at about
    # its solo pace (the engine's threads share the cores, hence the margin).
    assert rate > 0.3 * baseline / 0.5, (rate, baseline / 0.5)


def test_closed_model_refuses_work(fixture_path):
    model = smolcandle.Model.load(fixture_path("gqa-q8_0"))
    stream = model.generate([1, 2, 3], max_tokens=500, temperature=0, ignore_eos=True)
    with model:
        pass
    assert model.closed
    list(stream)
    assert stream.finish_reason in ("cancelled", "length")
    with pytest.raises(smolcandle.EngineError, match="closed"):
        model.generate([1, 2, 3])


def test_prefix_reuse_never_changes_the_output(smollm2_file):
    """A conversation's next turn and a shared system prompt start from kept caches, the
    previous answer's included (SmolLM2 is batch-invariant: Q4_1 and Q8_0 kernels); greedy
    answers equal those of an engine that keeps nothing, token for token."""
    warm = smolcandle.Model.load(smollm2_file)
    cold = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0)
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly and precisely. " * 4}
    history = [system]
    previous = 0
    for turn, question in enumerate(["Hi! I'm Marco and I live in Rome.", "What is the capital of France?", "Where do I live?"]):
        history.append({"role": "user", "content": question})
        a = warm.chat(history, stream=False, temperature=0, max_tokens=32)
        b = cold.chat(history, stream=False, temperature=0, max_tokens=32)
        assert a.content == b.content, turn
        assert b.usage.cached_tokens == 0
        if turn == 0:
            assert a.usage.cached_tokens == 0
        else:  # the previous turn's prompt and answer are reused (not its last token, never fed)
            assert a.usage.cached_tokens == previous, a.usage
        previous = a.usage.prompt_tokens + a.usage.completion_tokens - 1
        history.append(a.to_message())
    # Another conversation with the same system prompt reuses it.
    other = [system, {"role": "user", "content": "Name a colour."}]
    a = warm.chat(other, stream=False, temperature=0, max_tokens=16)
    assert a.content == cold.chat(other, stream=False, temperature=0, max_tokens=16).content
    assert a.usage.cached_tokens >= len(warm.tokenize(system["content"]))
    stats = warm.prefix_cache_stats
    assert stats["hits"] == 3 and stats["entries"] == 2 and cold.prefix_cache_stats["entries"] == 0


@pytest.mark.parametrize("which", ["smollm2", pytest.param("kq-q4_k_m", marks=KQUANT_INVARIANT)])
def test_a_generated_tokens_state_is_what_a_prompt_computes(which, smollm2_file, fixture_path):
    """Batch invariance, bit for bit: continuing from the prompt plus some of the generated
    tokens, read as prompt rows (one row at a time, a small batch, or panels from 24 rows),
    gives the same tokens with the same log-probabilities, to the last bit, as the first run,
    which computed them one generated token at a time. That is what lets a conversation's next
    turn reuse the state of the answer it contains, and a verified draft stand for the steps it
    saves. SmolLM2 is Q4_1 and Q8_0; the smollm3 fixture Q4_K and Q6_K, as SmolLM3's files."""
    path = smollm2_file if which == "smollm2" else fixture_path(which)
    model = smolcandle.Model.load(path, prefix_cache_mib=0, speculative=False)
    prompt = model.tokenize("The three most important inventions of the last century are")

    def run(ids, n):
        chunks = list(model.generate(ids, max_tokens=n, temperature=0, ignore_eos=True, logprobs=3))
        return [t for c in chunks for t in c.token_ids], [lp.top_logprobs for c in chunks for lp in c.logprobs]

    tokens, logprobs = run(prompt, 40)
    assert len(tokens) == len(logprobs) == 40
    for cut in (1, 5, 17, 30):
        again, again_logprobs = run(prompt + tokens[:cut], 40 - cut)
        assert again == tokens[cut:], cut
        assert again_logprobs == logprobs[cut:], cut


@KQUANT_INVARIANT
def test_k_quant_models_keep_the_answer_for_the_next_turn(fixture_path):
    """On Q4_K/Q6_K weights (SmolLM3's files) a finished generation's cache is kept with its
    answer, so a prompt that continues it computes only what is new, and gives what a cold
    start gives."""
    path = fixture_path("kq-q4_k_m")
    warm = smolcandle.Model.load(path)
    cold = smolcandle.Model.load(path, prefix_cache_mib=0)
    prompt = warm.tokenize("The three most important inventions of the last century are")
    first = warm.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True)
    _, answer = collect(first)
    follow = prompt + answer + warm.tokenize(" and then")
    stream = warm.generate(follow, max_tokens=20, temperature=0, ignore_eos=True)
    _, again = collect(stream)
    # All but the answer's last token, which was never fed.
    assert stream.usage.cached_tokens == len(prompt) + len(answer) - 1, stream.usage
    assert again == collect(cold.generate(follow, max_tokens=20, temperature=0, ignore_eos=True))[1]


def test_kv_cache_bytes_count_running_and_kept_caches(smollm2_file):
    # SmolLM2: 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 46,080 bytes per position.
    per_position = 30 * 2 * 3 * 64 * 4
    keeps = smolcandle.Model.load(smollm2_file)
    keeps_none = smolcandle.Model.load(smollm2_file, prefix_cache_mib=0)
    assert keeps.kv_cache_bytes == {"bytes": 0, "peak_bytes": 0}
    for model in (keeps, keeps_none):
        stream = model.generate("one two three four five six", max_tokens=8, temperature=0, ignore_eos=True)
        collect(stream)
        n = stream.usage.prompt_tokens + 8 - 1  # the last token is never fed
        held = model.kv_cache_bytes
        # Storage is the prompt's size, grown by at least 16 positions once decoding starts.
        assert held["peak_bytes"] == (stream.usage.prompt_tokens + 16) * per_position, held
        kept = n * per_position if model is keeps else 0  # cut to its size when kept
        # The engine hands the finished cache over just after the stream's last event.
        deadline = time.monotonic() + 5
        while model.kv_cache_bytes["bytes"] != kept and time.monotonic() < deadline:
            time.sleep(0.01)
        assert model.kv_cache_bytes["bytes"] == kept == model.prefix_cache_stats["bytes"], model.kv_cache_bytes


def test_prefix_cache_stays_within_its_budget(smollm2_file):
    # Kept caches hold exactly their prompts' positions (46 KiB each on SmolLM2): prompts of
    # about 100 tokens take about 4.5 MiB each, so an 8 MiB budget keeps one or two.
    model = smolcandle.Model.load(smollm2_file, prefix_cache_mib=8)
    for word in ["red", "green", "blue", "black", "white"]:
        collect(model.generate(f"{word} is a colour that I like. " * 12, max_tokens=4, temperature=0))
    stats = model.prefix_cache_stats
    assert 0 < stats["bytes"] <= 8 << 20 and stats["evictions"] >= 3, stats
