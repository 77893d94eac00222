"""The ``smolcandle`` command line: ``chat``, ``run``, ``serve``, ``info`` and ``models``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__, _native, build_info, store
from ._model import DEFAULTS, Model
from .chat import ChatDone, ContentDelta, ContextWarning, ReasoningDelta, ToolCallEvent
from .errors import SmolcandleError

log = logging.getLogger("smolcandle")

DIM, RESET, BOLD, YELLOW = "\x1b[2m", "\x1b[0m", "\x1b[1m", "\x1b[33m"


def _env_default(name: str, default: Any, kind: type = str) -> Any:
    value = os.environ.get(f"SMOLCANDLE_{name}")
    return kind(value) if value not in (None, "") else default


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling and runtime (environment SMOLCANDLE_<NAME> sets the default)")
    g.add_argument(
        "--temperature",
        type=float,
        default=_env_default("TEMPERATURE", None, float),
        help=f"0 is greedy (default: the model's recommended, else {DEFAULTS['temperature']:g})",
    )
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repeat-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-tokens", type=int, default=_env_default("MAX_TOKENS", DEFAULTS["chat_max_tokens"], int), help=f"per answer (default {DEFAULTS['chat_max_tokens']})")
    g.add_argument(
        "--max-reasoning-tokens",
        type=int,
        default=_env_default("MAX_REASONING_TOKENS", None, int),
        help="at most this many tokens of reasoning, then the answer (default: no limit but --max-tokens)",
    )
    g.add_argument("--chat-template", metavar="FILE", default=_env_default("CHAT_TEMPLATE", None), help="a Jinja chat template to use instead of the file's own")
    g.add_argument("--threads", type=int, default=_env_default("THREADS", None, int), help="CPU threads (default: all cores)")
    g.add_argument("--device", default=_env_default("DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    g.add_argument("--ctx", type=int, default=_env_default("CTX", None, int), help=f"context length in tokens (default {DEFAULTS['n_ctx']}, capped by the model's)")
    g.add_argument("--kv-cache-dtype", default=_env_default("KV_CACHE_DTYPE", None), help="how the key/value cache stores keys and values: f32 (default), f16 or q8_0 (about a quarter of f32's memory; CPU)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "max_reasoning_tokens": args.max_reasoning_tokens,
    }


def _load(model_arg: str | None, args: argparse.Namespace) -> Model:
    path = store.resolve(model_arg)
    _native.inspect_gguf(str(path))  # a file that is no model is reported before the loading line
    print(f"{DIM if _tty(sys.stderr) else ''}loading {path} …{RESET if _tty(sys.stderr) else ''}", file=sys.stderr, flush=True)
    return Model.load(path, device=args.device, n_threads=args.threads, n_ctx=args.ctx, kv_cache_dtype=args.kv_cache_dtype, chat_template=_chat_template(args))


def _chat_template(args: argparse.Namespace) -> str | None:
    if not args.chat_template:
        return None
    try:
        return Path(args.chat_template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"smolcandle: cannot read the chat template {args.chat_template}: {e}") from None


def _tty(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("NO_COLOR") is None


# -- chat ------------------------------------------------------------------------------------

HELP = """commands:
  /think, /no_think   switch reasoning on or off
  /system TEXT        set the system message (empty TEXT clears it) and start over
  /reset              forget the conversation
  /stats              tokens, speed and context use of the last answer
  /help               this text
  /exit               leave (or Ctrl-D)
