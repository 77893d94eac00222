"""The one generation service behind every door.

A door (the browser chat, ``/v1``, any other dialect) turns its request into a call of
:meth:`Generations.chat` or :meth:`Generations.complete` with a :class:`Caller`; the service

- refuses work while the server drains, or when no model can answer;
- merges the server's settings (``serve --temperature …, --system``) where the request sets
  none (the model's recommendations, then the engine's defaults, apply below that);
- names the tenant whose cached prefixes the request may reuse, and the client it counts
  against (the per-client limit of the API doors, the engine's turns among waiting requests);
- starts the generation on a worker thread and bridges its stream to the event loop
  (:class:`~.streaming.Relay`), registered for draining and counted for ``/status`` and
  ``/metrics`` by door.

A door keeps only its protocol: how a request reads and how events are written.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .._model import Model
from . import access
from .config import ChatSettings, ServerConfig
from .limits import RETRY_AFTER_SECONDS
from .metrics import Metrics
from .streaming import Relay

T = TypeVar("T")

#: What each ``reasoning_effort`` (OpenAI's name; Anthropic's and Ollama's thinking map onto it)
#: asks of a model whose chat template switches thinking: thinking on or off, and the reasoning
#: budget in tokens (``None``: the server's ``--max-reasoning-tokens``, else no cap).
REASONING_EFFORT: dict[str, tuple[bool, int | None]] = {
    "none": (False, None),
    "minimal": (False, None),
    "low": (True, 256),
    "medium": (True, 1024),
    "high": (True, 4096),
}

NO_MODEL = "no model was found (pull one with `smolcandle models pull smollm2-135m`, or pass a GGUF file to `smolcandle serve`)"


class ModelSlot:
    """The model the server answers with, and where its loading stands."""

    def __init__(self) -> None:
        self.state = "none"  # none | loading | ready | failed
        self.model: Model | None = None
        self.name = ""
        self.path: Path | None = None
        self.error = NO_MODEL

    @property
    def label(self) -> str:
        if self.state == "ready" and self.model is not None:
            return f"{self.name} · {self.model.device} · {self.model.n_ctx} tokens"
        if self.state == "loading":
            return f"loading {self.name} …"
        return f"no model: {self.error}"

    @property
    def served_id(self) -> str | None:
        """The name clients call the model by: its file's name without ``.gguf``."""
        return self.name.removesuffix(".gguf") or None

    @property
    def thinking_switch(self) -> bool | None:
        """Whether the model's chat template switches thinking on and off (``None``: no model yet)."""
        if self.state != "ready" or self.model is None:
            return None
        return self.model.chat_template.has_thinking_switch

    @property
    def unavailable_reason(self) -> str | None:
        if self.state == "ready":
            return None
        if self.state == "loading":
            return f"The model ({self.name}) is still loading; try again in a moment."
        return f"No model is loaded, so there is nothing to answer with: {self.error}."


