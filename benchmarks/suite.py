#!/usr/bin/env python3
"""The benchmark suite: smolcandle against llama.cpp (llama-cpp-python) on the same GGUF files
and thread count, in one run.

    python benchmarks/suite.py [--threads 2] [--repeats 5] [--llama-python PY] [--out DIR] FILE...

For each file and engine, in a process of its own (so load time and peak RSS are its own):

- load time, and peak RSS at the end of the run, with the key/value storage held at its peak
  (smolcandle: running and kept caches; llama.cpp: its one cache, allocated at load);
- prefill tokens/s of a 512-token prompt and single-stream decode tokens/s over 128 tokens:
  the median of ``--repeats`` rounds (default 5) after a warm-up round, each round's prompt different so
  nothing is reused. In each round the two engines and smolcandle's Rust bench binary run one
  after the other, so that all three meet the machine in the same state: on a shared machine
  speed drifts by more than the differences measured, and rounds taken minutes apart (one
  engine's process after the other's) would compare the drift;
- aggregate decode tokens/s with 1, 2, 4 and 8 concurrent streams (16-token prompts, 32
  tokens each): all tokens generated over the wall time from the first request to the last
  token. llama-cpp-python serves one request at a time, so its streams run one after another;
- time to first token at turn 1 and turn 8 of a conversation whose user messages are the same
  length (each turn's prompt is the previous prompt, the model's own answer and the new
  message, as token ids; both engines reuse what they computed for the earlier turns): each
  turn's median over three conversations;
- memory: peak RSS less the RSS of a bare ``import`` of the engine's module (the interpreter's
  own) and less the key/value storage held, against the file's size x 1.15;
- speculative decoding (``--tasks FILE``, files with trained weights): greedy decode tokens/s of
  input-grounded tasks (rewrite or summarize a given paragraph, fill a JSON schema from a given
  document, edit a given function) and of a free chat, by llama.cpp, by smolcandle decoding
  plainly and by smolcandle with its drafts (a third process), medians of the rounds, which
  take turns as above; whether the drafted output equals the plain one; drafted and accepted
  tokens;
- the key/value cache types (``--tasks`` files): for F32, F16 and Q8_0, the KV bytes of
  a 1,000-token window (the first 1,000 tokens of ``docs/design.md``), the perplexity of
  that window computed against each cache, and the bench binary's decode tokens/s after a
  1,000-token prompt (median of three runs, the types taking turns);
- what a step verifying 2, 4 and 8 rows costs against a one-row step (the bench binary's
  ``--verify-rows``), and from it and the tasks' acceptance an estimate of the speed-up on each
  file.

Every single-stream, stream and conversation figure of smolcandle is plain decoding (drafts
off), so that the engines are compared on the same work; the tasks' rows show the drafts.

The bench binary (``smolcandle-bench``, one warm-up and one measured run per round) measures the
same prefill and decode, so the Python iterator can be compared with it. The markdown table and a
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
TURNS, ANSWER_TOKENS, CONVERSATIONS = 8, 24, 3
N_CTX = 2048
TASK_TOKENS, TASK_ROUNDS, VERIFY_ROWS = 256, 3, (2, 4, 8)
KV_TYPES, WINDOW_TOKENS, KV_ROUNDS = ("f32", "f16", "q8_0"), 1000, 3

ARTICLE = (
    "The old lighthouse at Kessock Point stood at the edge of the cliff for more than two hundred years. Every night "
    "its keeper, Margaret Ross, climbed the ninety-six narrow stairs, trimmed the wick and wound the clockwork that "
    "turned the great lens, so that ships passing in the dark could find their way around the rocks. In 1962 the "
    "light was automated, and the keeper's cottage became a small museum, which now welcomes about four thousand "
    "visitors each summer. The lens itself, made in Paris in 1851, was moved to the museum in 1998 and replaced by "
    "an electric beacon that can be seen from twenty-two miles away."
)
FUNCTION = """def average(values):
    total = 0
    count = 0
    for v in values:
        if v is None:
            continue
        total += v
        count += 1
    if count == 0:
        return 0.0
    return total / count