input: Enter sends; end a line with \\ to continue it, or wrap lines in triple quotes (\"\"\").
Ctrl-C stops an answer; Ctrl-C at the prompt clears the line."""


class TerminalChat:
    def __init__(self, model: Model, args: argparse.Namespace, out: TextIO = sys.stdout) -> None:
        self.model = model
        self.args = args
        self.out = out
        self.color = _tty(out)
        self.system: str | None = None
        self.enable_thinking: bool | None = None
        self.history: list[dict[str, Any]] = []
        self.last_usage: Any = None
        self.totals = {"prompt": 0, "completion": 0, "answers": 0}

    def _p(self, text: str, style: str = "") -> None:
        if self.color and style:
            text = f"{style}{text}{RESET}"
        self.out.write(text)
        self.out.flush()

    def read_message(self) -> str | None:
        """One message from the user; None at end of input."""
        try:
            line = input(">>> ")
        except EOFError:
            return None
        if line.strip().startswith('"""'):
            first = line.strip()[3:]
            if first.endswith('"""') and len(first) >= 3:
                return first[:-3]
            lines = [first] if first else []
            while True:
                try:
                    nxt = input("... ")
                except EOFError:
                    break
                if nxt.rstrip().endswith('"""'):
                    lines.append(nxt.rstrip()[:-3])
                    break
                lines.append(nxt)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            try:
                line = input("... ")
            except EOFError:
                break
        lines.append(line)
        return "\n".join(lines)

    def command(self, text: str) -> bool:
        """Runs a slash command; False means leave."""
        cmd, _, rest = text.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/exit", "/bye", "/quit"):
            return False
        if cmd == "/help":
            self._p(HELP + "\n")
        elif cmd in ("/think", "/no_think") and not self.model.chat_template.has_thinking_switch:
            self._p("this model's chat template has no thinking switch: it answers without reasoning first\n", YELLOW)
        elif cmd == "/think":
            self.enable_thinking = True
            self._p("reasoning on\n", DIM)
        elif cmd == "/no_think":
            self.enable_thinking = False
            self._p("reasoning off\n", DIM)
        elif cmd == "/system":
            self.system = rest.strip() or None
            self.history.clear()
            self._p(("system message set" if self.system else "system message cleared") + "; conversation reset\n", DIM)
        elif cmd == "/reset":
            self.history.clear()
            self._p("conversation reset\n", DIM)
        elif cmd == "/stats":
            self._p(self.stats() + "\n")
        else:
            self._p(f"unknown command {cmd}; /help lists them\n", YELLOW)
        return True

    def stats(self) -> str:
        u = self.last_usage
        if u is None:
            return "no answer yet"
        used = u.prompt_tokens + u.completion_tokens
        return (
            f"last answer: {u.completion_tokens} tokens at {u.decode_tokens_per_second:.1f} tokens/s, "
            f"prompt {u.prompt_tokens} tokens at {u.prefill_tokens_per_second:.1f} tokens/s\n"
            f"context: {used} of {self.model.n_ctx} tokens ({100 * used / self.model.n_ctx:.0f}%)\n"
            f"session: {self.totals['answers']} answers, {self.totals['prompt']} prompt and {self.totals['completion']} generated tokens"
        )

    def answer(self, text: str) -> None:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [{"role": "user", "content": text}]
        content: list[str] = []
        in_reasoning = False
        stream = None
        try:
            stream = self.model.chat(messages, enable_thinking=self.enable_thinking, **_sampling(self.args))
            for ev in stream:
                if isinstance(ev, ReasoningDelta):
                    if self.args.hide_reasoning:
                        continue
                    if not in_reasoning:
                        self._p("thinking: ", DIM)
                        in_reasoning = True
                    self._p(ev.text, DIM)
                elif isinstance(ev, ContentDelta):
                    if in_reasoning:
                        self._p("\n\n")
                        in_reasoning = False
                    content.append(ev.text)
                    self._p(ev.text)
                elif isinstance(ev, ToolCallEvent):
                    self._p(f"\n[tool call] {ev.call.name}({json.dumps(ev.call.arguments, ensure_ascii=False)})\n", BOLD)
                elif isinstance(ev, ContextWarning):
                    self._p(f"[{ev.message}]\n", YELLOW)
                elif isinstance(ev, ChatDone):
                    self.last_usage = ev.usage
                    if ev.finish_reason == "length":
                        self._p("\n[stopped at --max-tokens]", YELLOW)
        except KeyboardInterrupt:
            if stream is not None:
                stream.cancel()
                self.last_usage = stream.usage
            self._p("\n[stopped]", YELLOW)
        except SmolcandleError as e:
            # A message too long for the context, say: the chat goes on.
            self._p(f"smolcandle: {e}\n", YELLOW)
            return
        self._p("\n")
        u = self.last_usage
        if u is not None:
            self.totals["answers"] += 1
            self.totals["prompt"] += u.prompt_tokens
            self.totals["completion"] += u.completion_tokens
        # What was shown is what the model said, even when it was stopped.
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(content).strip()}]

    def loop(self) -> int:
        self._p(f"{Path(self.model.path).name} ({self.model.architecture}, context {self.model.n_ctx}). /help for commands, /exit to leave.\n", DIM)
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self._p("\n(Ctrl-D or /exit leaves)\n", DIM)
                continue
            if text is None:
                self._p("\n")
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text.strip()):
                    return 0
                continue
            self.answer(text)


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    with _load(args.model, args) as model:
        chat = TerminalChat(model, args)
        chat.system = args.system
        if args.no_think:
            chat.enable_thinking = False
        return chat.loop()


