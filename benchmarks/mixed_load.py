"""Mixed load: what users feel while someone else's long prompt is read, and after a restart.
Each figure is measured for two builds of the package in one run, one after the other, on the
same machine:

    python benchmarks/mixed_load.py --before DIR --after DIR [--out RESULTS.json]
        [--smollm2 SmolLM2-135M-Instruct.Q4_1.gguf] [--model3b smollm3-3b-shape-Q4_K_M.gguf]
        [--only openwebui,mixed,restart]

``DIR`` is a folder that holds the ``smolcandle`` package with its native module (put first on
``PYTHONPATH`` of the worker processes). Three scenarios, each in fresh processes:

- ``openwebui`` (SmolLM2, through ``smolcandle serve``): Open WebUI's recorded chat request (its
  36 built-in tools, about 7,000 tokens; ``shared/data/openwebui-chat-request.json``) is sent
  streamed, and one second into it a 4-token completion request: the short request's time to
  first token, against the same request alone and against the long request's own; then the
  same chat's second turn (the answer and a new question appended), whose time to first token
  is held against the first turn's. Neither request names a ``prompt_cache_key``, as Open WebUI
  sends none.
- ``mixed`` (the 3B shape, in process): 4 streams decode while a 4,000-token prompt arrives:
  their inter-token latency (p50, p99) while it is read, against the same streams alone; and
  that prompt's time to first token, against it alone.
- ``restart`` (the 3B shape, Q8_0 cache): a 4,000-token conversation's next turn (a 16-token
  question) in a new process after the first process computed the conversation and exited,
  against the same in the first process (its cache warm in memory) and against computing it
  all (no cache); and the disk tier's bytes per token.

Figures move between runs; the ratios between builds measured in one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("SMOLCANDLE_HOME", Path.home() / ".cache" / "smolcandle")) / "models"
OPENWEBUI = ROOT.parent / "shared" / "data" / "openwebui-chat-request.json"
SHORT_PROMPT = "The capital of France"
LONG_TOKENS = 4000
STREAMS = 4


# -- workers (run in a process of their own, with the build under test on PYTHONPATH) ----------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_ttft(client: Any, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds to the first streamed chunk with content, and the answer put together."""
    t0 = time.monotonic()
    first = None
    text, calls = [], {}
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            for call in (choice.get("delta") or {}).get("tool_calls") or []:
                c = calls.setdefault(call["index"], {"id": call.get("id"), "type": "function", "function": {"name": "", "arguments": ""}})
                f = call.get("function") or {}
                c["function"]["name"] += f.get("name") or ""
                c["function"]["arguments"] += f.get("arguments") or ""
            if first is None and (piece or calls):
                first = time.monotonic() - t0
            text.append(piece)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return (first if first is not None else time.monotonic() - t0), message


