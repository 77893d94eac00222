"""The ``smolcandle`` command line: ``chat``, ``run``, ``serve``, ``info`` and ``models``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, build_info, store
from ._model import DEFAULTS, Model
from .chat import ContentDelta, ContextWarning, ReasoningDelta, ToolCallEvent
from .errors import SmolcandleError
from .terminal import DIM, HELP, RESET, TerminalChat, tty

log = logging.getLogger("smolcandle")



# One rule for the environment: every option --NAME takes its default from SMOLCANDLE_NAME
# (dashes as underscores; a switch from 1, true, yes or on), and its --help says so.
ENV_PREFIX = "SMOLCANDLE_"
_TRUE = ("1", "true", "yes", "on")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _option(group: Any, *flags: str, switch: bool = False, **kwargs: Any) -> None:
    """Adds an option whose default comes from the environment (see :func:`env_name`)."""
    name = env_name(flags[0])
    value = os.environ.get(name)
    help_text = kwargs.pop("help", None)
    kwargs["help"] = f"{help_text} [env {name}]" if help_text else f"[env {name}]"
    if switch:
        group.add_argument(*flags, action="store_true", default=(value or "").strip().lower() in _TRUE, **kwargs)
        return
    # A default given as a string is converted by the option's type, so a bad value is
    # reported as argparse reports a bad argument.
    if value not in (None, ""):
        kwargs["default"] = value
    group.add_argument(*flags, **kwargs)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's recommended, else the engine's)")
    _option(g, "--temperature", type=float, help=f"0 is greedy (engine default {DEFAULTS['temperature']:g})")
    _option(g, "--top-p", type=float, help="keep the most likely tokens up to this probability")
    _option(g, "--top-k", type=int, help="keep the k most likely tokens (0: all)")
    _option(g, "--min-p", type=float, help="drop tokens less likely than this times the most likely one")
    _option(g, "--repeat-penalty", type=float, help="llama.cpp's repetition penalty")
    _option(g, "--seed", type=int, help="the sampler's seed")
    _option(g, "--max-tokens", type=int, help=f"per answer (default {DEFAULTS['chat_max_tokens']})")
    _option(g, "--max-reasoning-tokens", type=int, help="at most this many tokens of reasoning, then the answer (default: no limit but --max-tokens)")
    _option(g, "--system", help="the system message of conversations that bring none")
    g = p.add_argument_group("the model")
    _option(g, "--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the file's own")
    _option(g, "--threads", type=int, help="CPU threads (default: all cores)")
    _option(g, "--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    _option(g, "--ctx", type=int, help=f"context length in tokens (default {DEFAULTS['n_ctx']}, capped by the model's)")
    _option(g, "--kv-cache-dtype", help="how the key/value cache stores keys and values: f32 (default), f16 or q8_0 (about a quarter of f32's memory; CPU)")
    _option(
        g,
        "--rope-scaling",
        type=_json_object,
        metavar="JSON",
        help='YaRN past the training window, as transformers\' config writes it: \'{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 65536}\' (SmolLM3 to 131072 tokens with --ctx)',
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


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


def _engine_options(args: argparse.Namespace) -> Any:
    """How to load the model, from the flags (the serve command has the admission ones too)."""
    from .server import EngineOptions

    return EngineOptions(
        device=args.device,
        n_threads=args.threads,
        n_ctx=args.ctx,
        kv_cache_dtype=args.kv_cache_dtype,
        rope_scaling=args.rope_scaling,
        max_active=getattr(args, "max_active", None),
        max_queued=getattr(args, "max_queued", None),
        kv_budget_mib=getattr(args, "kv_budget_mib", None),
        prefix_cache_mib=getattr(args, "prefix_cache_mib", None),
        speculative=False if getattr(args, "no_speculative", False) else None,
        decode_slowdown=getattr(args, "decode_slowdown", None),
        **_disk_cache(args),
        chat_template=_chat_template(args),
    )


def _disk_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how much the server keeps of finished prefixes on disk: under
    ``$SMOLCANDLE_HOME/kv-cache`` unless ``--disk-cache-gib 0``."""
    gib = getattr(args, "disk_cache_gib", None)
    if not hasattr(args, "disk_cache_gib") or gib == 0:
        return {}
    if gib is not None and not (gib > 0 and math.isfinite(gib)):
        raise SystemExit(f"smolcandle: --disk-cache-gib must be 0 or more, not {gib}")
    mib = None if gib is None else max(1, round(gib * 1024))
    return {"disk_cache_dir": str(store.home() / "kv-cache"), "disk_cache_mib": mib}