"""
SCHEMA = {
    "type": "object",
    "properties": {
        "place": {"type": "string"},
        "keeper": {"type": "string"},
        "stairs": {"type": "integer"},
        "automated_in": {"type": "integer"},
        "lens_made_in": {"type": "string"},
        "visitors_per_summer": {"type": "integer"},
    },
    "required": ["place", "keeper", "stairs", "automated_in", "lens_made_in", "visitors_per_summer"],
}
# name -> (user message, JSON schema the answer follows or None); the last is free chat.
TASKS = {
    "rewrite a paragraph": (f"Rewrite this paragraph in the present tense, changing nothing else:\n\n{ARTICLE}", None),
    "summarize a paragraph": (f"Summarize this paragraph in three sentences, in its own words:\n\n{ARTICLE}", None),
    "JSON from a document": (f"Fill in the JSON object from this document:\n\n{ARTICLE}", SCHEMA),
    "edit a function": (f"Rename the variable `total` to `running_sum` in this function, and write the whole function:\n\n```python\n{FUNCTION}```", None),
    "free chat": ("Write a short story about a cat who learns to sail.", None),
}


def chatml(message: str) -> str:
    return f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


def prompt(n: int, variant: int) -> list[int]:
    """``n`` ordinary token ids; different ``variant``s differ from their first token."""
    return [300 + (variant * 37 + i) % 200 for i in range(n)]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- engines -------------------------------------------------------------------------------------


def timed(stream) -> tuple[float, float, list[int]]:
    """Reads a stream of chunks: (when its first token came, when it ended, the ids)."""
    first, out = None, []
    for chunk in stream:
        if first is None:
            first = time.perf_counter()
        out += chunk.token_ids
    end = time.perf_counter()
    return first or end, end, out


class Smolcandle:
    name = "smolcandle"

    def __init__(self, path: str, threads: int, speculative: bool = False) -> None:
        import smolcandle

        self.model = smolcandle.Model.load(path, n_threads=threads, n_ctx=N_CTX, speculative=speculative)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=False)

    def first_token_and_rest(self, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> tuple[float, float, list[int]]:
        """(seconds to the first token, seconds from it to the end, generated ids)."""
        t0 = time.perf_counter()
        stream = self.model.generate(ids, max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
        first, end, out = timed(stream)
        self.last_usage = stream.usage
        self.last_reused = stream.usage.cached_tokens
        return first - t0, end - first, out

    def logits_digest(self, ids: list[int]) -> dict:
        """The SHA-256 of the logits of ``ids`` (every position), and the build's kernels."""
        import hashlib

        import smolcandle

        return {"sha256": hashlib.sha256(self.model.logits(ids).tobytes()).hexdigest(), "simd": smolcandle.build_info()["simd"]}

    def engine_decode_tps(self) -> float | None:
        """The last generation's decode tokens/s by the engine's own clock, as the bench binary
        reports it: what the iterator's figure is, less the iterator."""
        return self.last_usage.decode_tokens_per_second

    def kv_peak(self) -> int | None:
        """The most key/value storage held at once: running sequences' caches and kept ones."""
        return self.model.kv_cache_bytes["peak_bytes"]

    def concurrent(self, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        streams = [self.model.generate(p, max_tokens=max_tokens, temperature=0, ignore_eos=True) for p in prompts]
        n = sum(len(c.token_ids) for s in streams for c in s)
        return n, time.perf_counter() - t0

    def task(self, ids: list[int], schema: dict | None) -> dict:
        """Greedy decode of a task: tokens/s after the first token, the ids, the drafts."""
        stream = self.model.generate(ids, max_tokens=TASK_TOKENS, temperature=0, json_schema=schema)
        first, end, out = timed(stream)
        u = stream.usage
        return {"decode_tps": (len(out) - 1) / (end - first), "ids": out, "drafted": u.drafted_tokens, "accepted": u.accepted_tokens}


class SmolcandleSpeculative(Smolcandle):
    name = "smolcandle-speculative"

    def __init__(self, path: str, threads: int) -> None:
        super().__init__(path, threads, speculative=True)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        self.version = llama_cpp.__version__

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def first_token_and_rest(self, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> tuple[float, float, list[int]]:
        # Llama.generate keeps the evaluated tokens and reuses their longest common prefix with
        # all of the prompt but its last token.
        self.last_reused = 0
        for a, b in zip(self.llm._input_ids, ids[:-1]):
            if a != b:
                break
            self.last_reused += 1
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

    def engine_decode_tps(self) -> float | None:
        return None

    def concurrent(self, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for p in prompts:  # one request at a time, as llama-cpp-python serves them
            n += len(self.first_token_and_rest(p, max_tokens)[2])
        return n, time.perf_counter() - t0

    def task(self, ids: list[int], schema: dict | None) -> dict:
        import llama_cpp

        grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema else None
        t0 = time.perf_counter()
        first, out = None, []
        for tok in self.llm.generate(ids, temp=0.0, reset=True, grammar=grammar):
            if first is None:
                first = time.perf_counter()
            if tok == self.llm.token_eos() or len(out) == TASK_TOKENS:
                break
            out.append(tok)
        end = time.perf_counter()
        return {"decode_tps": (len(out) - 1) / (end - (first or t0)), "ids": out}


def single(engine, variant: int) -> dict:
    """One prefill of a 512-token prompt and decode of 128 tokens."""
    ttft, rest, ids = engine.first_token_and_rest(prompt(PROMPT_TOKENS, variant), GEN_TOKENS)
    out = {"prefill_tps": PROMPT_TOKENS / ttft, "decode_tps": (len(ids) - 1) / rest}
    if (own := engine.engine_decode_tps()) is not None:
        out["engine_decode_tps"] = own
    return out


def at_scale(engine) -> dict:
    """Concurrent streams, time to first token over a conversation, and the process's memory."""
    out: dict = {"aggregate_tps": {}}
    for n in STREAMS:
        got, seconds = engine.concurrent([prompt(STREAM_PROMPT, 100 + 10 * n + i) for i in range(n)], STREAM_TOKENS)
        out["aggregate_tps"][str(n)] = got / seconds
    conversations = []
    # Each conversation has its own system prompt, different from its first word, so that the
    # turn 1s share no more than the template's first tokens with what came before.
    for c in range(CONVERSATIONS):
        ids = engine.tokenize(f"<|im_start|>system\n{c + 1}. You are a helpful assistant.<|im_end|>\n")
        ttft = []
        for turn in range(1, TURNS + 1):
            message = f"<|im_start|>user\nQuestion {turn}: in one sentence, what is topic number {turn} about?<|im_end|>\n<|im_start|>assistant\n"
            new = engine.tokenize(message)
            ids = ids + new
            first, _, answer = engine.first_token_and_rest(ids, ANSWER_TOKENS, ignore_eos=False)
            computed = len(ids) - engine.last_reused
            ttft.append({"turn": turn, "seconds": first, "new_tokens": len(new), "computed_tokens": computed, "prompt_tokens": len(ids)})
            ids = ids + answer + engine.tokenize("<|im_end|>\n")
        conversations.append(ttft)
    # Each turn's median over the conversations: one prompt's time is one sample of a machine
    # whose speed drifts by tens of percent.
    out["ttft"] = [{**turns[0], "seconds": median([t["seconds"] for t in turns])} for turns in zip(*conversations)]
    out["conversations"] = conversations
    out["peak_rss"] = peak_rss()
    out["kv_peak"] = engine.kv_peak()
    return out


ENGINES = {e.name: e for e in (Smolcandle, SmolcandleSpeculative, LlamaCpp)}


def serve(engine_name: str, path: str, threads: int) -> None:
    """The worker: loads the engine, then answers one JSON line per request line on stdin."""
    __import__("llama_cpp" if engine_name == "llama.cpp" else "smolcandle")
    bare = peak_rss()  # the interpreter and the engine's module, before any model
    t0 = time.perf_counter()
    engine = ENGINES[engine_name](path, threads)
    reply = {"engine": engine.name, "load_s": time.perf_counter() - t0, "version": getattr(engine, "version", None), "bare_rss": bare}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "single":
            reply = single(engine, request["variant"])
        elif request["op"] == "logits":
            reply = engine.logits_digest(prompt(64, request["variant"]))
        elif request["op"] == "task":
            message, schema = TASKS[request["task"]]
            reply = engine.task(engine.tokenize(chatml(message)), schema)
        else:
            reply = at_scale(engine)
        print(json.dumps(reply), flush=True)


# -- the run -------------------------------------------------------------------------------------


class Worker:
    """An engine loaded in a process of its own, measuring on request."""

    def __init__(self, python: str, engine: str, path: Path, threads: int) -> None:
        cmd = [python, __file__, "--worker", engine, "--threads", str(threads), str(path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.loaded = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.proc.args[3]} exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def run_file(path: Path, args) -> dict:
    """Every figure for one file: single-stream rounds interleaved across the three runners,
    then each engine's concurrent streams, conversation and memory."""
    from compare_llamacpp import bench_binary, run_rust

    binary = bench_binary()
    ns = argparse.Namespace(threads=args.threads, prompt_tokens=PROMPT_TOKENS, gen_tokens=GEN_TOKENS, repeats=1)
    r = {"file": path.name, "threads": args.threads, "size": path.stat().st_size, "kv_bytes": kv_bytes(path)}
    workers = {}
    for engine, python in (("smolcandle", sys.executable), ("llama.cpp", args.llama_python)):
        print(f"{path.name}: loading {engine}…", file=sys.stderr, flush=True)
        workers[engine] = Worker(python, engine, path, args.threads)
    def rust(variant: int) -> dict:  # the binary's prompt is its own, the same every round
        got = run_rust(binary, path, ns)
        return {"prefill_tps": got["prefill"], "decode_tps": got["decode"]}

    runners = [*((e, lambda k, w=w: w.ask(op="single", variant=k)) for e, w in workers.items()), ("rust", rust)]
    rounds: dict[str, list[dict]] = {name: [] for name, _ in runners}
    for k in range(args.repeats + 1):
        print(f"{path.name}: round {k}{' (warm-up)' if k == 0 else ''}…", file=sys.stderr, flush=True)
        # Each round starts with the next runner, so that none always follows the same one.
        for name, run in runners[k % 3 :] + runners[: k % 3]:
            if k or name != "rust":  # the binary warms up in each of its runs
                got = run(k)
                if k:
                    rounds[name].append(got)
    for engine, w in workers.items():
        print(f"{path.name}: {engine} streams and conversation…", file=sys.stderr, flush=True)
        r[engine] = {**w.loaded, **w.ask(op="at_scale")}
        w.close()
    r["rust"] = {}
    for runner, got in rounds.items():
        figures = {key: median([g[key] for g in got]) for key in ("prefill_tps", "decode_tps")}
        figures["rounds"] = got
        (r["rust"] if runner == "rust" else r[runner]).update(figures)
    # The iterator against the binary round by round (they ran one after the other), so that
    # the machine's drift from round to round cancels; and against the engine's own clock in
    # the same runs, which is the iterator's cost alone.
    ours = rounds["smolcandle"]
    r["iterator_vs_binary"] = [a["decode_tps"] / b["decode_tps"] for a, b in zip(ours, rounds["rust"])]
    r["iterator_vs_engine"] = [g["decode_tps"] / g["engine_decode_tps"] for g in ours]
    print(f"{path.name}: verification costs…", file=sys.stderr, flush=True)
    rows = ",".join(map(str, VERIFY_ROWS))
    got = subprocess.run([str(binary), str(path), "--threads", str(args.threads), "--prompt-tokens", "512", "--gen-tokens", "2", "--repeats", "1", "--json", "--verify-rows", rows], check=True, capture_output=True, text=True)
    r["verify_cost"] = json.loads(got.stdout)["verify_cost"]
    if any(path.resolve() == t.resolve() for t in args.tasks):
        r["tasks"] = run_tasks(path, args)
        print(f"{path.name}: key/value cache types…", file=sys.stderr, flush=True)
        r["kv_types"] = kv_types(path, args, binary)
    return r


def kv_types(path: Path, args, binary: Path) -> dict:
    """Each KV cache type's bytes for the window and the window's perplexity (in a process of
    its own: a child inherits its parent's peak RSS, which the later files' workers report),
    and decode speed."""
    out: dict = {}
    for kv in KV_TYPES:
        cmd = [sys.executable, __file__, str(path), "--threads", str(args.threads), "--kv-window", kv]
        out[kv] = {**json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout), "decode_tps": []}
    for _ in range(KV_ROUNDS):
        for kv in KV_TYPES:
            cmd = [str(binary), str(path), "--threads", str(args.threads), "--prompt-tokens", str(WINDOW_TOKENS), "--gen-tokens", "64", "--repeats", "1", "--json", "--kv-cache-dtype", kv]
            got = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[kv]["decode_tps"].append(json.loads(got.stdout)["decode_tps"])
    for figures in out.values():
        figures["decode_tps"] = median(figures["decode_tps"])
    out["window_tokens"] = [out[kv].pop("window_tokens") for kv in KV_TYPES][0]
    return out


def kv_window(path: str, threads: int, kv: str) -> dict:
    """The window's perplexity computed against a ``kv`` cache, and the bytes its positions
    take there."""
    import numpy as np
    import smolcandle

    model = smolcandle.Model.load(path, n_threads=threads, kv_cache_dtype=kv, prefix_cache_mib=0)
    ids = model.tokenize((ROOT / "docs" / "design.md").read_text())[:WINDOW_TOKENS]
    kv_bytes = model.kv_bytes_per_token * len(ids)
    logits = model.logits(ids)[:-1].astype(np.float64)
    top = logits.max(axis=1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    nll = float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).mean())
    return {"kv_bytes": kv_bytes, "perplexity": float(np.exp(nll)), "window_tokens": len(ids)}


def run_tasks(path: Path, args) -> dict:
    """The speculative-decoding tasks: each engine in a process of its own, the three taking
    turns in each round, as the single-stream rounds do."""
    workers = {e: Worker(py, e, path, args.threads) for e, py in (("smolcandle", sys.executable), ("smolcandle-speculative", sys.executable), ("llama.cpp", args.llama_python))}
    out: dict = {}
    for name in TASKS:
        print(f"{path.name}: task {name}…", file=sys.stderr, flush=True)
        got: dict[str, list[dict]] = {e: [] for e in workers}
        order = list(workers)
        for k in range(TASK_ROUNDS + 1):
            for e in order[k % 3 :] + order[: k % 3]:
                reply = workers[e].ask(op="task", task=name)
                if k:  # the first round warms up
                    got[e].append(reply)
        spec, plain = got["smolcandle-speculative"], got["smolcandle"]
        out[name] = {
            **{e: median([g["decode_tps"] for g in runs]) for e, runs in got.items()},
            "identical": all(a["ids"] == b["ids"] for a, b in zip(spec, plain)),
            "tokens": len(spec[0]["ids"]),
            "drafted": spec[0]["drafted"],
            "accepted": spec[0]["accepted"],
            "spec_vs_plain": median([a["decode_tps"] / b["decode_tps"] for a, b in zip(spec, plain)]),
        }
    for w in workers.values():
        w.close()
    return out


def speedup_estimate(cost: dict[str, float], accept: float) -> tuple[float, int]:
    """The best expected speed-up over the measured verification costs, at a per-token
    acceptance ``accept``: ``(1 + a + … + a^k) / cost(k + 1)`` over drafts of k = 1, 3, 7."""
    best = (1.0, 0)
    for rows, c in cost.items():
        k = int(rows) - 1
        expected = sum(accept**j for j in range(k + 1))
        best = max(best, (expected / c, k))
    return best


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
            f"decode of {GEN_TOKENS} tokens (median of {args.repeats} rounds after a warm-up, the engines and the "
            f"bench binary taking turns in each round); aggregate: {STREAM_TOKENS} tokens per "
            f"stream after {STREAM_PROMPT}-token prompts; time to first token with {TURNS - 1} earlier turns of "
            f"{ANSWER_TOKENS}-token answers, median of {CONVERSATIONS} conversations; context {N_CTX}. Ratios are smolcandle against llama.cpp, "
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
        lines.append(f"| decode tok/s (Rust bench binary) | | {rust['decode_tps']:.1f} | |")
        pairs = ", ".join(f"{x:.2f}" for x in r["iterator_vs_binary"])
        lines.append(f"| iterator / binary, median of the rounds' ratios | | {median(r['iterator_vs_binary']):.2f}x | rounds: {pairs} |")
        lines.append(f"| iterator / engine's own clock, same runs | | {median(r['iterator_vs_engine']):.3f}x | |")
        lines.append(f"| prefill tok/s (Rust bench binary) | | {rust['prefill_tps']:.1f} | |")
        for n in STREAMS:
            row(f"aggregate decode tok/s, {n} stream{'s' if n > 1 else ''}", ll["aggregate_tps"][str(n)], s["aggregate_tps"][str(n)])
        one = s["aggregate_tps"]["1"]
        lines.append(f"| smolcandle 8 streams / 1 stream | | {s['aggregate_tps']['8'] / one:.2f}x | |")
        for t in (0, TURNS - 1):
            a, b = ll["ttft"][t], s["ttft"][t]
            row(f"time to first token, turn {t + 1} (ms; {b['computed_tokens']} of {b['prompt_tokens']} computed)", 1000 * a["seconds"], 1000 * b["seconds"], "{:.0f}", better_low=True)
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
        row(
            "peak RSS − bare import − KV held, MiB",
            (ll["peak_rss"] - ll["bare_rss"] - kv / 2) / 2**20,
            (s["peak_rss"] - s["bare_rss"] - ours_kv) / 2**20,
            "{:.0f}",
            better_low=True,
        )
        lines.append(f"| bare import RSS MiB | {ll['bare_rss'] / 2**20:.0f} | {s['bare_rss'] / 2**20:.0f} | |")
        cost = r["verify_cost"]
        lines.append(f"| verifying 2 / 4 / 8 rows, against one decode step | | {' / '.join(f'{cost[str(n)]:.2f}x' for n in VERIFY_ROWS)} | |")
        lines.append("")
        if "tasks" in r:
            lines += [
                f"Greedy decode with speculative decoding, {r['file']} ({TASK_TOKENS} tokens at most, median of {TASK_ROUNDS} rounds):",
                "",
                "| task | llama.cpp tok/s | smolcandle plain | smolcandle drafts | drafts / llama.cpp | drafts / plain | accepted / drafted | output = plain |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            for name, t in r["tasks"].items():
                lines.append(
                    f"| {name} ({t['tokens']} tokens) | {t['llama.cpp']:.1f} | {t['smolcandle']:.1f} | {t['smolcandle-speculative']:.1f} | "
                    f"{t['smolcandle-speculative'] / t['llama.cpp']:.2f}x | {t['spec_vs_plain']:.2f}x | {t['accepted']} / {t['drafted']} | {'yes' if t['identical'] else 'NO'} |"
                )
            lines.append("")
        if "kv_types" in r:
            k = r["kv_types"]
            base = k["f32"]
            lines += [
                f"Key/value cache types, {r['file']}: a {k['window_tokens']}-token window (the start of docs/design.md), computed in one prompt; decode after a {WINDOW_TOKENS}-token prompt (bench binary, median of {KV_ROUNDS} runs):",
                "",
                "| cache | KV MiB for the window | / F32 | perplexity | change against F32 | decode tok/s | / F32 |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for kv in KV_TYPES:
                t = k[kv]
                lines.append(
                    f"| {kv} | {t['kv_bytes'] / 2**20:.1f} | {t['kv_bytes'] / base['kv_bytes']:.3f} | {t['perplexity']:.3f} | "
                    f"{100 * (t['perplexity'] / base['perplexity'] - 1):+.2f}% | {t['decode_tps']:.1f} | {t['decode_tps'] / base['decode_tps']:.2f}x |"
                )
            lines.append("")
    grounded = [t for r in results for name, t in r.get("tasks", {}).items() if name != "free chat"]
    if grounded:
        drafted = sum(t["drafted"] for t in grounded)
        accept = sum(t["accepted"] for t in grounded) / drafted if drafted else 0.0
        lines.append(f"Estimated speed-up of the grounded tasks from their acceptance ({accept:.2f} of drafted tokens kept) and each file's verification costs:")
        lines.append("")
        for r in results:
            gain, k = speedup_estimate(r["verify_cost"], accept)
            lines.append(f"- {r['file']}: {gain:.2f}x (drafts of {k})")
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
    ap.add_argument("--repeats", type=int, default=5, help="single-stream rounds after the warm-up (default 5)")
    ap.add_argument("--llama-python", default=os.environ.get("SMOLCANDLE_LLAMA_PYTHON", sys.executable))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tasks", type=Path, action="append", default=[], help="a file (one of FILE) with trained weights to run the speculative-decoding tasks on (repeatable)")
    ap.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    ap.add_argument("--kv-window", choices=KV_TYPES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serve(args.worker, str(args.files[0]), args.threads)
        return
    if args.kv_window:
        print(json.dumps(kv_window(str(args.files[0]), args.threads, args.kv_window)))
        return
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    results = [run_file(path, args) for path in args.files]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(results, indent=1) + "\n")
    md = table(results, args)
    (args.out / "suite.md").write_text(md + "\n")
    chart(results, args.out / "suite.png")
    print(md)


if __name__ == "__main__":
    main()
