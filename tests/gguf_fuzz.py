"""A structured fuzzer of GGUF headers: real and fixture files with one field of their header
changed at a time (a count, a length, a type, a dimension, an offset, a metadata value) to a
value that breaks arithmetic or allocation (0, 1, 2^31, 2^32 - 1, 2^63, 2^64 - 1, off by one,
times 2^k), or with bytes flipped or the file cut inside the header.

Each case runs ``inspect_gguf`` and ``Model.load`` (and, when it loads, two tokens of
generation) in a worker process, and ends one of three ways: a ``SmolcandleError`` (a clean
refusal), loaded, or a failure: a panic (an ``internal error`` or a ``PanicException``), another
exception, or the worker dying by a signal. Cases are made from ``(seed file, index)`` alone,
so any failure can be replayed.

    python tests/gguf_fuzz.py --cases 20000 --workers 2   # a longer run than the test's
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# GGUF value types: their struct formats (8: string, 9: array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 4095, 4096, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**63 - 1, 2**63, 2**64 - 1]


@dataclass(frozen=True)
class Field:
    """An integer in the header: where it is, its width, and what it means."""

    offset: int
    size: int  # bytes: 1, 2, 4 or 8
    kind: str  # "count", "length", "type", "dim", "value", "offset", "version"


def header_fields(data: bytes) -> tuple[list[Field], int]:
    """The integer fields of a GGUF header, and where the header ends (the tensor infos' end)."""
    fields: list[Field] = []
    pos = 0

    def take(fmt: str, kind: str) -> int:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        (v,) = struct.unpack_from("<" + fmt, data, pos)
        if fmt in "BbHhIiQq":
            fields.append(Field(pos, size, kind))
        pos += size
        return v

    def string(kind: str = "length") -> None:
        nonlocal pos
        n = take("Q", kind)
        pos += n

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            item = take("I", "type")
            n = take("Q", "count")
            for _ in range(n):
                if item in _SCALARS and item != 8:
                    pos += struct.calcsize("<" + _SCALARS[item])  # array items: not each a field
                else:
                    value(item)
        else:
            take(_SCALARS[vtype], "value")

    pos = 4
    take("I", "version")
    n_tensors = take("Q", "count")
    n_kv = take("Q", "count")
    for _ in range(n_kv):
        string()
        value(take("I", "type"))
    for _ in range(n_tensors):
        string()
        n_dims = take("I", "count")
        for _ in range(n_dims):
            take("Q", "dim")
        take("I", "type")
        take("Q", "offset")
    return fields, pos


def mutate(data: bytes, fields: list[Field], header_end: int, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of ``data`` and a description of it."""
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.75:
        f = rng.choice(fields)
        (old,) = struct.unpack_from("<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[f.size], data, f.offset)
        choices = [*_INTERESTING, old + 1, max(old - 1, 0), old * 2, old << rng.randrange(1, 16), rng.getrandbits(8 * f.size)]
        new = rng.choice(choices) % (1 << (8 * f.size))
        out[f.offset : f.offset + f.size] = new.to_bytes(f.size, "little")
        return bytes(out), f"{f.kind}@{f.offset}:{old}->{new}"
    if roll < 0.9:
        flips = []
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(4, header_end)
            out[at] = rng.randrange(256)
            flips.append(at)
        return bytes(out), f"bytes@{flips}"
    cut = rng.randrange(0, header_end)
    return bytes(out[:cut]), f"cut@{cut}"


def seeds(root: Path) -> list[Path]:
    """The files mutated: the smollm3 fixtures (every weight type the engine runs) and the real
    SmolLM2 file, whose header (a 49,152-token vocabulary and its merges) is taken whole with
    the first of its weights."""
    from models import fixture, smollm2_path

    files = [fixture(n) for n in ("gqa-q8_0", "mqa-q8_0", "gqa-q4_0", "kq-q4_k_m")]
    real = root / "smollm2-head.gguf"
    if not real.exists():
        data = smollm2_path().read_bytes()
        _, end = header_fields(data)
        real.write_bytes(data[: end + (8 << 20)])
    return [*files, real]


def case(seed_files: list[Path], index: int, headers: dict[Path, tuple[bytes, list[Field], int]]) -> tuple[bytes, str]:
    path = seed_files[index % len(seed_files)]
    data, fields, end = headers[path]
    rng = random.Random(index)
    return mutate(data, fields, end, rng)


def worker(start: int, stop: int, root: Path) -> None:
    """Runs cases [start, stop): one JSON line each, after a ``start`` line (so that a death by
    signal names its case)."""
    import resource

    import smolcandle
    from smolcandle._native import inspect_gguf

    # A crafted size must be refused, not allocated: past 4 GiB an allocation fails (an abort).
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    seed_files = seeds(root)
    headers = {}
    for p in seed_files:
        data = p.read_bytes()
        fields, end = header_fields(data)
        headers[p] = (data, fields, end)
    target = root / f"case-{os.getpid()}.gguf"
    for i in range(start, stop):
        data, what = case(seed_files, i, headers)
        print(json.dumps({"start": i}), flush=True)
        target.write_bytes(data)
        outcome = "loaded"
        try:
            inspect_gguf(str(target))
            with smolcandle.Model.load(target, n_ctx=64, prefix_cache_mib=0) as model:
                list(model.generate([1, 2, 3], max_tokens=2, temperature=0))
        except smolcandle.SmolcandleError as e:
            outcome = "panic" if str(e).startswith("internal error") else f"error:{type(e).__name__}"
        except BaseException as e:  # noqa: BLE001 - a PanicException is a BaseException
            outcome = f"panic:{type(e).__name__}" if "Panic" in type(e).__name__ else f"unexpected:{type(e).__name__}:{e}"
        print(json.dumps({"case": i, "what": what, "outcome": outcome}), flush=True)
    target.unlink(missing_ok=True)


def run(cases: int, workers: int, root: Path) -> tuple[Counter[str], list[dict]]:
    """Runs ``cases`` cases over ``workers`` processes; the outcomes counted, and the failures."""
    root.mkdir(parents=True, exist_ok=True)
    seeds(root)  # made once, before the workers read them
    counts: Counter[str] = Counter()
    failures: list[dict] = []
    bounds = [(cases * k // workers, cases * (k + 1) // workers) for k in range(workers)]
    pending = [b for b in bounds if b[0] < b[1]]
    while pending:
        procs = [
            (b, subprocess.Popen([sys.executable, __file__, "--worker", str(b[0]), str(b[1]), "--root", str(root)], stdout=subprocess.PIPE, text=True))
            for b in pending
        ]
        pending = []
        for (lo, hi), proc in procs:
            out, _ = proc.communicate()
            last_started, done = None, set()
            for line in out.splitlines():
                rec = json.loads(line)
                if "start" in rec:
                    last_started = rec["start"]
                    continue
                done.add(rec["case"])
                kind = rec["outcome"].split(":")[0]
                counts[kind if kind != "error" else rec["outcome"]] += 1
                if kind in ("panic", "unexpected"):
                    failures.append(rec)
            if proc.returncode != 0:
                counts["signal" if proc.returncode < 0 else "exit"] += 1
                failures.append({"case": last_started, "outcome": f"worker ended with {proc.returncode}"})
                if last_started is not None and last_started + 1 < hi:
                    pending.append((last_started + 1, hi))  # go on after the case that killed it
    return counts, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "smolcandle-gguf-fuzz")
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.worker:
        worker(args.worker[0], args.worker[1], args.root)
        return 0
    counts, failures = run(args.cases, args.workers, args.root)
    print(json.dumps({"cases": args.cases, "outcomes": dict(counts), "failures": failures[:20]}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
