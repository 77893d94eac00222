#!/usr/bin/env python3
"""Generates tiny random-weight ``smollm3`` GGUF fixtures for the tests.

Several shapes (grouped-query attention, a single KV head, rows long enough for K-quants) in
F32, Q8_0, Q4_0 and K-quant mixes, each with a real byte-level BPE vocabulary trained here on
a small corpus. Weights are drawn in transformers' layout and Q/K are permuted exactly as
llama.cpp's converter does, so the files look like real converted SmolLM3 models.

Deterministic: the same files on every run (the reference outputs in tests/data depend on it).

    python scripts/make_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import gguf
import numpy as np

# Our SmolLM3-style chat template (reasoning modes, tools, dated header); the chat tests
# compare its rendering with transformers'.
CHAT_TEMPLATE = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm3_style.jinja"

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
]

CORPUS = """
The sea is wide and the sky is blue. A small model runs on the user's own machine, at native
speed, and answers questions in plain English. It reads the prompt, then writes one token at a
time. def forward(self, x):\n    return self.norm(x) + 1\n\nfor i in range(10):\n    print(i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159. Hello, world! How are you today?
I'm fine, thanks. We'll see; they'd know. "Quoted text" and (parentheses) [brackets] {braces}.
The quick brown fox jumps over the lazy dog. Thinking step by step, the answer is seven.
"""

SHAPES = {
    # name: (layers, hidden, heads, kv_heads, ffn, tied embeddings)
    "gqa": (4, 64, 4, 2, 128, True),
    "mqa": (8, 64, 4, 1, 96, False),
    "kq": (4, 256, 4, 2, 512, True),
}

# Tied embeddings of unit-variance rows make a model that copies its input: the last token's
# own row dominates the output (its dot with itself is the hidden size, against the square
# root of it for any other row), whatever the layers compute. So the tied shapes draw their
# embeddings this small, and the residual stream is mostly what attention and the MLP add; the
# final norm's weights are scaled up by as much, so that the logits keep clear margins.
TIED_EMBEDDING_GAIN = 0.05

# (shape, tensor types): K-quants need rows that are multiples of 256.
FIXTURES = [
    ("gqa", "f32"),
    ("gqa", "q8_0"),
    ("gqa", "q4_0"),
    ("mqa", "f32"),
    ("mqa", "q8_0"),
    ("kq", "f32"),
    ("kq", "q4_k_m"),
    ("kq", "q6_k"),
]

N_MERGES = 300
CONTEXT = 256
# The YaRN fixture: trained (as its metadata says) on a window of 32 positions, reaching twice
# as far, so that a 64-token sequence runs half of it past the window.
YARN_FACTOR = 2.0
YARN_WINDOW = 32
ROPE_BASE = 10000.0
SEED = 1234


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_bpe(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on words (a leading space kept, GPT-2 style); ties broken by the pair text."""
    enc = bytes_to_unicode()
    words = collections.Counter(
        tuple(enc[b] for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", corpus)
    )
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    enc = bytes_to_unicode()
    tokens = [enc[b] for b in range(256)]
    merges = train_bpe(CORPUS, N_MERGES)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += SPECIALS
    types += [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows for interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights(shape: str, n_vocab: int) -> dict[str, np.ndarray]:
    """Random weights in transformers' layout (Q/K not yet permuted), scaled so that greedy
    decisions are clear-cut rather than near-ties."""
    n_layer, e, n_head, n_kv, ff, tied = SHAPES[shape]
    hd = e // n_head
    rng = np.random.default_rng(SEED + sum(map(ord, shape)))

    def mat(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    gain = TIED_EMBEDDING_GAIN if tied else 1.0
    w: dict[str, np.ndarray] = {"token_embd": (gain * rng.standard_normal((n_vocab, e))).astype(np.float32)}
    for i in range(n_layer):
        w[f"blk.{i}.attn_norm"] = norm(e)
        w[f"blk.{i}.attn_q"] = mat(n_head * hd, e, 2.0)
        w[f"blk.{i}.attn_k"] = mat(n_kv * hd, e, 2.0)
        w[f"blk.{i}.attn_v"] = mat(n_kv * hd, e)
        w[f"blk.{i}.attn_output"] = mat(e, n_head * hd, 0.5)
        w[f"blk.{i}.ffn_norm"] = norm(e)
        w[f"blk.{i}.ffn_gate"] = mat(ff, e)
        w[f"blk.{i}.ffn_up"] = mat(ff, e)
        w[f"blk.{i}.ffn_down"] = mat(e, ff, 0.5)
    w["output_norm"] = norm(e) / gain
    if not tied:
        w["output"] = mat(n_vocab, e, 4.0)
    return w


def add_metadata(
    writer: gguf.GGUFWriter,
    name: str,
    context: int,
    n_embd: int,
    n_layer: int,
    n_ff: int,
    n_head: int,
    n_kv: int,
    rope_base: float,
    tokens: list[str],
    types: list[int],
    merges: list[str],
) -> None:
    """The hyper-parameters and tokenizer keys of a smollm3 GGUF, as llama.cpp's converter
    writes them for SmolLM3."""
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE.read_text())


def write(path: Path, shape: str, qtype: str, *, no_rope_layers: list[int] | None = None, yarn: bool = False) -> None:
    n_layer, e, n_head, n_kv, ff, _ = SHAPES[shape]
    tokens, types, merges = vocabulary()
    w = weights(shape, len(tokens))
    writer = gguf.GGUFWriter(str(path), "smollm3")
    context = int(YARN_FACTOR * YARN_WINDOW) if yarn else CONTEXT
    add_metadata(writer, f"smolcandle-fixture-{shape}", context, e, n_layer, ff, n_head, n_kv, ROPE_BASE, tokens, types, merges)
    if no_rope_layers is not None:
        writer.add_array("smollm3.no_rope_layers", no_rope_layers)
    if yarn:  # as llama.cpp's converter writes transformers' rope_scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(YARN_FACTOR)
        writer.add_rope_scaling_orig_ctx_len(YARN_WINDOW)
    legacy = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for name, t in w.items():
        if name.endswith(("attn_q",)):
            t = permute(t, n_head)
        elif name.endswith("attn_k"):
            t = permute(t, n_kv)
        if t.ndim == 2 and qtype in legacy:
            q = gguf.quants.quantize(t, legacy[qtype])
            writer.add_tensor(f"{name}.weight", q, raw_dtype=legacy[qtype])
        else:
            writer.add_tensor(f"{name}.weight", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_digest(path: Path) -> str:
    """SHA-256 of a GGUF file's tensors (names, types, shapes and data, in name order): what a
    reference computed on the file depends on, without its metadata."""
    import hashlib

    h = hashlib.sha256()
    for t in sorted(gguf.GGUFReader(str(path)).tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.tensor_type.name}:{list(t.shape)}".encode())
        h.update(np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


def fixture_path(out: Path, shape: str, qtype: str) -> Path:
    return out / f"smollm3-{shape}-{qtype}.gguf"


def make_all(out: Path) -> list[Path]:
    from smolcandle import _native

    out.mkdir(parents=True, exist_ok=True)
    made = []
    for shape, qtype in FIXTURES:
        path = fixture_path(out, shape, qtype)
        if qtype in ("f32", "q8_0", "q4_0"):
            write(path, shape, qtype)
        else:
            src = fixture_path(out, shape, "f32")
            if not src.exists():
                write(src, shape, "f32")
            _native.quantize_gguf(str(src), str(path), qtype)
        made.append(path)
    # The same weights with RoPE in every layer: NoPE switched off.
    n_layer = SHAPES["gqa"][0]
    path = out / "smollm3-gqa-f32-allrope.gguf"
    write(path, "gqa", "f32", no_rope_layers=[1] * n_layer)
    made.append(path)
    # The same weights with YaRN rope scaling.
    path = out / "smollm3-gqa-f32-yarn.gguf"
    write(path, "gqa", "f32", yarn=True)
    made.append(path)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = ap.parse_args()
    for p in make_all(args.out):
        print(f"{p}  {p.stat().st_size:>9} bytes")


if __name__ == "__main__":
    main()
