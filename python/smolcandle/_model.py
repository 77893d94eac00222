"""The public :class:`Model`: load a GGUF file, tokenize, compute logits, generate."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _native, store
from .chat import (
    CHATML_TEMPLATE,
    THINK_CLOSE,
    THINK_OPEN,
    ChatResult,
    ChatStream,
    ChatTemplate,
    ContextWarning,
    fit_conversation,
    normalize_messages,
    starts_in_reasoning,
    template_knows_tools,
    with_generic_tools,
)
from .errors import InvalidParameterError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = _native.DEFAULTS
"""The engine's defaults and limits (temperature, max_tokens, chat_max_tokens, n_ctx,
prefix_cache_bytes, max_top_logprobs, repeat_last_n): the one home of each is the engine."""

TokenStream = _native.TokenStream
Chunk = _native.Chunk
Usage = _native.Usage
Logprob = _native.Logprob


class Model:
    """A SmolLM3 (or Llama-family) GGUF model running in smolcandle's native engine.

    Generation runs on the engine's own thread; several :class:`TokenStream` objects may be
    open at once, from different Python threads.
    """

    def __init__(self, native: _native.Model, path: str) -> None:
        self._native = native
        self.path = path
        #: The store's recommended system prompt and sampling for this file (recognised by its
        #: content: see :class:`~smolcandle.store.Fingerprint`), used by :meth:`chat` where the
        #: caller sets none; ``None`` (settable) for no defaults.
        self.recommended: store.Recommended | None = store.recommended(native.metadata, native.n_vocab)
        self._template: ChatTemplate | None = None
        self._tool_template: ChatTemplate | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        n_threads: int | None = None,
        n_ctx: int | None = None,
        kv_cache_dtype: str | None = None,
        prefix_cache_mib: int | None = None,
        max_active: int | None = None,
        max_queued: int | None = None,
        kv_budget_mib: int | None = None,
        speculative: bool | None = None,
        decode_slowdown: float | None = None,
        disk_cache_dir: str | os.PathLike[str] | None = None,
        disk_cache_mib: int | None = None,
        rope_scaling: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> Model:
        """Loads a GGUF file.

        ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``n_threads`` sets the CPU threads
        (the first model loaded in a process fixes it); ``n_ctx`` is the context in tokens
        (default ``DEFAULTS["n_ctx"]``, 8192; never more than the model's training context,
        or as far as YaRN reaches, and refused where one sequence filling it would not fit in
        the memory available);
        ``kv_cache_dtype`` is how the key/value cache stores keys and values: ``"f32"``
        (default), ``"f16"`` (half the memory) or ``"q8_0"`` (llama.cpp's 8-bit blocks: 27% of
        F32's memory, on the CPU; it keeps batch invariance, so answer reuse and speculative
        decoding stay on).
        Finished generations' key/value caches are kept, up to ``prefix_cache_mib`` MiB
        (default 1024; 0 turns it off), so a request that starts with the same tokens (the
        next turn of a conversation, a shared system prompt) computes only the rest.

        At most ``max_active`` sequences are generated at once (default: four per core, 4 to
        32), reserving together at most ``kv_budget_mib`` MiB of key/value storage (default: a
        quarter of the memory available at load); other requests wait, in order, and past
        ``max_queued`` of them (default 8 per active place) :meth:`generate` raises
        :class:`~smolcandle.errors.BusyError`. :attr:`admission` shows the limits and their use.

        A sequence decoding alone may feed guessed tokens after its last one (from the prompt
        and the answer so far, or forced by an output grammar) and keep those the model
        confirms in the same step: speculative decoding, with output identical to plain
        decoding. It drafts only where the measured acceptance and cost say it pays, and is on
        by default where the model's products are batch-invariant (which it needs);
        ``speculative=False`` turns it off. :attr:`speculation` counts its drafts.

        A step of the engine carries prompt tokens sized by its measured time: while streams
        decode, at most ``decode_slowdown`` (default ``DEFAULTS["decode_slowdown"]``, 1.5)
        times a decoding step; prompts share it shortest first, so a short request starts
        within a step whatever else is being read.

        With ``disk_cache_dir``, finished prefixes are also kept on disk there (under the
        model file's identity, checksummed, at most ``disk_cache_mib`` MiB, default 4 GiB,
        least recently used out first), so the next process starts a conversation where this
        one left it.

        ``rope_scaling`` turns on YaRN, as transformers' config writes it, where the file does
        not: ``{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings":
        65536}`` lets SmolLM3 reach 131,072 positions (the window defaults to the file's
        training context; ``beta_fast``, ``beta_slow`` and ``attention_factor`` are optional).
        Like transformers' it is static: it changes every position's rotation, so short
        prompts' outputs move slightly too; turn it on only for contexts that need it.

        ``chat_template`` (Jinja source) replaces the file's own chat template.
        """
        path = os.fspath(path)
        if not isinstance(device, str):
            raise InvalidParameterError(f"invalid parameter device: expected a string, got {device!r}", "device")
        options = _native.LoadOptions(
            device=device,
            n_threads=_count("n_threads", n_threads),
            n_ctx=_count("n_ctx", n_ctx),
            kv_cache_dtype=kv_cache_dtype,
            max_active=_count("max_active", max_active),
            max_queued=_count("max_queued", max_queued),
            kv_budget_mib=_count("kv_budget_mib", kv_budget_mib),
            prefix_cache_mib=_count("prefix_cache_mib", prefix_cache_mib),
            speculative=_flag("speculative", speculative),
            decode_slowdown=decode_slowdown,
            disk_cache_dir=None if disk_cache_dir is None else os.fspath(disk_cache_dir),
            disk_cache_mib=_count("disk_cache_mib", disk_cache_mib),
            rope_scaling=_mapping("rope_scaling", rope_scaling),
        )
        native = _native.Model.load(path, options)
        model = cls(native, path)
        if chat_template is not None:  # it serves requests with tools too
            model._template = model._tool_template = ChatTemplate(chat_template, special_tokens=model._special_tokens())
        return model

    # -- properties -------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self._native.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._native.n_ctx

    @property
    def architecture(self) -> str:
        return self._native.architecture

    @property
    def prefix_cache_stats(self) -> dict[str, int]:
        """Kept ``entries`` and their ``bytes``; ``hits``, ``misses``, ``reused_tokens``, ``evictions``."""
        return self._native.prefix_cache_stats

    @property
    def kv_cache_bytes(self) -> dict[str, int]:
        """Key/value storage held by the engine (running and kept caches): ``bytes`` now and
        ``peak_bytes``, the most held at once since the model was loaded."""
        return self._native.kv_cache_bytes

    @property
    def admission(self) -> dict[str, int]:
        """The scheduler's limits (``max_active``, ``max_queued``, ``kv_budget_bytes``) and
        their use now (``active``, ``queued``, ``kv_reserved_bytes``; ``refused`` so far)."""
        return self._native.admission

    @property
    def speculation(self) -> dict[str, int]:
        """Speculative decoding: ``enabled`` (1 or 0), and ``drafted_tokens`` and
        ``accepted_tokens`` over the ``steps`` that verified a draft, since load."""
        return self._native.speculation

    @property
    def kv_cache_dtype(self) -> str:
        return self._native.kv_cache_dtype

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one position of a sequence takes in the key/value cache (every layer's keys
        and values, as ``kv_cache_dtype`` stores them)."""
        return self._native.kv_bytes_per_token

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def config(self) -> dict[str, Any]:
        """Hyper-parameters read from the file (layers, heads, which layers use RoPE…)."""
        return self._native.config

    @property
    def metadata(self) -> dict[str, Any]:
        """The GGUF metadata (arrays of more than 1024 entries, such as the vocabulary, omitted)."""
        return self._native.metadata

    @property
    def bos_token_id(self) -> int | None:
        return self._native.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._native.eos_token_id

    @property
    def eog_token_ids(self) -> list[int]:
        """Tokens that end generation (end of sequence, end of turn)."""
        return self._native.eog_token_ids

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_bos=None`` follows the file's ``add_bos_token``; with
        ``special``, control-token text such as ``<|im_start|>`` becomes that token."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"invalid parameter text: expected a string, got {type(text).__name__}", "text")
        return self._native.tokenize(text, add_bos, special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._native.detokenize(_token_ids("ids", ids))

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is exactly ``text``."""
        return self._native.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._native.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` decodes to; a token may hold part of a UTF-8 character."""
        return self._native.token_bytes(token_id)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 logits ``[len(ids), n_vocab]`` for ``ids`` as a fresh sequence."""
        import numpy as np  # only here: importing it costs every process 16 MB

        raw, rows, cols = self._native.logits(_token_ids("ids", ids))
        return np.frombuffer(raw, dtype=np.float32).reshape(rows, cols)

    def embed(self, inputs: str | Sequence[str | Sequence[int]]) -> list[list[float]]:
        """One vector per input (a text, or token ids): the model's final hidden states, after
        its output norm, averaged over the input's tokens and scaled to unit length, as
        llama.cpp's server computes them with ``--pooling mean``. These are a language model's
        pooled states, not those of a model trained for embeddings: texts on the same subject
        tend to lie closer, but a trained embedding model ranks far better.

        A text is tokenized as :meth:`tokenize` does. ``DEFAULTS["max_embed_inputs"]`` inputs
        at most, each of at most ``DEFAULTS["max_embed_tokens"]`` tokens and the context, and
        ``DEFAULTS["max_embed_call_tokens"]`` in all. The engine computes them between its
        generation steps, with the GIL released."""
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        ids = [self.tokenize(x) if isinstance(x, str) else _token_ids("inputs", x) for x in items]
        return self._native.embed(ids)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        json_schema: Mapping[str, Any] | bool | str | None = None,
        grammar: str | None = None,
        regex: str | None = None,
        logprobs: int | None = None,
        tenant: str | None = None,
        reuse_prefix: bool = True,
        client: str | None = None,
        reasoning: bool | None = None,
        max_reasoning_tokens: int | None = None,
    ) -> TokenStream:
        """Starts generating and returns a :class:`TokenStream` of text chunks.

        A string prompt is tokenized with ``special=True`` (so chat markup works) and the file's
        BOS rule. ``temperature=0`` is greedy. Generation ends at the model's end-of-generation
        tokens, at ``stop_token_ids``, before any ``stop`` string (never emitted), or after
        ``max_tokens``; the stream's ``finish_reason`` tells which. Options left at ``None``
        take the engine's defaults (``smolcandle.DEFAULTS``: ``max_tokens`` 256,
        ``temperature`` 0.8), and the engine checks every range.

        At most one of ``json_schema`` (a JSON Schema as a dict or JSON text; ``{"type":
        "object"}`` for any object), ``grammar`` (llguidance's Lark syntax) or ``regex``
        constrains the output: tokens that would leave it are masked out before sampling, so
        the text follows it at any temperature, and generation stops once it is complete. Only
        a ``length`` finish can leave it unfinished. ``logprobs=N`` gives each chunk the
        log-probability of its tokens and the ``N`` most likely alternatives (0 to 20).

        A request starts from the kept key/value cache of an earlier one that shared its
        prefix only when both name the same ``tenant`` (``None``: every request without one);
        ``reuse_prefix=False`` neither reuses a kept cache nor keeps its own. A server gives
        each user their own tenant, so that no one can learn from its speed or its
        ``cached_tokens`` what another user sent.

        When the engine is at its limits the request waits its turn (the stream's
        ``queue_position`` is its place; 0 once it runs); when its queue is full this raises
        :class:`~smolcandle.errors.BusyError`. Waiting requests start by turns among the
        clients that sent them (``client=``; the one with the fewest running first), so that
        one client's many requests do not hold up everyone else's.

        ``reasoning`` says that the answer reasons in a ``<think>`` … ``</think>`` block: one
        the prompt has opened (``True``) or one the model may open as it begins (``False``).
        Then a constraint applies from the end of the block (the reasoning is free text), and
        after ``max_reasoning_tokens`` tokens inside it the engine closes the block itself, so
        the answer follows. ``usage.reasoning_tokens`` counts the block's tokens.
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else _token_ids("prompt", prompt)
        if isinstance(stop, str):
            stops = [stop]
        elif stop is None:
            stops = []
        else:
            stops = list(stop)
            if not all(isinstance(s, str) for s in stops):
                raise InvalidParameterError("invalid parameter stop: expected a string or a list of strings", "stop")
        request = _native.GenerateRequest(
            ids,
            max_tokens=_int("max_tokens", max_tokens),
            temperature=_number("temperature", temperature),
            top_k=_int("top_k", top_k),
            top_p=_number("top_p", top_p),
            min_p=_number("min_p", min_p),
            repeat_penalty=_number("repeat_penalty", repeat_penalty),
            frequency_penalty=_number("frequency_penalty", frequency_penalty),
            presence_penalty=_number("presence_penalty", presence_penalty),
            seed=_int("seed", seed),
            stop=stops,
            stop_token_ids=_token_ids("stop_token_ids", stop_token_ids or []),
            ignore_eos=bool(ignore_eos),
            grammar=_grammar(json_schema, grammar, regex),
            logprobs=_int("logprobs", logprobs),
            tenant=tenant if tenant is None else str(tenant),
            reuse_prefix=bool(reuse_prefix),
            client=client if client is None else str(client),
            reasoning=None if reasoning is None else (THINK_OPEN, THINK_CLOSE, bool(reasoning)),
            max_reasoning_tokens=_int("max_reasoning_tokens", max_reasoning_tokens),
        )
        return self._native.generate(request)

    # -- chat -------------------------------------------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate:
        """The file's ``tokenizer.chat_template`` (ChatML when the file has none)."""
        if self._template is None:
            source = self.metadata.get("tokenizer.chat_template")
            if not isinstance(source, str) or not source.strip():
                log.warning("%s has no chat template; using ChatML", os.path.basename(self.path))
                source = CHATML_TEMPLATE
            self._template = ChatTemplate(source, special_tokens=self._special_tokens())
        return self._template

    def _special_tokens(self) -> dict[str, str]:
        """The file's special tokens as a tokenizer's ``special_tokens_map`` gives them to a template."""
        meta = self.metadata
        ids = {
            "bos_token": self.bos_token_id,
            "eos_token": self.eos_token_id,
            "unk_token": meta.get("tokenizer.ggml.unknown_token_id"),
            "pad_token": meta.get("tokenizer.ggml.padding_token_id"),
        }
        special = {}
        for name, tid in ids.items():
            text = self.id_to_token(tid) if isinstance(tid, int) else None
            if text is not None:
                special[name] = text
        return special

    def _template_for(self, tools: Sequence[Mapping[str, Any]] | None) -> ChatTemplate:
        if tools and self._tool_template is None:
            source = self.metadata.get("tokenizer.chat_template.tool_use")
            if isinstance(source, str) and source.strip():
                self._tool_template = ChatTemplate(source, special_tokens=self.chat_template.special_tokens)
        return self._tool_template if tools and self._tool_template is not None else self.chat_template

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt ``chat`` would send: the conversation rendered through the chat template,
        as ``transformers``' ``apply_chat_template(..., tokenize=False)`` renders it.
        ``enable_thinking=None`` leaves the template's default (and ``/think`` or ``/no_think``
        in the system message) in charge. A template that knows no tools (SmolLM2's) gets the
        tools, calls and results written into the messages in SmolLM3's format. A file with
        a named ``tool_use`` template (``tokenizer.chat_template.tool_use``) renders requests
        with tools through it, as transformers does. ``template_kwargs`` also take
        ``documents`` and ``continue_final_message`` as ``apply_chat_template`` does."""
        msgs = normalize_messages(messages)
        template = self._template_for(tools)
        if not template_knows_tools(template.source):
            msgs, tools = with_generic_tools(msgs, tools), None
        if tools is not None and "xml_tools" not in template_kwargs and "xml_tools" in template.source:
            template_kwargs["xml_tools"] = list(tools)
        if add_generation_prompt is None:  # a message to continue takes no new turn
            add_generation_prompt = not template_kwargs.get("continue_final_message")
        return template.render(
            msgs,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **template_kwargs,
        )

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: bool = True,
        max_tokens: int | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        cancel: threading.Event | None = None,
        max_reasoning_tokens: int | None = None,
        **sampling: Any,
    ) -> ChatStream | ChatResult:
        """Answers a conversation (a list of ``{"role", "content"}`` messages).

        With ``stream=True`` it returns a :class:`~smolcandle.chat.ChatStream` of events
        (reasoning text, answer text, tool calls, a final event with ``finish_reason`` and
        usage); with ``stream=False``, a :class:`~smolcandle.chat.ChatResult`. When the
        conversation does not fit the context, the oldest whole turns are dropped (the system
        message stays) and the stream starts with a :class:`~smolcandle.chat.ContextWarning`.
        Where the caller sets no temperature, top_p… and the conversation has no system
        message, the store's :attr:`recommended` settings for the model apply.
        ``max_tokens`` defaults to ``DEFAULTS["chat_max_tokens"]`` (1024), and the answer is
        given at most half of the context. ``sampling`` takes :meth:`generate`'s keywords.

        The reasoning (a ``<think>`` block) is at most ``max_reasoning_tokens`` tokens long:
        then the engine closes it and the answer follows. With ``json_schema``, ``grammar`` or
        ``regex``, thinking is off unless ``enable_thinking=True``; with it on, the answer
        opens with the reasoning block, which is free text, and the constraint applies from its
        end (the budget is then half of ``max_tokens`` unless given, so the answer has room).
        Setting ``cancel`` (from another thread) while a long conversation is being fitted to
        the context raises :class:`~smolcandle.errors.CancelledError`.
        """
        max_tokens = _count("max_tokens", max_tokens)
        if max_tokens is None:
            max_tokens = DEFAULTS["chat_max_tokens"]
        max_reasoning_tokens = _count("max_reasoning_tokens", max_reasoning_tokens)
        msgs = normalize_messages(messages)
        if self.recommended is not None:
            for key, value in self.recommended.sampling().items():
                if sampling.get(key) is None:
                    sampling[key] = value
            if self.recommended.system_prompt and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": self.recommended.system_prompt}, *msgs]
        constrained = any(sampling.get(k) is not None for k in ("json_schema", "grammar", "regex"))
        if enable_thinking is None and constrained:
            # Without a word from the caller, the constraint covers the whole answer.
            enable_thinking = False
        extra = dict(template_kwargs or {})

        def render(ms: list[dict[str, Any]]) -> str:
            return self.render_chat(ms, enable_thinking=enable_thinking, tools=tools, **extra)

        budget = self._native.prompt_budget(max_tokens)
        kept, dropped = fit_conversation(
            msgs,
            lambda ms: len(self.tokenize(render(ms))),
            budget,
            message_tokens=lambda text: len(self.tokenize(text, add_bos=False, special=False)),
            cancel=cancel,
        )
        warning = None
        if dropped:
            warning = ContextWarning(
                f"the conversation is longer than the context ({self.n_ctx} tokens): "
                f"the oldest {dropped} message(s) were left out",
                dropped,
            )
            log.warning("%s", warning.message)
        prompt = render(kept)
        inside = starts_in_reasoning(prompt)
        if constrained and enable_thinking and not inside:
            # The answer opens with its reasoning: the constraint holds from the block's end.
            prompt, inside = f"{prompt}{THINK_OPEN}\n", True
        if constrained and inside and max_reasoning_tokens is None:
            max_reasoning_tokens = max_tokens // 2  # room for the answer
        # The engine's end-of-generation tokens include the end of a turn (<|im_end|>).
        tokens = self.generate(prompt, max_tokens=max_tokens, reasoning=inside, max_reasoning_tokens=max_reasoning_tokens, **sampling)
        chat_stream = ChatStream(tokens, reasoning=inside, warning=warning)
        return chat_stream if stream else chat_stream.collect()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the engine and frees the weights; open streams end as cancelled."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<smolcandle.Model {self.path!r} (closed)>"
        return f"<smolcandle.Model {self.path!r} {self.architecture} n_vocab={self.n_vocab} n_ctx={self.n_ctx}>"


def _grammar(
    json_schema: Mapping[str, Any] | bool | str | None, grammar: str | None, regex: str | None
) -> tuple[str, str] | None:
    given = [(k, v) for k, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidParameterError(f"invalid parameter {given[1][0]}: give only one of json_schema, grammar and regex", given[1][0])
    kind, value = given[0]
    if kind == "json_schema":
        if isinstance(value, (Mapping, bool)):
            return kind, json.dumps(value)
        if isinstance(value, str):
            return kind, value
        raise InvalidParameterError(
            f"invalid parameter json_schema: expected a dict, a bool or JSON text, got {type(value).__name__}", "json_schema"
        )
    if not isinstance(value, str):
        raise InvalidParameterError(f"invalid parameter {kind}: expected a string, got {type(value).__name__}", kind)
    return ("lark" if kind == "grammar" else kind), value


def _int(name: str, value: object) -> int | None:
    """``value`` as an int for the engine, which checks its range."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"invalid parameter {name}: expected an integer, got {value!r}", name)
    return value


def _count(name: str, value: object) -> int | None:
    """``value`` as a count (a non-negative int) that Python itself uses or scales."""
    n = _int(name, value)
    if n is not None and n < 0:
        raise InvalidParameterError(f"invalid parameter {name}: {n} is negative", name)
    return n


def _flag(name: str, value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidParameterError(f"invalid parameter {name}: expected true or false, got {value!r}", name)


def _mapping(name: str, value: object) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise InvalidParameterError(f"invalid parameter {name}: expected a dict, got {value!r}", name)


def _number(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"invalid parameter {name}: expected a number, got {value!r}", name)
    return float(value)


def _token_ids(name: str, ids: Sequence[int]) -> list[int]:
    out = list(ids)
    for t in out:
        # int, or an integer type that says it is one (numpy's): `__index__` without loss.
        if isinstance(t, bool) or not (isinstance(t, int) or hasattr(type(t), "__index__")) or not 0 <= t < 1 << 32:
            raise InvalidParameterError(f"invalid parameter {name}: {t!r} is not a token id", name)
    return [int(t) for t in out]
