"""Type stub of the native module built from rust/python (PyO3)."""

import os
from typing import Any

__version__: str
has_cuda: bool
DEFAULTS: dict[str, Any]
"""The engine's defaults and limits: ``temperature``, ``max_tokens``, ``chat_max_tokens``,
``n_ctx``, ``prefix_cache_bytes``, ``disk_cache_bytes``, ``max_top_logprobs``,
``repeat_last_n``, ``queued_per_active``, ``prefill_chunk``, ``decode_slowdown``."""

def quantize_gguf(src: str, dst: str, mix: str) -> None:
    """Writes ``dst``: ``src`` with its 2-D weights quantized to ``mix`` (``"q4_k_m"``…)."""

def register_errors(classes: dict[str, type[Exception]]) -> None:
    """Hands ``smolcandle.errors``' classes to the native module, which raises them. Every
    class it raises is looked up here: one missing, or not a ``SmolcandleError``, raises
    ``ImportError``."""

def inspect_gguf(path: str) -> dict[str, Any]:
    """A GGUF header, validated, without the weights: ``metadata``, ``array_lengths``, ``tensors``."""

class Chunk:
    """Complete text (never a split character) and the tokens it came from."""

    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def logprobs(self) -> list[Logprob]:
        """One entry per token of ``token_ids`` when ``generate(logprobs=N)`` asked; else empty."""

class Logprob:
    """A generated token's natural-log probability under the model (before penalties,
    temperature and grammar) and the ``N`` most likely tokens there, most likely first."""

    @property
    def token_id(self) -> int: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top_logprobs(self) -> list[tuple[int, float]]: ...

#: ``simd`` (the kernels' SIMD: avx512, avx2 or scalar), ``cpu`` (the levels the CPU offers,
#: best first), ``cuda``; and ``builds`` when a portable wheel chose among several.
BUILD: dict[str, Any]

class Usage:
    """A finished generation's counts and times."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused from the prefix cache rather than computed."""
    @property
    def completion_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int:
        """Completion tokens inside the reasoning block, its closing tag included."""
    @property
    def total_tokens(self) -> int: ...
    @property
    def prefill_seconds(self) -> float: ...
    @property
    def decode_seconds(self) -> float: ...
    @property
    def drafted_tokens(self) -> int:
        """Draft tokens verified (speculative decoding)."""
    @property
    def accepted_tokens(self) -> int:
        """Draft tokens kept as the tokens chosen."""
    @property
    def prefill_tokens_per_second(self) -> float: ...
    @property
    def decode_tokens_per_second(self) -> float: ...
    def to_dict(self) -> dict[str, int | float]:
        """Every field, and ``total_tokens``."""

class TokenStream:
    """Iterator of chunks; ``__next__`` waits with the GIL released."""

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> Chunk: ...
    def cancel(self) -> None: ...
    @property
    def queue_position(self) -> int:
        """The request's place in the engine's queue: 1 for the next to start, 0 once it runs."""
    @property
    def finish_reason(self) -> str | None:
        """``"stop"``, ``"length"`` or ``"cancelled"`` once the stream has ended."""
    @property
    def usage(self) -> Usage | None: ...

class GenerateRequest:
    """One generation's settings; options left at ``None`` take the engine's defaults, and the
    engine checks every range when the request is submitted. ``grammar`` is ``(kind, text)``
    with kind ``json_schema``, ``lark`` or ``regex``; ``reasoning`` is the reasoning block's
    ``(open_tag, close_tag, prompt_opens_it)``."""

    def __init__(
        self,
        prompt: list[int],
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
        stop: list[str] = ...,
        stop_token_ids: list[int] = ...,
        ignore_eos: bool = False,
        grammar: tuple[str, str] | None = None,
        logprobs: int | None = None,
        tenant: str | None = None,
        reuse_prefix: bool = True,
        client: str | None = None,
        reasoning: tuple[str, str, bool] | None = None,
        max_reasoning_tokens: int | None = None,
    ) -> None: ...

class LoadOptions:
    """How to load a model, handed to :meth:`Model.load` whole; options left at ``None`` take
    the engine's defaults. Sizes are in MiB (``kv_budget_mib`` at least 1; ``prefix_cache_mib``
    0 turns prefix reuse off; ``disk_cache_mib`` bounds what ``disk_cache_dir`` keeps;
    ``rope_scaling`` is transformers' YaRN dict, overriding the file's)."""

    def __init__(
        self,
        *,
        device: str = "cpu",
        n_threads: int | None = None,
        n_ctx: int | None = None,
        kv_cache_dtype: str | None = None,
        max_active: int | None = None,
        max_queued: int | None = None,
        kv_budget_mib: int | None = None,
        prefix_cache_mib: int | None = None,
        speculative: bool | None = None,
        decode_slowdown: float | None = None,
        disk_cache_dir: str | os.PathLike[str] | None = None,
        disk_cache_mib: int | None = None,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None: ...

class Model:
    @staticmethod
    def load(path: str, options: LoadOptions) -> Model:
        """Loads the GGUF file at ``path`` and starts its engine."""
    @property
    def kv_cache_bytes(self) -> dict[str, int]:
        """``bytes`` of key/value storage held now, and ``peak_bytes``."""
    @property
    def admission(self) -> dict[str, int]:
        """``max_active``, ``max_queued``, ``kv_budget_bytes``; ``active``, ``queued``,
        ``kv_reserved_bytes`` now; ``refused`` so far."""
    @property
    def kv_bytes_per_token(self) -> int: ...
    @property
    def prefix_cache_stats(self) -> dict[str, int]: ...
    @property
    def speculation(self) -> dict[str, int]: ...
    @property
    def kv_cache_dtype(self) -> str: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def architecture(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def add_bos_token(self) -> bool: ...
    @property
    def eog_token_ids(self) -> list[int]: ...
    @property
    def closed(self) -> bool: ...
    def token_to_id(self, text: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    def token_bytes(self, id: int) -> bytes: ...
    def tokenize(self, text: str, add_bos: bool | None, special: bool) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...
    def logits(self, ids: list[int]) -> tuple[bytes, int, int]: ...
    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """The embedding of each input: final hidden states mean-pooled and L2-normalised."""
    def generate(self, request: GenerateRequest) -> TokenStream:
        """Starts a generation; errors in the request are raised here, before any stream exists."""
    def prompt_budget(self, max_tokens: int) -> int:
        """Tokens a conversation's prompt may take so that an answer of ``max_tokens`` fits."""
    def close(self) -> None: ...
