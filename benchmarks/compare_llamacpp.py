#!/usr/bin/env python3
"""Prefill and decode speed of smolcandle against llama.cpp (llama-cpp-python) on the same GGUF
files and thread count, in one run: our Rust bench binary, our Python iterator, and llama.cpp.

    python benchmarks/compare_llamacpp.py [--threads 2] [--prompt-tokens 512] [--gen-tokens 128] FILE...

Writes a markdown table (stdout and benchmarks/results/compare.md). Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "smolcandle-engine", "--bin", "smolcandle-bench"], cwd=ROOT, check=True)
    return target / "release" / "smolcandle-bench"


def prompt_ids(n_vocab_ok: list[int], n: int) -> list[int]:
    return [n_vocab_ok[i % len(n_vocab_ok)] for i in range(n)]


def run_rust(binary: Path, path: Path, args) -> dict:
    out = subprocess.run(
        [str(binary), str(path), "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
         "--gen-tokens", str(args.gen_tokens), "--repeats", str(args.repeats), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    r = json.loads(out)
    return {"prefill": r["prefill_tps"], "decode": r["decode_tps"]}


def run_python(path: Path, ids: list[int], args) -> dict:
    import smolcandle

    # No prefix cache: every repeat computes its whole prompt, as llama.cpp is measured.
    model = smolcandle.Model.load(path, n_threads=args.threads, n_ctx=args.prompt_tokens + args.gen_tokens + 8, prefix_cache_mib=0)
    best = {"prefill": 0.0, "decode": 0.0}
    for i in range(args.repeats + 1):
        stream = model.generate(ids, max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        first = None
        n = 0
        for chunk in stream:
            n += len(chunk.token_ids)
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if i == 0:
            continue
        u = stream.usage
        # As seen from Python: prefill until the first chunk, decode from there to the end.
        best["prefill"] = max(best["prefill"], u.prompt_tokens / (first - start))
        best["decode"] = max(best["decode"], (u.completion_tokens - 1) / (end - first))
    model.close()
    return best


def run_llamacpp(path: Path, ids: list[int], args) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=args.prompt_tokens + args.gen_tokens + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    best = {"prefill": 0.0, "decode": 0.0}
    for i in range(args.repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = ids[-1]
        for _ in range(args.gen_tokens - 1):
            llm.eval([tok])
        t2 = time.perf_counter()
        if i == 0:
            continue
        best["prefill"] = max(best["prefill"], len(ids) / (t1 - t0))
        best["decode"] = max(best["decode"], (args.gen_tokens - 1) / (t2 - t1))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    binary = bench_binary()
    rows = []
    for path in args.files:
        ids = prompt_ids(list(range(300, 500)), args.prompt_tokens)
        print(f"{path.name}: rust…", file=sys.stderr)
        rust = run_rust(binary, path, args)
        print(f"{path.name}: python…", file=sys.stderr)
        py = run_python(path, ids, args)
        print(f"{path.name}: llama.cpp…", file=sys.stderr)
        ll = run_llamacpp(path, ids, args)
        rows.append((path.name, rust, py, ll))
    import llama_cpp

    lines = [
        f"{args.threads} threads, prefill of a {args.prompt_tokens}-token prompt, decode of {args.gen_tokens} tokens, "
        f"best of {args.repeats} after a warm-up; llama-cpp-python {llama_cpp.__version__}.",
        "",
        "| model | | llama.cpp | smolcandle (Rust) | ratio | smolcandle (Python iterator) | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rust, py, ll in rows:
        for what in ("prefill", "decode"):
            lines.append(
                f"| {name} | {what} tok/s | {ll[what]:.1f} | {rust[what]:.1f} | {rust[what] / ll[what]:.2f}x "
                f"| {py[what]:.1f} | {py[what] / ll[what]:.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