class Refused(Exception):
    """The service will not start this generation now. ``reason`` says why, for a door to
    put in its own error shape: ``shutting_down`` and ``model_unavailable`` (503),
    ``client_limit`` (429); ``retry_after`` is the seconds to tell the client."""

    def __init__(self, reason: str, message: str, *, retry_after: int | None = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after


@dataclass(frozen=True)
class Caller:
    """Who asks. ``client`` is whom a generation counts against (the per-client limit where
    ``limited``, and the engine's turns among waiting requests); ``tenant`` is whose cached
    prefixes it may reuse and leave (``None``: it neither reuses nor leaves any)."""

    client: str
    tenant: str | None
    limited: bool = True

    @classmethod
    def browser(cls, session_id: str) -> Caller:
        """A browser session: its prefixes are reused by its own next turns only; it holds
        one answer at a time by itself (its claim), so no per-client limit."""
        return cls(f"session:{session_id}", f"session:{session_id}", limited=False)

    @classmethod
    def api(cls, *, keyed: bool, address: str | None, cache_key: str | None) -> Caller:
        """An API request: it counts against the API key when the server has one (every
        holder of it together), else against its peer's address, and that is its tenant too:
        it reuses the cached prefixes of that key's (or that address's) earlier requests
        without being asked, as OpenAI's caching is per organization. ``prompt_cache_key``
        narrows the tenant to the requests naming the same one."""
        client = "api-key" if keyed else f"addr:{address}"
        tenant = client if cache_key is None else f"{client}/{cache_key}"
        return cls(client, tenant)

    def engine_keywords(self) -> dict[str, Any]:
        """:meth:`Model.generate`'s keywords that say whose this generation is."""
        if self.tenant is None:
            return {"reuse_prefix": False, "client": self.client}
        return {"tenant": self.tenant, "client": self.client}


@dataclass(frozen=True)
class Embedded:
    """Embeddings, one unit-length vector per input, and the tokens the inputs took."""

    vectors: list[list[float]]
    prompt_tokens: int


class Work(Protocol):
    """Something under way that draining waits for and, past its grace, stops."""

    def cancel(self, *, interrupted: bool = False) -> None: ...


@dataclass
class DoorCounts:
    started: int = 0
    cancelled: int = 0
    active: int = 0


class Generation(Generic[T]):
    """One generation, started: iterate it (on the event loop) for its prepared items.
    Leaving the iteration early (a client that went away) cancels it."""

    def __init__(self, service: Generations, relay: Relay[T], door: str, release: Callable[[], None]) -> None:
        self._service, self._relay, self._door, self._release = service, relay, door, release
        self.cancel_requested = False
        #: Stopped by the server shutting down, not by its caller.
        self.interrupted = False
        self._closed = False

    @property
    def stream(self) -> Any:
        """The engine stream (a ChatStream or TokenStream): place in the queue, finish reason, usage."""
        return self._relay.stream

    @property
    def finished(self) -> bool:
        return self._relay.finished

    def cancel(self, *, interrupted: bool = False) -> None:
        self.interrupted = self.interrupted or interrupted
        self.cancel_requested = True
        self._relay.cancel()

    async def __aiter__(self) -> AsyncIterator[T]:
        counts = self._service.counts[self._door]
        counts.active += 1
        try:
            async for item in self._relay:
                yield item
        finally:
            counts.active -= 1
            if not self._relay.finished:
                self.cancel()
            if self.cancel_requested and not self.interrupted and (not self._relay.finished or self.stream.finish_reason == "cancelled"):
                counts.cancelled += 1
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._service._running.discard(self)
            self._release()


class Generations:
    """The service. One per app; the doors reach it as ``state.generations``."""

    def __init__(self, config: ServerConfig, slot: ModelSlot, metrics: Metrics) -> None:
        self.settings: ChatSettings = config.settings
        self.slot = slot
        self.metrics = metrics
        self.client_limit = config.per_client
        #: Set on the first SIGTERM: new work is refused while running answers finish.
        self.draining = False
        self.counts: dict[str, DoorCounts] = {}
        # Generations under way per limited client, each at most per_client_limit() at once.
        self.clients: dict[str, int] = {}
        self._running: set[Generation[Any]] = set()
        self._held: set[Work] = set()
        metrics.gauge("api_generating", "gauge", "Generations of the API doors under way", lambda: sum(c.active for d, c in self.counts.items() if d != "chat_ui"))
        metrics.gauge("draining", "gauge", "1 while the server stops gracefully and refuses new work", lambda: int(self.draining))

    def door(self, name: str) -> DoorCounts:
        return self.counts.setdefault(name, DoorCounts())

    # -- what a request gets ------------------------------------------------------------------

    def sampling(self, **asked: Any) -> dict[str, Any]:
        """The request's sampling settings, the server's where it sets none."""
        return {k: asked[k] if asked.get(k) is not None else v for k, v in self.settings.sampling().items()} | {
            k: v for k, v in asked.items() if k not in ChatSettings.SAMPLING
        }

    def with_system(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The conversation, opened by the server's system message when it brings none."""
        msgs = [dict(m) for m in messages]
        system = self.settings.system_prompt
        if system and (not msgs or msgs[0].get("role") != "system"):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def per_client_limit(self) -> int:
        if self.client_limit is not None:
            return self.client_limit
        model = self.slot.model
        if model is None:
            return 1
        a = model.admission
        return max(1, (a["max_active"] + a["max_queued"]) // 2)

    def model(self) -> Model:
        """The model, or :class:`Refused` while draining or when none can answer."""
        if self.draining:
            raise Refused("shutting_down", "the server is shutting down")
        reason = self.slot.unavailable_reason
        if reason is not None or self.slot.model is None:
            raise Refused("model_unavailable", reason or "no model")
        return self.slot.model

    def thinking(self, *, effort: str | None = None, enabled: bool | None = None, budget: int | None = None) -> dict[str, Any]:
        """:meth:`chat`'s thinking keywords for a request that asks for a reasoning ``effort``
        (see :data:`REASONING_EFFORT`), or turns thinking on or off with a ``budget``. A model
        whose template has no thinking switch ignores both (nothing is passed: its template
        would not read them)."""
        if effort is not None:
            enabled, budget = REASONING_EFFORT[effort] if budget is None else (REASONING_EFFORT[effort][0], budget)
        if enabled is None or self.slot.thinking_switch is False:
            return {}
        return {"enable_thinking": enabled, "max_reasoning_tokens": budget if enabled else None}

    async def count_chat_tokens(self, messages: Sequence[Mapping[str, Any]], **template: Any) -> int:
        """The tokens the prompt of this conversation would take (the server's system message
        included, as :meth:`chat` would send it), rendered off the event loop."""
        model = self.model()
        msgs = self.with_system(messages)
        return await asyncio.to_thread(lambda: len(model.tokenize(model.render_chat(msgs, **template))))

    # -- starting -----------------------------------------------------------------------------

    async def chat(
        self,
        caller: Caller,
        door: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        max_reasoning_tokens: int | None = None,
        prepare: Callable[[Any], T | None] | None = None,
        **options: Any,
    ) -> Generation[T]:
        """Answers a conversation (:meth:`Model.chat`'s keywords in ``options``)."""
        model = self.model()
        msgs = self.with_system(messages)
        keywords = self.sampling(**options) | caller.engine_keywords()
        budget = max_reasoning_tokens if max_reasoning_tokens is not None else self.settings.max_reasoning_tokens
        limit = max_tokens or self.settings.max_tokens

        def start(cancel: threading.Event) -> Any:
            return model.chat(msgs, max_tokens=limit, max_reasoning_tokens=budget, cancel=cancel, **keywords)

        return await self._start(caller, door, start, prepare)

    async def chat_choices(self, n: int, caller: Caller, door: str, messages: Sequence[Mapping[str, Any]], **options: Any) -> list[Generation[T]]:
        """``n`` answers to one conversation (:meth:`chat`'s keywords), submitted together so that
        the engine decodes them as one batch; each counts against the client, and all start or
        none does. With a ``seed``, choice ``i`` samples with ``seed + i`` (the same seed would
        give ``n`` copies of one answer)."""
        return await self._together(n, caller, lambda i, opts: self.chat(caller, door, messages, **opts), options)

    async def complete_choices(self, n: int, caller: Caller, door: str, prompt: str, **options: Any) -> list[Generation[T]]:
        """``n`` continuations of one text, as :meth:`chat_choices` starts answers."""
        return await self._together(n, caller, lambda i, opts: self.complete(caller, door, prompt, **opts), options)

    async def _together(self, n: int, caller: Caller, start: Callable[[int, dict[str, Any]], Any], options: dict[str, Any]) -> list[Generation[T]]:
        if caller.limited and self.clients.get(caller.client, 0) + n > self.per_client_limit():
            raise Refused("client_limit", f"{n} choices would take this client past its limit of {self.per_client_limit()} generations at once")
        seed = options.get("seed")
        started = await asyncio.gather(
            *(start(i, options if seed is None else options | {"seed": (seed + i) % 2**64}) for i in range(n)), return_exceptions=True
        )
        failed = [g for g in started if isinstance(g, BaseException)]
        if failed:
            for g in started:
                if isinstance(g, Generation):
                    g.cancel()
                    g._close()
            raise failed[0]
        return list(started)  # type: ignore[arg-type]

    async def complete(
        self,
        caller: Caller,
        door: str,
        prompt: str,
        *,
        max_tokens: int,
        prepare: Callable[[Any], T | None] | None = None,
        **options: Any,
    ) -> Generation[T]:
        """Continues a text (:meth:`Model.generate`'s keywords in ``options``)."""
        model = self.model()
        keywords = self.sampling(**options) | caller.engine_keywords()
        return await self._start(caller, door, lambda _cancel: model.generate(prompt, max_tokens=max_tokens, **keywords), prepare)

    async def _start(self, caller: Caller, door: str, start: Callable[[threading.Event], Any], prepare: Callable[[Any], T | None] | None) -> Generation[T]:
        release = self._take(caller)
        try:
            relay: Relay[T] = await Relay.start(start, prepare, observe=self.metrics.observe_generation)
        except BaseException:
            release()
            raise
        generation = Generation(self, relay, door, release)
        self._running.add(generation)
        self.door(door).started += 1
        record = access.current()
        if record is not None:
            record.generation(relay)
        return generation

    async def embed(self, caller: Caller, door: str, inputs: Sequence[str | Sequence[int]], *, truncate_to: int | None = None) -> Embedded:
        """The embedding of each input (a text, tokenized as the model does, or token ids):
        :meth:`Model.embed`, counted against the caller's client like a generation, on a
        worker thread (the engine computes it between its steps). With ``truncate_to``, an
        input's tokens past that many are left out; without, a longer input is refused."""
        model = self.model()
        release = self._take(caller)
        try:

            def run() -> Embedded:
                ids = [model.tokenize(x) if isinstance(x, str) else list(x) for x in inputs]
                if truncate_to is not None:
                    ids = [i[:truncate_to] for i in ids]
                return Embedded(model.embed(ids), sum(len(i) for i in ids))

            result = await asyncio.to_thread(run)
        finally:
            release()
        self.metrics.embedded_inputs.inc(len(result.vectors))
        record = access.current()
        if record is not None:
            record.input_tokens = result.prompt_tokens
        return result

    def _take(self, caller: Caller) -> Callable[[], None]:
        """Counts a generation against its client (past the limit, :class:`Refused`); returns
        what gives it back."""
        if not caller.limited:
            return lambda: None
        held = self.clients.get(caller.client, 0)
        if held >= self.per_client_limit():
            raise Refused("client_limit", f"this client already has {held} generations under way, its limit; wait for one to end")
        self.clients[caller.client] = held + 1

        def release() -> None:
            left = self.clients.get(caller.client, 1) - 1
            if left > 0:
                self.clients[caller.client] = left
            else:
                self.clients.pop(caller.client, None)

        return release

    # -- draining -----------------------------------------------------------------------------

    def hold(self, work: Work) -> None:
        """Has draining wait for ``work`` (a door's own work around a generation, such as
        saving the answer) until :meth:`release`."""
        self._held.add(work)

    def release(self, work: Work) -> None:
        self._held.discard(work)

    async def drain(self, *, grace: float) -> None:
        """New work is refused from now on; work under way gets ``grace`` seconds to end, then
        is cancelled as interrupted; returns once it has ended (a few seconds at most)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self._running or self._held) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for work in [*self._held, *self._running]:
            work.cancel(interrupted=True)
        deadline = loop.time() + 5.0
        while (self._running or self._held) and loop.time() < deadline:
            await asyncio.sleep(0.05)
