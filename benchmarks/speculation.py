#!/usr/bin/env python3
"""Speculative decoding against plain decoding, in one process, the two taking turns.

    python benchmarks/speculation.py [--threads 2] [--rounds 3] FILE [--grounded FILE]

- ``FILE`` (the 3B shape, say): greedy decode tokens/s after a 256-token prompt of the suite's
  ordinary ids (the prompt repeats itself, so the n-gram lookup finds drafts the model does not
  follow: text that gives speculation nothing), speculation on (the default, adaptive) against
  off, paired rounds, each round's prompt different;
- ``--grounded FILE`` (a file with trained weights: SmolLM2): the suite's input-grounded tasks
  and its free chat, where drafts do pay, the same way; then a story sampled at temperature 1,
  a seed per round, the same in both (free text: its n-grams seldom come back).

Each line gives both figures of a round, their ratio and the drafted and kept tokens; the summary
the median ratio. Decode tokens/s is the engine's own clock (after the first token).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smolcandle
import suite

STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode(model: smolcandle.Model, ids: list[int], tokens: int, schema: dict | None = None, seed: int | None = None, *, ignore_eos: bool) -> tuple[float, list[int], int, int]:
    temperature = 0.0 if seed is None else 1.0
    stream = model.generate(ids, max_tokens=tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos, json_schema=schema)
    out = [t for chunk in stream for t in chunk.token_ids]
    u = stream.usage
    return u.decode_tokens_per_second, out, u.drafted_tokens or 0, u.accepted_tokens or 0


def paired(name: str, plain: smolcandle.Model, spec: smolcandle.Model, rounds: int, make, tokens: int, *, ignore_eos: bool, sampled: bool = False) -> float:
    ratios = []
    for r in range(rounds + 1):
        ids, schema = make(r)
        order = [(plain, "plain"), (spec, "spec")] if r % 2 else [(spec, "spec"), (plain, "plain")]
        seed = r if sampled else None
        got = {label: decode(m, ids, tokens, schema, seed, ignore_eos=ignore_eos) for m, label in order}
        if r == 0:
            continue  # warm-up
        (p, p_ids, _, _), (s, s_ids, drafted, kept) = got["plain"], got["spec"]
        same = "same" if p_ids == s_ids else "DIFFERENT"
        ratios.append(s / p)
        print(f"{name}, round {r}: plain {p:.2f} tok/s, speculative {s:.2f} ({s / p:.3f}x), {kept}/{drafted} drafted kept, output {same}", flush=True)
    median = statistics.median(ratios)
    print(f"{name}: median {median:.3f}x plain", flush=True)
    return median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--grounded", type=Path, help="a file with trained weights for the suite's tasks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    def load(path: Path, on: bool) -> smolcandle.Model:
        return smolcandle.Model.load(path, n_threads=args.threads, n_ctx=4096, speculative=on, prefix_cache_mib=0)

    try:
        spec = load(args.file, True)
    except smolcandle.InvalidParameterError as e:  # products not batch-invariant on this CPU
        sys.exit(f"{args.file.name}: {e}")
    plain = load(args.file, False)
    paired(f"{args.file.name}, nothing to draft from", plain, spec, args.rounds, lambda r: (suite.prompt(args.prompt_tokens, r), None), args.tokens, ignore_eos=True)
    del plain, spec
    if args.grounded:
        plain, spec = load(args.grounded, False), load(args.grounded, True)
        for task, (message, schema) in suite.TASKS.items():
            ids = plain.tokenize(suite.chatml(message))
            paired(f"{args.grounded.name}, {task}", plain, spec, args.rounds, lambda r, ids=ids, schema=schema: (ids, schema), suite.TASK_TOKENS, ignore_eos=False)
        # Sampled at temperature 1 (a seed per round): free text whose n-grams seldom come back.
        ids = plain.tokenize(suite.chatml(STORY))
        paired(f"{args.grounded.name}, a story sampled at temperature 1", plain, spec, args.rounds, lambda r: (ids, None), args.tokens, ignore_eos=True, sampled=True)


if __name__ == "__main__":
    main()