# -- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("smolcandle run: empty prompt (give PROMPT or pipe it on stdin)", file=sys.stderr)
        return 2
    with _load(args.model, args) as model:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        enable = False if args.no_think else None
        if args.json:
            result = model.chat(messages, enable_thinking=enable, stream=False, **_sampling(args))
            u = result.usage
            print(json.dumps({
                "model": Path(model.path).name,
                "content": result.content,
                "reasoning": result.reasoning,
                "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in result.tool_calls],
                "finish_reason": result.finish_reason,
                "usage": u.to_dict() if u is not None else None,
                "warnings": result.warnings,
            }, ensure_ascii=False))
            return 0
        stream = model.chat(messages, enable_thinking=enable, **_sampling(args))
        try:
            for ev in stream:
                if isinstance(ev, ContentDelta):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                elif isinstance(ev, ReasoningDelta) and not args.hide_reasoning:
                    sys.stderr.write(f"{DIM}{ev.text}{RESET}" if _tty(sys.stderr) else ev.text)
                elif isinstance(ev, ToolCallEvent):
                    sys.stdout.write(f"\n<tool_call>{json.dumps({'name': ev.call.name, 'arguments': ev.call.arguments})}</tool_call>")
                elif isinstance(ev, ContextWarning):
                    print(f"smolcandle: {ev.message}", file=sys.stderr)
        except KeyboardInterrupt:
            stream.cancel()
            return 130
        sys.stdout.write("\n")
    return 0


# -- info ------------------------------------------------------------------------------------


def gguf_summary(path: Path) -> dict[str, Any]:
    info = _native.inspect_gguf(str(path))
    md = info["metadata"]
    arch = md.get("general.architecture", "?")
    types: dict[str, int] = {}
    params = 0
    for _, shape, dtype in info["tensors"]:
        types[dtype] = types.get(dtype, 0) + 1
        n = 1
        for d in shape:
            n *= d
        params += n
    hp = {k[len(arch) + 1:]: v for k, v in md.items() if k.startswith(f"{arch}.")}
    template = md.get("tokenizer.chat_template")
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "name": md.get("general.name"),
        "architecture": arch,
        "parameters": params,
        "hyperparameters": hp,
        "tensor_types": dict(sorted(types.items())),
        "tensors": len(info["tensors"]),
        "vocabulary": {
            "model": md.get("tokenizer.ggml.model"),
            "pre": md.get("tokenizer.ggml.pre"),
            "size": info["array_lengths"].get("tokenizer.ggml.tokens", len(md.get("tokenizer.ggml.tokens", []))),
            "merges": info["array_lengths"].get("tokenizer.ggml.merges", len(md.get("tokenizer.ggml.merges", []))),
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        },
        "chat_template": template,
        "recommended": rec.to_dict() if (rec := store.recommended(path)) is not None else None,
    }


def cmd_info(args: argparse.Namespace) -> int:
    path = store.resolve(args.file)
    s = gguf_summary(path)
    if args.json:
        print(json.dumps(s, ensure_ascii=False, indent=1))
        return 0
    print(f"{s['file']}  ({s['size_bytes'] / 1e6:.1f} MB)")
    print(f"name          {s['name']}")
    print(f"architecture  {s['architecture']}, {s['parameters'] / 1e6:.1f}M parameters in {s['tensors']} tensors")
    for k, v in sorted(s["hyperparameters"].items()):
        if not isinstance(v, list):
            print(f"  {k:<40} {v}")
    print("tensor types  " + ", ".join(f"{t} x{n}" for t, n in s["tensor_types"].items()))
    v = s["vocabulary"]
    print(f"vocabulary    {v['size']} tokens, {v['merges']} merges ({v['model']}, pre-tokenizer {v['pre']}); bos {v['bos_token_id']}, eos {v['eos_token_id']}")
    t = s["chat_template"]
    if t:
        first = t.strip().splitlines()[0][:100]
        print(f"chat template {len(t)} characters: {first}{' …' if len(t) > len(first) else ''}")
    else:
        print("chat template none (ChatML is used)")
    if s["recommended"]:
        print("recommended   " + ", ".join(f"{k} {v!r}" for k, v in s["recommended"].items()) + " (used where you set none)")
    return 0


