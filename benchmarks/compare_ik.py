#!/usr/bin/env python3
"""Prefill and decode speed of smolcandle against ik_llama.cpp's `llama-bench` on the same GGUF
files and thread count, in one run, the two taking turns measure by measure.

    python benchmarks/compare_ik.py --llama-bench PATH [--threads 2] [--prompts 512,2048,7000]
        [--decode-after 512,7000] [--gen-tokens 32] [--repeats 3] FILE...

ik_llama.cpp is built from its source beforehand (it is not part of this repository): with
cmake from PyPI, ``cmake -B build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release && cmake --build
build --target llama-bench -j2``; ``--llama-bench`` names the binary. Its measures are its own
(``-p N`` for prefill, ``-gp N,M`` for decode after N prompt tokens, flash attention and its F16
cache by default), each at ``-rtr 0`` and ``-rtr 1`` (weights repacked at load), the better one
kept, as its users would choose. Ours are the Python iterator's, speculation off and no prefix
cache (every repeat computes its whole prompt): prefill is the prompt's tokens over the time to
the first chunk, decode the tokens after the first over the time from it to the end. Each
figure is the median of ``--repeats`` after a warm-up.

Writes a markdown table (stdout and benchmarks/results/compare_ik.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import smolcandle

ROOT = Path(__file__).resolve().parent.parent


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def ik(binary: Path, path: Path, threads: int, repeats: int, test: list[str]) -> tuple[float, str]:
    """ik's tokens/s for one test (``["-p", "512", "-n", "0"]`` or ``["-p", "0", "-n", "0",
    "-gp", "512,32"]``), the better of ``-rtr 0`` and ``-rtr 1``, and which it was."""
    best = (0.0, "")
    for rtr in ("0", "1"):
        out = subprocess.run(
            [str(binary), "-m", str(path), "-t", str(threads), "-r", str(repeats), "-rtr", rtr, "-o", "json", *test],
            check=True, capture_output=True, text=True,
        ).stdout
        rows = json.loads(out)
        assert len(rows) == 1, rows
        best = max(best, (float(rows[0]["avg_ts"]), f"-rtr {rtr}"))
    return best


class Ours:
    def __init__(self, path: Path, threads: int, n_ctx: int, repeats: int, kv_cache_dtype: str | None) -> None:
        self.model = smolcandle.Model.load(
            path, n_threads=threads, n_ctx=n_ctx, speculative=False, prefix_cache_mib=0, kv_cache_dtype=kv_cache_dtype
        )
        self.repeats = repeats

    def _run(self, ids: list[int], tokens: int) -> tuple[float, float]:
        stream = self.model.generate(ids, max_tokens=tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        first = None
        for _ in stream:
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        u = stream.usage
        assert first is not None and u.completion_tokens == tokens
        decode = (tokens - 1) / (end - first) if tokens > 1 else 0.0
        return len(ids) / (first - start), decode

    def measure(self, n_prompt: int, tokens: int) -> tuple[float, float]:
        """Median prefill and decode tokens/s of ``n_prompt`` prompt tokens then ``tokens``."""
        runs = []
        for r in range(self.repeats + 1):
            ids = [300 + (7 * i + r) % 2000 for i in range(n_prompt)]  # a new prompt each run
            got = self._run(ids, tokens)
            if r:
                runs.append(got)
        return statistics.median(p for p, _ in runs), statistics.median(d for _, d in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--llama-bench", type=Path, required=True, help="ik_llama.cpp's llama-bench, built from source")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=ints, default=[512, 2048, 7000], help="prefill lengths (comma-separated)")
    ap.add_argument("--decode-after", type=ints, default=[512, 7000], help="decode after these prompt lengths")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", default=None, help="our cache type (default: the engine's)")
    args = ap.parse_args()
    if not args.llama_bench.is_file():
        sys.exit(f"compare_ik: no llama-bench at {args.llama_bench}")

    rows = []
    cache = "?"
    for path in args.files:
        longest = max(args.prompts + args.decode_after)
        ours = Ours(path, args.threads, longest + args.gen_tokens + 8, args.repeats, args.kv_cache_dtype)
        for n in args.prompts:
            print(f"{path.name}: prefill {n}…", file=sys.stderr, flush=True)
            mine, _ = ours.measure(n, 1)
            theirs, how = ik(args.llama_bench, path, args.threads, args.repeats, ["-p", str(n), "-n", "0"])
            rows.append((path.name, f"prefill {n:,}", theirs, how, mine))
        for n in args.decode_after:
            print(f"{path.name}: decode after {n}…", file=sys.stderr, flush=True)
            _, mine = ours.measure(n, args.gen_tokens)
            gp = f"{n},{args.gen_tokens}"
            theirs, how = ik(args.llama_bench, path, args.threads, args.repeats, ["-p", "0", "-n", "0", "-gp", gp])
            rows.append((path.name, f"decode after {n:,}", theirs, how, mine))
        cache = ours.model.kv_cache_dtype
        ours.model.close()

    lines = [
        (
            f"{args.threads} threads; median of {args.repeats} after a warm-up; decode of {args.gen_tokens} tokens; "
            f"smolcandle {smolcandle.__version__} ({smolcandle.build_info()['cpu']}, Python iterator, speculation off, "
            f"{cache} cache); ik_llama.cpp's llama-bench, its defaults (flash attention, F16 cache), "
            "the better of -rtr 0 and 1."
        ),
        "",
        "| file | measure | ik_llama.cpp tok/s | | smolcandle tok/s | ours / ik |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name, what, theirs, how, mine in rows:
        lines.append(f"| {name} | {what} | {theirs:.1f} | {how} | {mine:.1f} | {mine / theirs:.2f}x |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_ik.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
