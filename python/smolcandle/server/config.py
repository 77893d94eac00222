"""The server's configuration, typed and built once: the command line makes a
:class:`ServerConfig` from its flags and the environment, and ``create_app(config)`` reads
nothing else. Engine defaults are not restated here: a field left at ``None`` takes the
engine's default (``smolcandle.DEFAULTS``) or the model's recommendation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._model import Model

#: Host names a server on a loopback address answers to (see ``ServerConfig.allowed_hosts``).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class ChatSettings:
    """Sampling for every door's answers, where a request sets none. Left at ``None``, the
    model's recommended settings apply, then the engine's defaults."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    #: The system message of conversations that bring none.
    system_prompt: str | None = None
    max_reasoning_tokens: int | None = None

    SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")

    def sampling(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SAMPLING}


@dataclass(frozen=True)
class EngineOptions:
    """How the model is loaded: :meth:`smolcandle.Model.load`'s keywords, by the same names."""

    device: str = "cpu"
    n_threads: int | None = None
    n_ctx: int | None = None
    kv_cache_dtype: str | None = None
    #: YaRN, as transformers' ``rope_scaling`` (``None``: the file's, if any).
    rope_scaling: dict[str, Any] | None = None
    max_active: int | None = None
    max_queued: int | None = None
    kv_budget_mib: int | None = None
    prefix_cache_mib: int | None = None
    speculative: bool | None = None
    decode_slowdown: float | None = None
    #: Where finished prefixes are kept across restarts (``None``: nowhere).
    disk_cache_dir: str | None = None
    disk_cache_mib: int | None = None
    #: Jinja source replacing the file's chat template.
    chat_template: str | None = None

    def load(self, path: str | os.PathLike[str]) -> Model:
        return Model.load(path, **dataclasses.asdict(self))


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``create_app`` needs.

    ``model`` is a loaded :class:`~smolcandle.Model`, a GGUF path or stored model name (loaded
    in the background once the server starts), or ``None`` for the default stored model.
    ``database`` is the history: an SQLite file (default ``$SMOLCANDLE_HOME/history.sqlite3``;
    ``":memory:"`` keeps nothing) or a ``postgresql://`` URL. ``redis`` makes this server one
    of several replicas sharing that Redis; give them the same PostgreSQL history too.
    ``api_key`` makes the API doors require it (the browser chat keeps working through its
    session cookie), and with ``guard_chat`` the browser chat and ``/status`` too. Cookies are
    Secure under TLS, and with ``secure_cookies`` (behind a proxy that terminates it).
    ``per_client`` bounds the API generations at once of one API key or address (default:
    half of what the engine holds, running and queued). ``cors_origins`` lists the origins (or
    ``"*"``) whose pages may call ``/v1``. ``allowed_hosts`` lists the host names requests may
    name in ``Host`` (``None``: any), so that a page of another site cannot reach a server on
    loopback by rebinding its own name to 127.0.0.1.
    """

    model: Model | str | Path | None = None
    database: str | None = None
    redis: str | None = None
    engine: EngineOptions = field(default_factory=EngineOptions)
    settings: ChatSettings = field(default_factory=ChatSettings)
    api_key: str | None = None
    guard_chat: bool = False
    secure_cookies: bool = False
    per_client: int | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    #: Seconds running answers get to finish on SIGTERM before they are stopped.
    grace: float = 10.0
    #: One line per request on the ``smolcandle.access`` logger (``"text"`` or ``"json"``).
    access_log: bool = True
    log_format: str = "text"

    def __post_init__(self) -> None:
        if self.guard_chat and not self.api_key:
            raise ValueError("guard_chat needs an API key")
        object.__setattr__(self, "cors_origins", tuple(o.strip() for o in self.cors_origins if o.strip()))
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts if h.strip()))
