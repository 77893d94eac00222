"""Bad input gets a SmolcandleError subclass naming the problem, never a crash."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import smolcandle


def test_missing_file(tmp_path):
    with pytest.raises(smolcandle.ModelNotFoundError, match="no such file"):
        smolcandle.Model.load(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        smolcandle.Model.load(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(smolcandle.ModelLoadError, match="directory"):
        smolcandle.Model.load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 this is a zip", b"not a model at all"])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(smolcandle.GGUFError, match="not a GGUF file"):
        smolcandle.Model.load(p)


@pytest.mark.parametrize("keep", [8, 100, 5000, 0.5, 0.99])
def test_truncated_gguf(tmp_path, fixture_path, keep):
    data = fixture_path("gqa-q8_0").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(smolcandle.GGUFError) as e:
        smolcandle.Model.load(p)
    assert "truncated" in str(e.value) or "remaining" in str(e.value) or "exceeds" in str(e.value)


def _edit(tmp_path, fixture_path, name, edit) -> str:
    import gguf

    src = fixture_path(name)
    dst = tmp_path / "edited.gguf"
    shutil.copy(src, dst)
    r = gguf.GGUFReader(str(dst), "r+")
    edit(r)
    del r
    return str(dst)


def test_unsupported_architecture(tmp_path, fixture_path):
    def edit(r):
        f = r.fields["general.architecture"]
        f.parts[f.data[0]][:] = bytearray(b"gpt2xxx")

    with pytest.raises(smolcandle.UnsupportedModelError, match="gpt2xxx"):
        smolcandle.Model.load(_edit(tmp_path, fixture_path, "gqa-f32", edit))


def test_unsupported_tensor_type(tmp_path, fixture_path):
    """A tensor type id no reader knows (e.g. a newer llama.cpp quantization)."""
    import gguf

    path = fixture_path("gqa-f32")
    r = gguf.GGUFReader(str(path))
    t = r.tensors[0]
    # The type id sits right after the name, n_dims and dims of the tensor info.
    data = bytearray(path.read_bytes())
    needle = struct.pack("<Q", len(t.name)) + t.name.encode()
    at = data.index(needle) + len(needle)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    p = tmp_path / "weird.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(smolcandle.UnsupportedModelError, match="99"):
        smolcandle.Model.load(p)


def test_inconsistent_shapes(tmp_path, fixture_path):
    def edit(r):
        f = r.fields["smollm3.feed_forward_length"]
        f.parts[f.data[0]][0] = 100

    with pytest.raises(smolcandle.GGUFError, match="ffn_gate.*inconsistent"):
        smolcandle.Model.load(_edit(tmp_path, fixture_path, "gqa-f32", edit))


def test_heads_not_dividing(tmp_path, fixture_path):
    def edit(r):
        f = r.fields["smollm3.attention.head_count_kv"]
        f.parts[f.data[0]][0] = 3

    with pytest.raises(smolcandle.GGUFError, match="head_count_kv"):
        smolcandle.Model.load(_edit(tmp_path, fixture_path, "gqa-f32", edit))


def test_bad_device(fixture_path):
    with pytest.raises(smolcandle.DeviceError, match="tpu"):
        smolcandle.Model.load(fixture_path("gqa-q8_0"), device="tpu")
    if smolcandle._native.has_cuda:
        with pytest.raises(smolcandle.DeviceError, match="cuda:99"):
            smolcandle.Model.load(fixture_path("gqa-q8_0"), device="cuda:99")
    else:
        with pytest.raises(smolcandle.DeviceError, match="CUDA"):
            smolcandle.Model.load(fixture_path("gqa-q8_0"), device="cuda:0")


def test_prompt_longer_than_context(fixture_path):
    model = smolcandle.Model.load(fixture_path("gqa-q8_0"), n_ctx=32)
    with pytest.raises(smolcandle.ContextLengthError, match="33 tokens.*32"):
        model.generate(list(range(33)))
    with pytest.raises(smolcandle.ContextLengthError):
        model.logits(list(range(40)))
    # At the context limit, generation ends with "length" instead of failing.
    stream = model.generate(list(range(30)), max_tokens=100, temperature=0, ignore_eos=True)
    assert sum(len(c.token_ids) for c in stream) <= 3
    assert stream.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(max_tokens=2**70), "max_tokens"),
        (dict(stop=[1, 2]), "stop"),
        (dict(frequency_penalty=5.0), "frequency_penalty"),
        (dict(temperature="hot"), "temperature"),
    ],
)
def test_invalid_sampling_values(fixture_path, kwargs, name):
    model = smolcandle.Model.load(fixture_path("gqa-q8_0"))
    with pytest.raises(smolcandle.InvalidParameterError, match=name):
        model.generate("hello", **kwargs)


def test_a_seed_takes_the_whole_unsigned_64_bit_range(fixture_path):
    model = smolcandle.Model.load(fixture_path("gqa-q8_0"))
    draw = lambda seed: [t for c in model.generate("hello", max_tokens=4, temperature=1.0, seed=seed) for t in c.token_ids]  # noqa: E731
    assert draw(2**64 - 1) == draw(2**64 - 1) and len(draw(0)) == 4


def test_invalid_token_ids(fixture_path):
    model = smolcandle.Model.load(fixture_path("gqa-q8_0"))
    with pytest.raises(smolcandle.InvalidParameterError, match="outside the vocabulary"):
        model.generate([model.n_vocab + 5])
    with pytest.raises(smolcandle.InvalidParameterError, match="outside the vocabulary"):
        model.detokenize([10**6])
    with pytest.raises(smolcandle.InvalidParameterError):
        model.logits([-1])
    with pytest.raises(smolcandle.InvalidParameterError, match="empty"):
        model.generate([])


def test_errors_share_a_base_class():
    for cls in (
        smolcandle.ModelNotFoundError,
        smolcandle.GGUFError,
        smolcandle.UnsupportedModelError,
        smolcandle.TokenizerError,
        smolcandle.InvalidParameterError,
        smolcandle.ContextLengthError,
        smolcandle.EngineError,
        smolcandle.DeviceError,
    ):
        assert issubclass(cls, smolcandle.SmolcandleError)


def crafted(fixture: Path, tmp_path: Path, key: str, value: int) -> Path:
    """A copy of ``fixture`` with the integer metadata ``key`` set to ``value`` in place."""
    import gguf

    path = tmp_path / f"{key}.gguf"
    shutil.copyfile(fixture, path)
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    del reader
    return path


def test_crafted_metadata_is_an_error_before_anything_is_allocated(fixture_path, tmp_path):
    # 2**32 - 1 layers would allocate gigabytes for their settings before finding no tensors.
    with pytest.raises(smolcandle.GGUFError, match="block_count"):
        smolcandle.Model.load(crafted(fixture_path("gqa-q8_0"), tmp_path, "smollm3.block_count", 2**32 - 1))
    # A context of 2**32 - 1 is a limit, not an allocation: the default context is used.
    model = smolcandle.Model.load(crafted(fixture_path("gqa-q8_0"), tmp_path, "smollm3.context_length", 2**32 - 1))
    assert model.n_ctx == smolcandle.DEFAULTS["n_ctx"]


def test_the_native_module_refuses_an_errors_module_without_one_of_its_classes(tmp_path):
    """Every class the native module raises is looked up once, when smolcandle.errors registers
    them: one missing or of the wrong kind fails that import, instead of an error being raised
    as another class later."""
    classes = {name: getattr(smolcandle.errors, name) for name in smolcandle.errors.__all__}
    with pytest.raises(ImportError, match="no class GGUFError"):
        smolcandle._native.register_errors({k: v for k, v in classes.items() if k != "GGUFError"})
    with pytest.raises(ImportError, match="BusyError is not a subclass of SmolcandleError"):
        smolcandle._native.register_errors({**classes, "BusyError": RuntimeError})
    # A refused registration leaves the classes registered before in place.
    (tmp_path / "x.gguf").write_bytes(b"not a model")
    with pytest.raises(smolcandle.GGUFError):
        smolcandle.Model.load(tmp_path / "x.gguf")


def test_a_gguf_aligned_to_zero_is_refused_and_nothing_is_printed(tmp_path):
    """Candle's GGUF reader divides by ``general.alignment``: a file that says 0 (or any
    alignment not a power of two) is a GGUFError naming it, and nothing, such as a Rust panic's
    message, appears on stderr."""
    import gguf
    import numpy as np

    paths = []
    for alignment in (0, 48):
        path = tmp_path / f"align{alignment}.gguf"
        w = gguf.GGUFWriter(str(path), "smollm3")
        w.add_uint32("general.alignment", alignment)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(str(path))
    code = f"""
import smolcandle
for path in {paths!r}:
    for call in (smolcandle.Model.load, smolcandle._native.inspect_gguf):
        try:
            call(path)
        except smolcandle.GGUFError as e:
            print(e)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RUST_BACKTRACE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    assert all("general.alignment is 0, not a power of two" in line for line in lines[:2]), lines
    assert all("general.alignment is 48, not a power of two" in line for line in lines[2:]), lines