def worker_openwebui(args: dict[str, Any]) -> dict[str, Any]:
    import httpx

    home = tempfile.mkdtemp(prefix="mixed-load-")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLCANDLE_")}
    env["SMOLCANDLE_HOME"] = home
    cmd = [sys.executable, "-m", "smolcandle", "serve", args["smollm2"], "--port", str(port), "--db", f"{home}/h.sqlite3", "--threads", "2", "--temperature", "0", "--max-tokens", "48"]
    log = Path(home) / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if c.get("/healthz").json()["model"]["state"] == "ready":
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(log.read_text())
                time.sleep(0.2)
            body = json.loads(OPENWEBUI.read_text())
            body["model"] = c.get("/v1/models").json()["data"][0]["id"]
            short = {"model": body["model"], "prompt": SHORT_PROMPT, "max_tokens": 8, "temperature": 0}
            _stream_ttft(c, "/v1/completions", short)  # warm up
            short_alone = min(_stream_ttft(c, "/v1/completions", short)[0] for _ in range(3))
            out: dict[str, Any] = {}

            def long_request() -> None:
                out["long_ttft"], out["answer"] = _stream_ttft(c, "/v1/chat/completions", body)

            t = threading.Thread(target=long_request)
            t.start()
            time.sleep(1.0)
            with httpx.Client(base_url=url, timeout=600) as c2:
                short_during, _ = _stream_ttft(c2, "/v1/completions", short)
            t.join()
            turn2 = dict(body, messages=[*body["messages"], out["answer"], {"role": "user", "content": "And what is the capital of Germany?"}])
            second_ttft, _ = _stream_ttft(c, "/v1/chat/completions", turn2)
            usage = c.post("/v1/chat/completions", json={**turn2, "stream": False, "max_tokens": 1}).json()["usage"]
        return {
            "prompt_tokens": usage["prompt_tokens"],
            "short_alone_ttft": short_alone,
            "short_during_ttft": short_during,
            "long_ttft": out["long_ttft"],
            "second_turn_ttft": second_ttft,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def _prompt(model: Any, n: int, seed: int) -> list[int]:
    words = " ".join(f"w{seed}x{i}" for i in range(n))
    ids = model.tokenize(words)
    assert len(ids) >= n
    return ids[:n]


def _load(path: str, **kw: Any) -> Any:
    import smolcandle

    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        return smolcandle.Model.load(path, n_threads=2, **kw)
    except TypeError:  # an older build without an option (the disk tier): without it
        kw.pop("disk_cache_dir", None)
        return smolcandle.Model.load(path, n_threads=2, **kw)


def _decode(model: Any, prompts: list[list[int]], max_tokens: int, stop: threading.Event) -> tuple[list[list[float]], list[Any]]:
    """Starts one stream per prompt, each recording when its tokens arrive, until ``stop``."""
    arrivals: list[list[float]] = [[] for _ in prompts]
    streams = [model.generate(p, max_tokens=max_tokens, temperature=0, ignore_eos=True, reuse_prefix=False) for p in prompts]

    def read(i: int) -> None:
        for chunk in streams[i]:
            now = time.monotonic()
            arrivals[i].extend(now for _ in chunk.token_ids)
            if stop.is_set():
                streams[i].cancel()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return arrivals, [threads, streams]


def _gaps(arrivals: list[list[float]], start: float, end: float) -> list[float]:
    gaps = []
    for times in arrivals:
        inside = [t for t in times if start <= t <= end]
        gaps.extend(b - a for a, b in pairwise(inside) if b > a)
    return gaps


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def worker_mixed(args: dict[str, Any]) -> dict[str, Any]:
    model = _load(args["model3b"], prefix_cache_mib=0, speculative=False)
    short = [_prompt(model, 16, s) for s in range(STREAMS)]
    long = _prompt(model, LONG_TOKENS, 99)
    # The streams alone: their gaps after the first few tokens.
    stop = threading.Event()
    arrivals, (threads, _) = _decode(model, short, 48, stop)
    for t in threads:
        t.join()
    alone_gaps = [g for times in arrivals for g in (b - a for a, b in pairwise(times[4:])) if g > 0]
    # The long prompt alone.
    t0 = time.monotonic()
    s = model.generate(long, max_tokens=1, temperature=0, ignore_eos=True, reuse_prefix=False)
    next(iter(s))
    long_alone = time.monotonic() - t0
    list(s)
    # Both: the streams decoding, then the long prompt arrives.
    stop = threading.Event()
    arrivals, (threads, _) = _decode(model, short, 100_000, stop)
    while min(len(a) for a in arrivals) < 5:
        time.sleep(0.01)
    t0 = time.monotonic()
    s = model.generate(long, max_tokens=1, temperature=0, ignore_eos=True, reuse_prefix=False)
    next(iter(s))
    t1 = time.monotonic()
    list(s)
    stop.set()
    for t in threads:
        t.join()
    during = _gaps(arrivals, t0, t1)
    return {
        "alone_itl_p50": _pct(alone_gaps, 50),
        "alone_itl_p99": _pct(alone_gaps, 99),
        "during_itl_p50": _pct(during, 50),
        "during_itl_p99": _pct(during, 99),
        "during_tokens": len(during),
        "long_alone_ttft": long_alone,
        "long_during_ttft": t1 - t0,
    }


def _turns(model: Any) -> tuple[list[int], list[int], list[int]]:
    """A conversation so far, and two different next questions."""
    return _prompt(model, LONG_TOKENS, 7), _prompt(model, 16, 8), _prompt(model, 16, 9)


def _ttft(model: Any, prompt: list[int], **kw: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    s = model.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True, **kw)
    next(iter(s))
    took = time.monotonic() - t0
    list(s)
    return took, s.usage


def worker_restart(args: dict[str, Any]) -> dict[str, Any]:
    """``phase`` first: computes the conversation so far and exits (the disk tier's writer
    finishes first); second, in a new process: its next turn, then another next turn (the
    conversation now warm in memory); cold: the next turn with nothing kept."""
    phase, home = args["phase"], args["home"]
    disk = os.path.join(home, "kv-cache")
    if phase == "cold":
        model = _load(args["model3b"], kv_cache_dtype="q8_0", prefix_cache_mib=0, speculative=False)
        conversation, question, _ = _turns(model)
        took, usage = _ttft(model, conversation + question, reuse_prefix=False)
        return {"cold_ttft": took}
    model = _load(args["model3b"], kv_cache_dtype="q8_0", speculative=False, disk_cache_dir=disk)
    conversation, question, other = _turns(model)
    if phase == "first":
        _ttft(model, conversation, tenant="t")
        model.close()  # the engine stops once the disk tier's writer is done
        return {}
    took, usage = _ttft(model, conversation + question, tenant="t")
    warm, warm_usage = _ttft(model, conversation + other, tenant="t")
    stats = model.prefix_cache_stats
    files = list(Path(disk).rglob("*.kv"))
    size = sum(p.stat().st_size for p in files)
    return {
        "restart_ttft": took,
        "restart_cached": usage.cached_tokens,
        "warm_ttft": warm,
        "warm_cached": warm_usage.cached_tokens,
        "disk_files": len(files),
        "disk_bytes_per_token": size / (LONG_TOKENS * max(1, len(files))) if files else 0.0,
        "disk_hits": stats.get("disk_hits", 0),
    }


WORKERS = {"openwebui": worker_openwebui, "mixed": worker_mixed, "restart": worker_restart}


# -- the driver ---------------------------------------------------------------------------------


def run_worker(build: Path, name: str, args: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(build))
    out = subprocess.run([sys.executable, __file__, "--worker", name, json.dumps(args)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} on {build}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenario(build: Path, name: str, paths: dict[str, str]) -> dict[str, Any]:
    if name != "restart":
        return run_worker(build, name, paths)
    home = tempfile.mkdtemp(prefix="mixed-restart-")
    result: dict[str, Any] = {}
    for phase in ("first", "second", "cold"):
        result.update(run_worker(build, "restart", {**paths, "phase": phase, "home": home}))
    return result


def report(name: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    print(f"\n## {name}\n")
    print("| figure | before | after |\n|---|---:|---:|")
    for k, a in after.items():
        b = before.get(k, float("nan"))
        fmt = (lambda x: f"{x:.3f}") if isinstance(a, float) else (lambda x: f"{x}")
        print(f"| {k} | {fmt(b)} | {fmt(a)} |")
    derived = []
    for label, num, den in {
        "openwebui": [("short during / alone", "short_during_ttft", "short_alone_ttft"), ("short during / long TTFT", "short_during_ttft", "long_ttft"), ("second turn / first turn", "second_turn_ttft", "long_ttft")],
        "mixed": [("ITL p50 during / alone", "during_itl_p50", "alone_itl_p50"), ("ITL p99 during / alone", "during_itl_p99", "alone_itl_p99"), ("long TTFT during / alone", "long_during_ttft", "long_alone_ttft")],
        "restart": [("restart / warm", "restart_ttft", "warm_ttft"), ("restart / recompute", "restart_ttft", "cold_ttft")],
    }[name]:
        derived.append((label, *(d[num] / d[den] if d.get(den) else float("nan") for d in (before, after))))
    for label, b, a in derived:
        print(f"| {label} | {b:.3f} | {a:.3f} |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--smollm2", default=str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--model3b", default=str(MODELS / "smollm3-3b-shape-Q4_K_M.gguf"))
    ap.add_argument("--only", default="openwebui,mixed,restart")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    paths = {"smollm2": a.smollm2, "model3b": a.model3b}
    results: dict[str, Any] = {}
    for name in a.only.split(","):
        results[name] = {}
        for label, build in (("before", a.before), ("after", a.after)):
            t0 = time.monotonic()
            results[name][label] = scenario(build, name, paths)
            print(f"{name} {label}: {time.monotonic() - t0:.0f} s {json.dumps(results[name][label])}", file=sys.stderr, flush=True)
        report(name, results[name]["before"], results[name]["after"])
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
