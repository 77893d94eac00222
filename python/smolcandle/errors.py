"""The exceptions smolcandle raises. Every one is a :class:`SmolcandleError`; the native
module raises them too: this module hands them over when imported, and the native module
looks up every class it raises then, once, so that a class missing here (or renamed) fails
this import rather than turning into another exception when raised."""

from __future__ import annotations

from ._native import register_errors

__all__ = [
    "SmolcandleError",
    "ModelLoadError",
    "ModelNotFoundError",
    "GGUFError",
    "UnsupportedModelError",
    "TokenizerError",
    "DeviceError",
    "InvalidParameterError",
    "ContextLengthError",
    "EngineError",
    "BusyError",
    "CancelledError",
]


class SmolcandleError(Exception):
    """Base class of every error smolcandle raises."""


class ModelLoadError(SmolcandleError):
    """A model file could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model file does not exist."""


class GGUFError(ModelLoadError, ValueError):
    """The file is not GGUF, is truncated, or its metadata and tensors disagree."""


class UnsupportedModelError(ModelLoadError):
    """A valid GGUF file with an architecture or tensor type smolcandle does not run."""


class TokenizerError(ModelLoadError):
    """The vocabulary in the file cannot be used."""


class DeviceError(SmolcandleError):
    """The requested device does not exist or this build cannot use it."""


class InvalidParameterError(SmolcandleError, ValueError):
    """A generation or load parameter is out of range; ``param`` names it (as the engine
    does, e.g. ``"top_p"``, or ``"messages.2.role"`` for a part of a request)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParameterError):
    """The prompt does not fit in the model's context."""


class EngineError(SmolcandleError, RuntimeError):
    """Inference failed, or the model was closed. A bug inside the engine (a Rust panic)
    is one too, its message starting with ``internal error:``."""


class BusyError(EngineError):
    """The engine's queue is full: the request was refused, and may be tried again later."""


class CancelledError(SmolcandleError):
    """The request was cancelled before its generation started."""


register_errors({name: globals()[name] for name in __all__})