def _load(model_arg: str | None, args: argparse.Namespace) -> Model:
    path = store.resolve(model_arg)
    store.inspect_gguf(path)  # a file that is no model is reported before the loading line
    print(f"{DIM if tty(sys.stderr) else ''}loading {path} …{RESET if tty(sys.stderr) else ''}", file=sys.stderr, flush=True)
    return _engine_options(args).load(path)


def _chat_template(args: argparse.Namespace) -> str | None:
    if not args.chat_template:
        return None
    try:
        return Path(args.chat_template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"smolcandle: cannot read the chat template {args.chat_template}: {e}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    with _load(args.model, args) as model:
        chat = TerminalChat(model, _sampling(args), hide_reasoning=args.hide_reasoning)
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
                    sys.stderr.write(f"{DIM}{ev.text}{RESET}" if tty(sys.stderr) else ev.text)
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
    info = store.inspect_gguf(path)
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
    vocab_size = info["array_lengths"].get("tokenizer.ggml.tokens", len(md.get("tokenizer.ggml.tokens", [])))
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
            "size": vocab_size,
            "merges": info["array_lengths"].get("tokenizer.ggml.merges", len(md.get("tokenizer.ggml.merges", []))),
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        },
        "chat_template": template,
        "recommended": rec.to_dict() if (rec := store.recommended(md, vocab_size)) is not None else None,
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
    from .server import create_app, serve

    if args.model is not None:
        store.resolve(args.model)  # a wrong name or path is an error here, not a page later
    config = server_config(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    app = create_app(config)
    access = logging.getLogger("smolcandle.access")
    if config.access_log:
        # One line per request, as it is (text or JSON), on the server's output.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    print(f"smolcandle: serving on http://{host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        serve(app, host=args.host, port=args.port)
    except RuntimeError as e:  # a shared service that cannot be reached at start
        raise SystemExit(f"smolcandle serve: {e}") from None
    return 0


def server_config(args: argparse.Namespace) -> Any:
    """The server's configuration from the serve command's flags (and so the environment)."""
    import ipaddress

    from .server import LOOPBACK_HOSTS, ChatSettings, ServerConfig

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    api_key = os.environ.get(f"{ENV_PREFIX}API_KEY") or None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip() or None
        except OSError as e:
            raise SystemExit(f"smolcandle serve: cannot read the API key file: {e}") from None
        if api_key is None:
            raise SystemExit(f"smolcandle serve: the API key file {args.api_key_file} is empty")
    if args.guard_chat and api_key is None:
        raise SystemExit(f"smolcandle serve: --guard-chat needs an API key ({ENV_PREFIX}API_KEY or --api-key-file)")
    if args.allowed_hosts:
        allowed: tuple[str, ...] | None = tuple(args.allowed_hosts.split(","))
    else:
        allowed = LOOPBACK_HOSTS if loopback else None
    return ServerConfig(
        model=args.model,
        database=args.db,
        redis=args.redis,
        engine=_engine_options(args),
        settings=ChatSettings(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            seed=args.seed,
            system_prompt=args.system,
            max_reasoning_tokens=args.max_reasoning_tokens,
        ),
        api_key=api_key,
        guard_chat=args.guard_chat,
        secure_cookies=args.secure_cookies,
        per_client=args.per_client,
        access_log=not args.quiet,
        log_format=args.log_format,
        cors_origins=tuple((args.cors or "").split(",")),
        allowed_hosts=allowed,
        grace=args.grace,
    )


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
    _option(p, "--no-think", switch=True, help="start with reasoning off")
    _option(p, "--hide-reasoning", switch=True, help="do not show the reasoning text")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("run", help="answer one prompt (argument or stdin) on stdout", description="Answers one prompt. Reasoning goes to stderr.")
    p.add_argument("model", help="path or name")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _option(p, "--no-think", switch=True, help="reasoning off")
    _option(p, "--hide-reasoning", switch=True, help="do not print the reasoning")
    _option(p, "--json", switch=True, help="print one JSON object: content, reasoning, tool_calls, finish_reason, usage")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "serve",
        help="the browser chat, the OpenAI-compatible /v1 API and Ollama's /api",
        description="Serves the browser chat at /, an OpenAI-compatible API at /v1 and Ollama's API at /api. Starts even without a model, and says so. "
        "Every option takes its default from the environment variable named in its help.",
    )
    p.add_argument("model", nargs="?", help="path or name (default: smollm3-3b if stored, else smollm2-135m if stored)")
    _option(p, "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    _option(p, "--port", type=int, default=8000, help="default 8000")
    _option(
        p,
        "--database",
        "--db",
        dest="db",
        help="the history: an SQLite file (default $SMOLCANDLE_HOME/history.sqlite3) or a postgresql:// URL, which replicas share",
    )
    _option(
        p,
        "--redis",
        help="redis:// URL: this server is one of several replicas sharing sessions, event streams and answers in progress (see docs/deploy.md)",
    )
    _option(
        p,
        "--api-key-file",
        help=f"require the bearer key in this file on /v1 (or set {ENV_PREFIX}API_KEY; a key on the command line would be visible to every local user)",
    )
    _option(p, "--guard-chat", switch=True, help="the API key also guards the browser chat and /status (the page asks for it once)")
    _option(p, "--secure-cookies", switch=True, help="mark cookies Secure (behind a proxy that terminates TLS; under TLS they always are)")
    a = p.add_argument_group("admission (the engine's limits; /status shows them in use)")
    _option(a, "--max-active", type=int, help="answers generated at once (default: four per core, 4 to 32)")
    _option(a, "--max-queued", type=int, help=f"requests that may wait; past them /v1 answers 503 (default {DEFAULTS['queued_per_active']} per active place)")
    _option(a, "--kv-budget-mib", type=int, help="key/value memory the active answers may reserve (default: a quarter of the available memory)")
    _option(a, "--prefix-cache-mib", type=int, help=f"finished answers' key/value caches kept for reuse by their tenant (default {DEFAULTS['prefix_cache_bytes'] >> 20})")
    _option(
        a,
        "--disk-cache-gib",
        type=float,
        help=f"finished prefixes kept on disk under $SMOLCANDLE_HOME/kv-cache, so a restart does not compute a conversation again (default {DEFAULTS['disk_cache_bytes'] / (1 << 30):g}; 0 keeps none)",
    )
    _option(
        a,
        "--decode-slowdown",
        type=float,
        help=f"while answers stream, a step that also reads a prompt takes at most this many times a decoding step (default {DEFAULTS['decode_slowdown']})",
    )
    _option(a, "--no-speculative", switch=True, help="never verify drafted tokens (speculative decoding, on by default where the model supports it, never changes the output)")
    _option(a, "--per-client", type=int, help="/v1 generations at once per API key or address; past it, 429 (default: half of --max-active plus --max-queued)")
    _option(a, "--grace", type=float, default=10.0, help="seconds running answers get to finish on SIGTERM before they are stopped (default 10)")
    _option(p, "--quiet", switch=True, help="no access log (by default one line per request on the server's output)")
    _option(p, "--log-format", choices=["text", "json"], default="text", help="the access log as text lines (default) or one JSON object a line")
    _option(p, "--cors", help="origins allowed to call /v1 from a browser, comma-separated, or *")
    _option(
        p,
        "--allowed-hosts",
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
