#!/usr/bin/env python3
"""Computes the reference outputs the tests compare against, with independent implementations:

- llama.cpp (``llama-cpp-python``): greedy tokens and tokenization of the real SmolLM2-135M
  GGUF and greedy tokens of the quantized smollm3 fixtures;
- Hugging Face transformers (``SmolLM3ForCausalLM``, torch): logits of the F32 fixtures.

Writes small files to tests/data so that CI needs neither torch nor a llama.cpp build.
Needs: pip install llama-cpp-python torch transformers gguf numpy (and a built smolcandle
for the fixtures: run scripts/make_fixtures.py first).

    python scripts/make_references.py --smollm2 PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FIXTURES = ROOT / "tests" / "fixtures"
N_GREEDY = 64
# llama.cpp with the KV cache in F32 and without flash attention, as our engine runs by
# default: its F16 cache rounds K, V, Q and the attention weights, and that rounding alone
# moves logits by more than the near-tie margin.
LLAMA_KV = {"type_k": 0, "type_v": 0, "flash_attn": False}  # 0 = GGML_TYPE_F32


def chat(user: str, system: str | None = None) -> str:
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return out + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


SMOLLM2_PROMPTS = [
    chat("What is the capital of France?"),
    chat("Write a short poem about the sea."),
    chat("Explain what a CPU does in two sentences.", system="You are a helpful assistant."),
    chat("List three colors of the rainbow."),
    "The history of the Roman Empire",
    "def fibonacci(n):\n",
]


def tokenization_strings() -> list[str]:
    """Hand-picked hard cases plus deterministic random mixes: 200+ strings."""
    fixed = [
        "Hello world", "Hello, world!", " leading space", "  two leading", "trailing space ",
        "tabs\tand\ttabs", "line\nbreak", "crlf\r\nline", "\n\n\nnewlines", "   \n  \n",
        "mixed \t\n whitespace", "a  b   c    d", "it's we'll they'd I'M YOU'RE", "don't stop",
        "emoji 😀🎉👍🏽", "👨‍👩‍👧‍👦 family", "CJK 你好世界，欢迎", "日本語のテキスト", "한국어 텍스트",
        "Ελληνικά και русский", "العربية", "ÀÉÎõü ñ ß œ", "digits 1234567890", "3.14159 2.71828",
        "1,000,000 and 1e-5", "0x1F 0b1010 0o777", "12345678901234567890", "phone +1 (555) 010-9999",
        "def f(x):\n    return x**2  # square", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "<div class=\"a\">&amp;</div>", "SELECT * FROM t WHERE id = 42;", "fn main() { println!(\"hi\"); }",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Users\\name\\file.txt",
        "!!!???...,,,", "--- *** ___ ===", "«quotes» “curly” ‘single’", "a—b–c…d", "~`!@#$%^&*()_+",
        "<|im_start|>user\nhi<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>",
        "text<|im_end|>more", "<think>\nreasoning\n</think>\nanswer", "<tool_call>{\"a\": 1}</tool_call>",
        "<|im_start|><|im_end|><|im_start|>", "<|im_start", "im_end|>", "", " ", "\t", "\n", "x",
        "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX", "camelCaseWords snake_case_words",
        "    indented code", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "combining e\u0301 accent",
        "math ∑∫√∞ ≠ ≤ ≥", "arrows → ← ↑ ↓", "box ┌─┐│└┘", "currency € £ ¥ ₹ $",
    ]
    rng = random.Random(7)
    pieces = [
        "hello", "world", " ", "  ", "\n", "\t", "123", "4567", "😀", "你好", "été", "'s", "'ll",
        "<|im_start|>", "<|im_end|>", "<think>", "</think>", "()", "{}", "[]", "==", "->", "::",
        "Ä", "ß", "x", "Y", "_", "-", ".", ",", "!", "?", "\r\n", "   ", "0", "9", "λ", "🎉🎉",
    ]
    mixes = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(170)]
    return fixed + mixes


def llama_greedy(llm, ids: list[int], n: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy continuation, one token at a time (argmax of its logits), and its
    margin (top-1 minus top-2 logit) at each step: below ~0.5 the choice is within the
    quantization noise of either engine."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    margins: list[float] = []
    for _ in range(n):
        scores = np.asarray(llm.scores[llm.n_tokens - 1])
        top2 = np.partition(scores, -2)[-2:]
        t = int(np.argmax(scores))
        margins.append(round(float(top2[1] - top2[0]), 4))
        if t in stop:
            break
        out.append(t)
        llm.eval([t])
    return out, margins


TOP_K = 8
# What the batch logits were computed with, stored beside them.
BUILD_NOTE = "llama-cpp-python 0.3.36 built from source by pip on a 2-core AVX-512 machine, 2 threads, F32 KV cache"


def batch_top_logits(llm, ids: list[int]) -> dict[str, list]:
    """llama.cpp's logits for ``ids`` evaluated as one batch: at every position its ``TOP_K``
    largest, as token ids and values."""
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
    return {
        "ids": ids,
        "top_ids": top.tolist(),
        "top_logits": np.round(np.take_along_axis(scores, top, axis=1), 4).tolist(),
    }


def smollm2_references(path: Path, keep_greedy: bool = False) -> None:
    """llama.cpp's greedy runs of SMOLLM2_PROMPTS and, for each, its logits over the prompt and
    the run as one batch; and tokenizations. With ``keep_greedy``, the stored runs stay and
    only their batch logits are computed again (the greedy runs were written by a build whose
    arithmetic is ours to the last bit, which is not true of every build)."""
    import llama_cpp

    file = DATA / "smollm2_llamacpp.json"
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, **LLAMA_KV)
    if keep_greedy:
        refs = json.loads(file.read_text())
        for run in refs["greedy"]:
            run["batch"] = batch_top_logits(llm, run["prompt_ids"] + run["tokens"])
        refs["batch_llama_cpp_build"] = BUILD_NOTE
        file.write_text(json.dumps(refs, ensure_ascii=False, indent=1))
        print(f"smollm2: batch logits of {len(refs['greedy'])} stored greedy runs")
        return
    eog = {llm.token_eos(), *(i for i in range(llm.n_vocab()) if llm.detokenize([i], special=True) in (b"<|im_end|>", b"<|endoftext|>"))}
    greedy = []
    for prompt in SMOLLM2_PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        tokens, margins = llama_greedy(llm, ids, N_GREEDY, eog)
        batch = batch_top_logits(llm, ids + tokens)
        greedy.append({"prompt": prompt, "prompt_ids": ids, "tokens": tokens, "margins": margins, "batch": batch})
    strings = tokenization_strings()
    tokens = [llm.tokenize(s.encode(), add_bos=False, special=True) for s in strings]
    file.write_text(
        json.dumps({"model": path.name, "llama_cpp_version": llama_cpp.__version__, "greedy": greedy,
                    "tokenize": [{"text": s, "ids": t} for s, t in zip(strings, tokens)]}, ensure_ascii=False, indent=1)
    )
    print(f"smollm2: {len(greedy)} greedy runs, {len(strings)} tokenized strings")


QUANTIZED = ["gqa-q8_0", "gqa-q4_0", "mqa-q8_0", "kq-q4_k_m", "kq-q6_k"]
FIXTURE_PROMPTS = [list(range(300, 316)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4]]


def fixture_llamacpp_references() -> None:
    import llama_cpp

    from make_fixtures import tensor_digest

    out = {}
    digests = {}
    for name in QUANTIZED:
        path = FIXTURES / f"smollm3-{name}.gguf"
        digests[name] = tensor_digest(path)
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **LLAMA_KV)
        out[name] = []
        for p in FIXTURE_PROMPTS:
            tokens, margins = llama_greedy(llm, p, N_GREEDY, set())
            batch = batch_top_logits(llm, p + tokens)
            out[name].append({"prompt_ids": p, "tokens": tokens, "margins": margins, "batch": batch})
    strings = tokenization_strings()
    llm = llama_cpp.Llama(str(FIXTURES / "smollm3-gqa-f32.gguf"), n_ctx=256, n_threads=1, verbose=False, vocab_only=True)
    tok = [{"text": s, "ids": llm.tokenize(s.encode(), add_bos=False, special=True)} for s in strings]
    (DATA / "fixtures_llamacpp.json").write_text(
        json.dumps({"build": BUILD_NOTE, "tensor_sha256": digests, "greedy": out, "tokenize": tok}, ensure_ascii=False, indent=1)
    )
    print(f"fixtures: llama.cpp greedy for {len(out)} files, {len(tok)} tokenized strings")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: back to transformers' layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    import gguf
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    r = gguf.GGUFReader(str(path))

    def field(key: str):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    t = {x.name: np.array(x.data, dtype=np.float32).reshape(list(reversed(x.shape.tolist()))) for x in r.tensors}
    n_layer, n_head, n_kv = field("smollm3.block_count"), field("smollm3.attention.head_count"), field("smollm3.attention.head_count_kv")
    n_vocab, e = t["token_embd.weight"].shape
    cfg = SmolLM3Config(
        vocab_size=n_vocab, hidden_size=e, intermediate_size=field("smollm3.feed_forward_length"),
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
        max_position_embeddings=field("smollm3.context_length"), rope_theta=field("smollm3.rope.freq_base"),
        rms_norm_eps=field("smollm3.attention.layer_norm_rms_epsilon"), tie_word_embeddings="output.weight" not in t,
        no_rope_layer_interval=4, attention_bias=False, mlp_bias=False, hidden_act="silu",
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    if "smollm3.rope.scaling.type" in r.fields:
        kind = bytes(r.fields["smollm3.rope.scaling.type"].parts[-1]).decode()
        assert kind == "yarn", kind
        cfg.rope_parameters = {
            "rope_type": "yarn", "rope_theta": field("smollm3.rope.freq_base"), "factor": field("smollm3.rope.scaling.factor"),
            "original_max_position_embeddings": field("smollm3.rope.scaling.original_context_length"),
        }
    model = SmolLM3ForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]
    else:
        sd["lm_head.weight"] = t["token_embd.weight"]
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = unpermute(t[f"blk.{i}.attn_q.weight"], n_head)
        sd[p + "self_attn.k_proj.weight"] = unpermute(t[f"blk.{i}.attn_k.weight"], n_kv)
        for g, h in names.items():
            sd[p + h + ".weight"] = t[f"blk.{i}.{g}.weight"]
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    assert not unexpected, unexpected
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


HF_FIXTURES = ["gqa-f32", "mqa-f32", "kq-f32", "gqa-f32-yarn"]


def fixture_hf_references() -> None:
    import transformers

    rng = np.random.default_rng(99)
    arrays = {}
    for name in HF_FIXTURES:
        path = FIXTURES / f"smollm3-{name}.gguf"
        ids = rng.integers(0, 500, 64).tolist()
        arrays[f"{name}/ids"] = np.array(ids, dtype=np.int64)
        arrays[f"{name}/logits"] = hf_logits(path, ids).astype(np.float32)
    np.savez_compressed(DATA / "fixtures_transformers.npz", **arrays, transformers_version=np.array(transformers.__version__))
    print(f"fixtures: transformers logits for {HF_FIXTURES}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf (default: the test cache)")
    ap.add_argument("--only", choices=["smollm2", "llamacpp", "transformers"], action="append")
    ap.add_argument("--keep-smollm2-greedy", action="store_true", help="recompute only the batch logits of the stored SmolLM2 runs")
    args = ap.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["smollm2", "llamacpp", "transformers"])
    if "smollm2" in only:
        path = args.smollm2
        if path is None:
            import sys

            sys.path.insert(0, str(ROOT / "tests"))
            from models import smollm2_path

            path = smollm2_path()
        smollm2_references(path, keep_greedy=args.keep_smollm2_greedy)
    if "llamacpp" in only:
        fixture_llamacpp_references()
    if "transformers" in only:
        fixture_hf_references()


if __name__ == "__main__":
    main()
