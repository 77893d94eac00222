"""Embeddings: the model's final hidden states mean-pooled and L2-normalised, through the
Python API, the official ``openai`` package against ``/v1/embeddings`` and LiteLLM's
``embedding``, against ``smolcandle serve`` with the real SmolLM2-135M."""

from __future__ import annotations

import math
import os
import threading
import time

import httpx

# LiteLLM reads its model price list from the web at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm
import openai
import pytest
import smolcandle

from models import smollm2_path

MODEL = "SmolLM2-135M-Instruct.Q4_1"
TEXTS = ["The cat sat on the mat.", "A kitten slept on the rug.", "Interest rates rose by half a point."]


@pytest.fixture(scope="module")
def model():
    with smolcandle.Model.load(smollm2_path(), n_threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_a_vector_is_unit_length_and_the_same_alone_or_in_a_batch(model):
    batch = model.embed(TEXTS)
    assert len(batch) == 3 and all(len(v) == model.config["n_embd"] for v in batch)
    assert all(abs(norm(v) - 1) < 1e-5 for v in batch)
    for text, v in zip(TEXTS, batch, strict=True):
        assert model.embed(text) == [v]  # SmolLM2's Q4_1 products are batch-invariant: the same bits
    assert model.embed([model.tokenize(TEXTS[0])]) == [batch[0]]
    # Pooled states of a language model: two sentences about a cat lie closer than one about rates.
    assert dot(batch[0], batch[1]) > dot(batch[0], batch[2])


def test_embedding_waits_for_no_one_and_generation_goes_on(model):
    """Embeddings run on the engine thread between steps, beside a running generation."""
    stream = model.generate("Count from one to fifty:", max_tokens=40, temperature=0, ignore_eos=True)
    done = threading.Event()
    threading.Thread(target=lambda: (list(stream), done.set()), daemon=True).start()
    started = time.perf_counter()
    vectors = model.embed(TEXTS * 4)
    assert len(vectors) == 12 and time.perf_counter() - started < 30
    assert done.wait(60) and stream.usage.completion_tokens == 40


@pytest.mark.parametrize(
    ("inputs", "says"),
    [([], "empty"), ([""], "input 0 is empty"), ([[1, 2], [10**9]], "outside the vocabulary"), (["x"] * 257, "more than 256")],
)
def test_bad_inputs_name_the_problem(model, inputs, says):
    with pytest.raises(smolcandle.InvalidParameterError, match=says) as caught:
        model.embed(inputs)
    assert caught.value.param in ("input", "inputs")


def test_an_input_or_a_call_longer_than_its_limit_is_refused(model):
    too_long = [1] * (smolcandle.DEFAULTS["max_embed_tokens"] + 1)
    with pytest.raises(smolcandle.InvalidParameterError, match="more than"):
        model.embed([too_long])
    # Each input within its limit, but too many tokens in all: the engine would hold its
    # generations for that long.
    n = smolcandle.DEFAULTS["max_embed_call_tokens"] // 100 + 1
    with pytest.raises(smolcandle.InvalidParameterError, match="in all"):
        model.embed([[1] * 100] * n)


def test_openai_embeddings(client, model):
    r = client.embeddings.create(model=MODEL, input=TEXTS)  # the package asks for base64
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == MODEL and r.object == "list"
    local = model.embed(TEXTS)
    for d, v in zip(r.data, local, strict=True):
        assert d.embedding == pytest.approx(v, abs=1e-6)
    assert r.usage.prompt_tokens == sum(len(model.tokenize(t)) for t in TEXTS) == r.usage.total_tokens
    as_floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(local[0], abs=1e-6)
    ids = model.tokenize(TEXTS[0])
    assert client.embeddings.create(model=MODEL, input=ids).data[0].embedding == pytest.approx(local[0], abs=1e-6)
    two = client.embeddings.create(model=MODEL, input=[ids, model.tokenize(TEXTS[1])])
    assert two.data[1].embedding == pytest.approx(local[1], abs=1e-6)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": ["x"] * 257}, "input"),
        ({"input": "x", "dimensions": 64}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [[]]}, "input"),
    ],
)
def test_openai_embedding_errors(chat_server, body, param):
    r = httpx.post(chat_server.url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None and r.json()["error"]["param"].startswith(param), r.json()


def test_litellm_embedding(chat_server, model):
    r = litellm.embedding(model=f"openai/{MODEL}", api_base=chat_server.url + "/v1", api_key="unused", input=TEXTS[:2])
    assert len(r.data) == 2 and r.data[0]["embedding"] == pytest.approx(model.embed(TEXTS[0])[0], abs=1e-6)
    assert r.usage.prompt_tokens > 0
