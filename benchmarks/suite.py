#!/usr/bin/env python3
"""The benchmark suite: smolcandle against llama.cpp (llama-cpp-python) on the same GGUF files
and thread count, in one run.

    python benchmarks/suite.py [--threads 2] [--llama-python PY] [--out DIR] FILE...

For each file and engine, in a process of its own (so load time and peak RSS are its own):

- load time, and peak RSS at the end of the run, with the key/value storage held at its peak
  (smolcandle: running and kept caches; llama.cpp: its one cache, allocated at load);
- prefill tokens/s of a 512-token prompt, single-stream decode tokens/s over 128 tokens (best
  of ``--repeats`` after a warm-up; each repeat's prompt differs, so nothing is reused);
- aggregate decode tokens/s with 1, 2, 4 and 8 concurrent streams (16-token prompts, 32
  tokens each): all tokens generated over the wall time from the first request to the last
  token. llama-cpp-python serves one request at a time, so its streams run one after another;
- time to first token at turn 1 and turn 8 of a conversation whose user messages are the same
  length (each turn's prompt is the previous prompt, the model's own answer and the new
  message, as token ids; both engines reuse what they computed for the earlier turns).

smolcandle's Rust bench binary (``smolcandle-bench``) is run on the same file for prefill and
single-stream decode, so the Python iterator can be compared with it. The markdown table and a
PNG chart are written to ``--out`` (default ``benchmarks/results``): ``suite.md``, ``suite.png``
and the raw figures in ``suite.json``. ``--llama-python`` is an interpreter with llama-cpp-python
(default ``$SMOLCANDLE_LLAMA_PYTHON`` or this one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT_TOKENS, GEN_TOKENS = 512, 128
STREAMS, STREAM_PROMPT, STREAM_TOKENS = (1, 2, 4, 8), 16, 32
TURNS, ANSWER_TOKENS = 8, 24
N_CTX = 2048


def prompt(n: int, variant: int) -> list[int]:
    """``n`` ordinary token ids; different ``variant``s differ from their first token."""
    return [300 + (variant * 37 + i) % 200 for i in range(n)]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- engines -------------------------------------------------------------------------------------


class Smolcandle:
    name = "smolcandle"

    def __init__(self, path: str, threads: int) -> None:
        import smolcandle

        self.model = smolcandle.Model.load(path, n_threads=threads, n_ctx=N_CTX)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=False)

    def first_token_and_rest(self, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> tuple[float, float, list[int]]:
        """(seconds to the first token, seconds from it to the end, generated ids)."""
        t0 = time.perf_counter()
        stream = self.model.generate(ids, max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
        first, out = None, []
        for chunk in stream:
            if first is None:
                first = time.perf_counter()
            out += chunk.token_ids
        end = time.perf_counter()
        first = first or end
        return first - t0, end - first, out

    def kv_peak(self) -> int | None:
        """The most key/value storage held at once: running sequences' caches and kept ones."""
        return self.model.kv_cache_bytes["peak_bytes"]

    def concurrent(self, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        streams = [self.model.generate(p, max_tokens=max_tokens, temperature=0, ignore_eos=True) for p in prompts]
        n = sum(len(c.token_ids) for s in streams for c in s)
        return n, time.perf_counter() - t0


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        self.version = llama_cpp.__version__

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def first_token_and_rest(self, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> tuple[float, float, list[int]]:
        # Llama.generate keeps the evaluated tokens and reuses their longest common prefix.
        t0 = time.perf_counter()
        first, out = None, []
        for tok in self.llm.generate(ids, temp=0.0, reset=True):
            if first is None:
                first = time.perf_counter()
            if not ignore_eos and tok == self.llm.token_eos():
                break
            out.append(tok)
            if len(out) == max_tokens:
                break
        end = time.perf_counter()
        first = first or end
        return first - t0, end - first, out

    def kv_peak(self) -> int | None:
        return None  # its one cache, allocated at load: see kv_bytes

    def concurrent(self, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for p in prompts:  # one request at a time, as llama-cpp-python serves them
            n += len(self.first_token_and_rest(p, max_tokens)[2])
        return n, time.perf_counter() - t0


def measure(engine_name: str, path: str, threads: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    engine = (Smolcandle if engine_name == "smolcandle" else LlamaCpp)(path, threads)
    out: dict = {"engine": engine.name, "load_s": time.perf_counter() - t0, "version": getattr(engine, "version", None)}
    prefill = decode = 0.0
    for r in range(repeats + 1):
        ttft, rest, ids = engine.first_token_and_rest(prompt(PROMPT_TOKENS, r), GEN_TOKENS)
        if r:  # the first run is a warm-up
            prefill = max(prefill, PROMPT_TOKENS / ttft)
            decode = max(decode, (len(ids) - 1) / rest)
    out["prefill_tps"], out["decode_tps"] = prefill, decode
    out["aggregate_tps"] = {}
    for n in STREAMS:
        got, seconds = engine.concurrent([prompt(STREAM_PROMPT, 100 + 10 * n + i) for i in range(n)], STREAM_TOKENS)
        out["aggregate_tps"][str(n)] = got / seconds
    ids = engine.tokenize("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    ttft = []
    for turn in range(1, TURNS + 1):
        message = f"<|im_start|>user\nQuestion {turn}: in one sentence, what is topic number {turn} about?<|im_end|>\n<|im_start|>assistant\n"
        new = engine.tokenize(message)
        ids = ids + new
        first, _, answer = engine.first_token_and_rest(ids, ANSWER_TOKENS, ignore_eos=False)
        ttft.append({"turn": turn, "seconds": first, "new_tokens": len(new), "prompt_tokens": len(ids)})
        ids = ids + answer + engine.tokenize("<|im_end|>\n")
    out["ttft"] = ttft
    out["peak_rss"] = peak_rss()
    out["kv_peak"] = engine.kv_peak()
    return out


# -- the run -------------------------------------------------------------------------------------


def run_worker(python: str, engine: str, path: Path, args) -> dict:
    cmd = [python, __file__, "--worker", engine, "--threads", str(args.threads), "--repeats", str(args.repeats), str(path)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def run_bench_binary(path: Path, args) -> dict:
    from compare_llamacpp import bench_binary, run_rust

    ns = argparse.Namespace(threads=args.threads, prompt_tokens=PROMPT_TOKENS, gen_tokens=GEN_TOKENS, repeats=args.repeats)
    return run_rust(bench_binary(), path, ns)


def kv_bytes(path: Path) -> int:
    """One sequence's F32 key/value cache at N_CTX positions."""
    from smolcandle._native import inspect_gguf

    meta = inspect_gguf(str(path))["metadata"]
    arch = meta["general.architecture"]
    n_layer, n_head = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count"]
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    head_dim = meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // n_head)
    return n_layer * 2 * n_kv * head_dim * 4 * N_CTX


def table(results: list[dict], args) -> str:
    version = results[0]["llama.cpp"].get("version", "?") if results else "?"
    lines = [
        (
            f"{args.threads} threads; llama-cpp-python {version}; prefill of a {PROMPT_TOKENS}-token prompt, "
            f"decode of {GEN_TOKENS} tokens (best of {args.repeats} after a warm-up); aggregate: {STREAM_TOKENS} tokens per "
            f"stream after {STREAM_PROMPT}-token prompts; time to first token with {TURNS - 1} earlier turns of "
            f"{ANSWER_TOKENS}-token answers; context {N_CTX}. Ratios are smolcandle against llama.cpp, "
            "above 1x in smolcandle's favour (for times and memory: llama.cpp's figure over ours)."
        ),
        "",
    ]
    for r in results:
        s, ll, rust = r["smolcandle"], r["llama.cpp"], r["rust"]
        size, kv = r["size"], r["kv_bytes"]
        lines += [
            f"**{r['file']}** ({size / 2**20:.0f} MiB)",
            "",
            "| | llama.cpp | smolcandle | ratio |",
            "|---|---:|---:|---:|",
        ]

        def row(label: str, a: float, b: float, fmt: str = "{:.1f}", better_low: bool = False, lines: list[str] = lines) -> None:
            ratio = (a / b if better_low else b / a) if a and b else float("nan")
            lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}x |")

        row("prefill tok/s", ll["prefill_tps"], s["prefill_tps"])
        row("decode tok/s (Python iterator)", ll["decode_tps"], s["decode_tps"])
        lines.append(f"| decode tok/s (Rust bench binary) | | {rust['decode']:.1f} | iterator / binary {s['decode_tps'] / rust['decode']:.2f}x |")
        lines.append(f"| prefill tok/s (Rust bench binary) | | {rust['prefill']:.1f} | |")
        for n in STREAMS:
            row(f"aggregate decode tok/s, {n} stream{'s' if n > 1 else ''}", ll["aggregate_tps"][str(n)], s["aggregate_tps"][str(n)])
        one = s["aggregate_tps"]["1"]
        lines.append(f"| smolcandle 8 streams / 1 stream | | {s['aggregate_tps']['8'] / one:.2f}x | |")
        for t in (0, TURNS - 1):
            a, b = ll["ttft"][t], s["ttft"][t]
            row(f"time to first token, turn {t + 1} (ms; {b['new_tokens']} new of {b['prompt_tokens']})", 1000 * a["seconds"], 1000 * b["seconds"], "{:.0f}", better_low=True)
        lines.append(
            f"| turn 8 / turn 1 | {ll['ttft'][-1]['seconds'] / ll['ttft'][0]['seconds']:.2f}x | {s['ttft'][-1]['seconds'] / s['ttft'][0]['seconds']:.2f}x | |"
        )
        row("load s", ll["load_s"], s["load_s"], "{:.2f}", better_low=True)
        row("peak RSS MiB", ll["peak_rss"] / 2**20, s["peak_rss"] / 2**20, "{:.0f}", better_low=True)
        # llama.cpp allocates one F16 cache of the whole context at load; smolcandle holds F32
        # caches of its sequences (running and kept for reuse) and reports their peak.
        ours_kv = s.get("kv_peak") or 0
        row("KV cache held at peak MiB", kv / 2 / 2**20, ours_kv / 2**20, "{:.0f}", better_low=True)
        row("peak RSS − KV held, MiB", (ll["peak_rss"] - kv / 2) / 2**20, (s["peak_rss"] - ours_kv) / 2**20, "{:.0f}", better_low=True)
        lines.append(f"| target for peak RSS − KV: file x 1.15 | {size * 1.15 / 2**20:.0f} | {size * 1.15 / 2**20:.0f} | |")
        lines.append(f"| (earlier target: file x 1.15 + one {N_CTX}-token F32 KV cache) | | {(size * 1.15 + kv) / 2**20:.0f} | |")
        lines.append("")
    return "\n".join(lines)


def chart(results: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4 * len(results)), squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
    for (left, right), r in zip(axes, results):
        labels = ["prefill", "decode", *(f"{n} stream{'s' if n > 1 else ''}" for n in STREAMS)]
        width = 0.38
        for k, (engine, colour) in enumerate((("llama.cpp", "#888888"), ("smolcandle", "#d9731a"))):
            e = r[engine]
            values = [e["prefill_tps"], e["decode_tps"], *(e["aggregate_tps"][str(n)] for n in STREAMS)]
            xs = [i + (k - 0.5) * width for i in range(len(labels))]
            left.bar(xs, values, width, label=engine, color=colour)
            right.bar([i + (k - 0.5) * width for i in range(2)], [1000 * e["ttft"][0]["seconds"], 1000 * e["ttft"][-1]["seconds"]], width, color=colour)
        left.set_xticks(range(len(labels)), labels)
        left.set_ylabel("tokens/s (log)")
        left.set_yscale("log")
        left.set_title(f"{r['file']}: throughput, {r['threads']} threads")
        left.legend()
        right.set_xticks(range(2), ["turn 1", f"turn {TURNS}"])
        right.set_ylabel("ms")
        right.set_title("time to first token")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--llama-python", default=os.environ.get("SMOLCANDLE_LLAMA_PYTHON", sys.executable))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--worker", choices=["smolcandle", "llama.cpp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, str(args.files[0]), args.threads, args.repeats)))
        return
    results = []
    for path in args.files:
        r = {"file": path.name, "threads": args.threads, "size": path.stat().st_size, "kv_bytes": kv_bytes(path)}
        for engine, python in (("smolcandle", sys.executable), ("llama.cpp", args.llama_python)):
            print(f"{path.name}: {engine}…", file=sys.stderr, flush=True)
            r[engine] = run_worker(python, engine, path, args)
        print(f"{path.name}: smolcandle-bench…", file=sys.stderr, flush=True)
        r["rust"] = run_bench_binary(path, args)
        results.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(results, indent=1) + "\n")
    md = table(results, args)
    (args.out / "suite.md").write_text(md + "\n")
    chart(results, args.out / "suite.png")
    print(md)


if __name__ == "__main__":
    main()