# -- models ----------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "list":
        stored = store.list_models()
        present = {m.name for m in stored}
        for m in stored:
            print(f"{m.name:<24} {m.size / 1e6:>9.1f} MB  {m.path}")
        for name, spec in store.KNOWN.items():
            if name not in present:
                print(f"{name:<24} {'-':>12}  not downloaded: {spec.description} (smolcandle models pull {name})")
        return 0
    if not args.name:
        print(f"smolcandle models {args.action}: NAME is required", file=sys.stderr)
        return 2
    if args.action == "pull":
        path = store.pull(args.name, progress=not args.quiet, force=args.force)
        print(path)
    elif args.action == "rm":
        print(f"removed {store.remove(args.name)}")
    elif args.action == "path":
        p = store.find(args.name)
        if p is None:
            print(f"smolcandle: {args.name!r} is not in the store", file=sys.stderr)
            return 1
        print(p)
    return 0


# -- serve -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ChatSettings, create_app, serve

    if args.model is not None:
        store.resolve(args.model)  # a wrong name or path is an error here, not a page later
    settings = ChatSettings(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        system_prompt=args.system,
        max_reasoning_tokens=args.max_reasoning_tokens,
    )
    import ipaddress

    from .server.app import LOOPBACK_HOSTS

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    api_key = os.environ.get("SMOLCANDLE_API_KEY") or None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip() or None
        except OSError as e:
            raise SystemExit(f"smolcandle serve: cannot read the API key file: {e}") from None
        if api_key is None:
            raise SystemExit(f"smolcandle serve: the API key file {args.api_key_file} is empty")
    if args.guard_chat and api_key is None:
        raise SystemExit("smolcandle serve: --guard-chat needs an API key (SMOLCANDLE_API_KEY or --api-key-file)")
    app = create_app(
        args.model,
        db_path=args.db,
        redis_url=args.redis,
        device=args.device,
        n_threads=args.threads,
        n_ctx=args.ctx,
        kv_cache_dtype=args.kv_cache_dtype,
        settings=settings,
        api_key=api_key,
        guard_chat=args.guard_chat,
        secure_cookies=args.secure_cookies,
        max_active=args.max_active,
        max_queued=args.max_queued,
        chat_template=_chat_template(args),
        kv_budget_mib=args.kv_budget_mib,
        prefix_cache_mib=args.prefix_cache_mib,
        speculative=False if args.no_speculative else None,
        per_client=args.per_client,
        cors_origins=args.cors or (),
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
        if args.allowed_hosts
        else LOOPBACK_HOSTS
        if loopback
        else None,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"smolcandle: serving on http://{host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        serve(app, host=args.host, port=args.port, grace=args.grace)
    except RuntimeError as e:  # a shared service that cannot be reached at start
        raise SystemExit(f"smolcandle serve: {e}") from None
    return 0


# -- entry point -----------------------------------------------------------------------------


def _version() -> str:
    """The version, and which kernels this installation runs on this CPU."""
    info = build_info()
    return (
        f"smolcandle {__version__} ({info['simd']} kernels; this CPU offers {', '.join(info['cpu'])}; "
        f"builds installed: {', '.join(info['builds'])}{'; CUDA' if info['cuda'] else ''})"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smolcandle", description="Run SmolLM3 locally: chat, one-shot prompts, model files.")
    ap.add_argument("--version", action="version", version=_version())
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("chat", help="interactive chat in the terminal", description="Interactive chat. " + HELP.replace("\n", " "))
    p.add_argument("model", nargs="?", help="path or name (default: smollm3-3b if present, else the demo model)")
    p.add_argument("--system", help="system message")
    p.add_argument("--no-think", action="store_true", help="start with reasoning off")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the reasoning text")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("run", help="answer one prompt (argument or stdin) on stdout", description="Answers one prompt. Reasoning goes to stderr.")
    p.add_argument("model", help="path or name")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    p.add_argument("--system", help="system message")
    p.add_argument("--no-think", action="store_true", help="reasoning off")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning")
    p.add_argument("--json", action="store_true", help="print one JSON object: content, reasoning, tool_calls, finish_reason, usage")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="the browser chat and the OpenAI-compatible /v1 API", description="Serves the browser chat at / and an OpenAI-compatible API at /v1. Starts even without a model, and says so.")
    p.add_argument("model", nargs="?", help="path or name (default: smollm3-3b if stored, else smollm2-135m if stored)")
    p.add_argument("--host", default=_env_default("HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_env_default("PORT", 8000, int), help="default 8000")
    p.add_argument(
        "--database",
        "--db",
        dest="db",
        default=_env_default("DATABASE", None) or _env_default("DB", None),
        help="the history: an SQLite file (default $SMOLCANDLE_HOME/history.sqlite3) or a postgresql:// URL, which replicas share",
    )
    p.add_argument(
        "--redis",
        default=_env_default("REDIS", None),
        help="redis:// URL: this server is one of several replicas sharing sessions, event streams and answers in progress (see docs/deploy.md)",
    )
    p.add_argument("--system", help="system message for every conversation")
    p.add_argument(
        "--api-key-file",
        default=_env_default("API_KEY_FILE", None),
        help="require the bearer key in this file on /v1 (or set SMOLCANDLE_API_KEY; a key on the command line would be visible to every local user)",
    )
    p.add_argument("--guard-chat", action="store_true", help="the API key also guards the browser chat and /status (the page asks for it once)")
    p.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (behind a proxy that terminates TLS; under TLS they always are)")
    a = p.add_argument_group("admission (the engine's limits; /status shows them in use)")
    a.add_argument("--max-active", type=int, default=_env_default("MAX_ACTIVE", None, int), help="answers generated at once (default: four per core, 4 to 32)")
    a.add_argument("--max-queued", type=int, default=_env_default("MAX_QUEUED", None, int), help=f"requests that may wait; past them /v1 answers 503 (default {DEFAULTS['queued_per_active']} per active place)")
    a.add_argument("--kv-budget-mib", type=int, default=_env_default("KV_BUDGET_MIB", None, int), help="key/value memory the active answers may reserve (default: a quarter of the available memory)")
    a.add_argument("--prefix-cache-mib", type=int, default=_env_default("PREFIX_CACHE_MIB", None, int), help="finished answers' key/value caches kept for reuse by their tenant (default 1024)")
    a.add_argument("--no-speculative", action="store_true", help="never verify drafted tokens (speculative decoding, on by default where the model supports it, never changes the output)")
    a.add_argument("--per-client", type=int, default=_env_default("PER_CLIENT", None, int), help="/v1 generations at once per API key or address; past it, 429 (default: half of --max-active plus --max-queued)")
    a.add_argument("--grace", type=float, default=_env_default("GRACE", 10.0, float), help="seconds running answers get to finish on SIGTERM before they are stopped (default 10)")
    p.add_argument("--cors", default=_env_default("CORS", None), help="origins allowed to call /v1 from a browser, comma-separated, or *")
    p.add_argument(
        "--allowed-hosts",
        default=_env_default("ALLOWED_HOSTS", None),
        help="host names requests may address, comma-separated (default on a loopback address: localhost, 127.0.0.1, [::1]; elsewhere any)",
    )
    _add_sampling(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="summary of a GGUF file", description="Architecture, shapes, tensor types, vocabulary and template of a GGUF file.")
    p.add_argument("file", help="path or stored model name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list, pull, remove and locate models", description="The model store: $SMOLCANDLE_HOME/models and ./models.")
    p.add_argument("action", choices=["list", "pull", "rm", "path"])
    p.add_argument("name", nargs="?", help="model name (smollm3-3b, smollm2-135m, or a stored file's name)")
    p.add_argument("--force", action="store_true", help="pull again even if present")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_models)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own log lines (which model is used, pulls, trimmed conversations) at INFO; other
    # libraries' (HTTP requests…) only when they warn, or with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="smolcandle: %(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except SmolcandleError as e:
        print(f"smolcandle: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
