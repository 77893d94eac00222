"""smolcandle: run SmolLM3 locally from Python, with quantized GGUF inference in Rust (Candle).

>>> import smolcandle
>>> with smolcandle.Model.load("SmolLM3-3B-Q4_K_M.gguf") as model:
...     for chunk in model.generate("The capital of France is", max_tokens=8, temperature=0):
...         print(chunk.text, end="")
"""

from __future__ import annotations

from . import _native
from ._model import DEFAULTS, Chunk, Logprob, Model, TokenStream, Usage
from .errors import (
    ContextLengthError,
    DeviceError,
    EngineError,
    GGUFError,
    InvalidParameterError,
    ModelLoadError,
    ModelNotFoundError,
    SmolcandleError,
    TokenizerError,
    UnsupportedModelError,
)

__version__: str = _native.__version__


def build_info() -> dict[str, object]:
    """How this installation runs: ``simd``, the kernels' SIMD (``avx512``, ``avx2`` or
    ``scalar``); ``cpu``, the levels the running CPU offers, best first; ``builds``, the builds
    the wheel carries (a portable wheel carries all three and loads the best the CPU runs);
    ``cuda``, whether the CUDA backend is built in; ``target_features``, the SIMD features the
    loaded build was compiled with."""
    info = dict(_native.BUILD)
    info.setdefault("builds", [info["simd"]])
    return info

__all__ = [
    "DEFAULTS",
    "Chunk",
    "ContextLengthError",
    "DeviceError",
    "EngineError",
    "GGUFError",
    "InvalidParameterError",
    "Logprob",
    "Model",
    "ModelLoadError",
    "ModelNotFoundError",
    "SmolcandleError",
    "TokenStream",
    "TokenizerError",
    "UnsupportedModelError",
    "Usage",
    "__version__",
    "build_info",
]
