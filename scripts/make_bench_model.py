#!/usr/bin/env python3
"""Writes a SmolLM3-3B-shaped ``smollm3`` GGUF with random weights in the Q4_K_M mix, for
benchmarks (speed does not depend on the weights' values): 36 layers, hidden 2048, 16 heads,
4 KV heads, FFN 11008, vocabulary 128256, tied embeddings.

    python scripts/make_bench_model.py [--out models/smollm3-3b-shape-Q4_K_M.gguf]

Needs gguf and numpy, and smolcandle installed (its quantizer makes the K-quants). Peak disk
use is the F16 intermediate (about 6 GB), removed at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_fixtures import add_metadata, vocabulary  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, CONTEXT = 36, 2048, 16, 4, 11008, 128256, 65536


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "smollm3-3b-shape-Q4_K_M.gguf")
    args = ap.parse_args()
    from smolcandle import _native

    tokens, types, merges = vocabulary()
    n_filler = VOCAB - len(tokens)
    tokens = tokens + [f"Ġfiller{i}" for i in range(n_filler)]
    types = types + [int(gguf.TokenType.NORMAL)] * n_filler
    hd = HIDDEN // HEADS
    rng = np.random.default_rng(0)
    f16_path = args.out.with_suffix(".f16.tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(f16_path), "smollm3")
    add_metadata(w, "smollm3-3b-shape-random", CONTEXT, HIDDEN, LAYERS, FFN, HEADS, KV_HEADS, 5_000_000.0, tokens, types, merges)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(VOCAB, HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(HEADS * hd, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(KV_HEADS * hd, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(KV_HEADS * hd, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(HIDDEN, HEADS * hd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(HIDDEN, FFN))
        print(f"\rlayer {i + 1}/{LAYERS}", end="", file=sys.stderr, flush=True)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    print("\nwriting F16 intermediate…", file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    print("quantizing to Q4_K_M…", file=sys.stderr)
    _native.quantize_gguf(str(f16_path), str(args.out), "q4_k_m")
    f16_path.unlink()
    print(f"{args.out}  {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
