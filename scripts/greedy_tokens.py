#!/usr/bin/env python3
"""Greedy-generates 16 tokens of a model and prints them as JSON with the top-two logit margin
at each step and the build that ran (smolcandle.build_info()): for comparing the builds of the
native module (SMOLCANDLE_SIMD=…) and CPUs emulated with qemu-user (scripts/check_cpus.sh).

    python scripts/greedy_tokens.py MODEL.gguf
"""

import json
import sys

import smolcandle

model = smolcandle.Model.load(sys.argv[1], n_threads=2, n_ctx=512)
prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
stream = model.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
tokens, margins = [], []
for chunk in stream:
    for lp in chunk.logprobs:
        tokens.append(lp.token_id)
        (_, first), (_, second) = lp.top_logprobs[:2]
        margins.append(first - second)  # log-probabilities differ as the logits do
print(json.dumps({"build": smolcandle.build_info(), "tokens": tokens, "margins": margins, "text": model.detokenize(tokens)}))
