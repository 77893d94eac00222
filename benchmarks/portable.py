#!/usr/bin/env python3
"""The portable wheel against a build for this machine's own CPU, in one run.

    python benchmarks/portable.py --native PY --wheel PY [--rounds 3] [--threads 2] FILE...

``--native`` is an interpreter with smolcandle built here (``pip install .``: target-cpu=native,
.cargo/config.toml), ``--wheel`` one with the portable wheel (scripts/build_wheel.sh)
installed. For each file both are loaded in a process of their own (benchmarks/suite.py's
worker), and the rounds alternate between them: a 512-token prefill and a 128-token decode,
native then wheel, ``--rounds`` times after a warm-up of each, so that both meet the machine
in the same state. It prints each side's median, the wheel's ratio, the kernels each chose,
and whether their logits of the same prompts are equal to the bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from suite import Worker, median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--native", required=True, help="python with smolcandle built for this CPU")
    ap.add_argument("--wheel", required=True, help="python with the portable wheel installed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| file | kernels (native / wheel) | prefill tok/s native → wheel | decode tok/s native → wheel | logits equal |")
    print("|---|---|---|---|---|")
    for path in args.files:
        sides = {"native": Worker(args.native, "smolcandle", path, args.threads), "wheel": Worker(args.wheel, "smolcandle", path, args.threads)}
        digests = {name: [w.ask(op="logits", variant=v) for v in (1, 2)] for name, w in sides.items()}
        for w in sides.values():
            w.ask(op="single", variant=0)  # warm-up
        got: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, w in sides.items():
                got[name].append(w.ask(op="single", variant=r + 1))
        for w in sides.values():
            w.close()
        pre = {n: median([x["prefill_tps"] for x in rs]) for n, rs in got.items()}
        dec = {n: median([x["decode_tps"] for x in rs]) for n, rs in got.items()}
        simd = " / ".join(digests[n][0]["simd"] for n in sides)
        same = all(a["sha256"] == b["sha256"] for a, b in zip(digests["native"], digests["wheel"]))
        print(
            f"| {path.name} | {simd} | {pre['native']:.1f} → {pre['wheel']:.1f} ({pre['wheel'] / pre['native']:.3f}x) "
            f"| {dec['native']:.1f} → {dec['wheel']:.1f} ({dec['wheel'] / dec['native']:.3f}x) | {'yes' if same else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
