"""Ollama's request bodies, as pydantic models (the handlers build the responses as dicts).
Fields Ollama documents that this server has no use for (``keep_alive``, hardware options) are
accepted and ignored; the ones it cannot honour are refused with a sentence that says so."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..limits import MAX_MESSAGES, MAX_TOOLS, bounded_schema


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Lenient):
    """The ``options`` this server maps onto the engine's sampling; Ollama's others (``num_gpu``,
    ``num_thread``, ``mirostat``…) are accepted and have no effect here."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, le=2**64 - 1, description="a negative seed (Ollama's -1) is a random one")
    num_predict: int | None = Field(None, ge=-2, le=2**31 - 1)
    stop: list[str] | str | None = None
    num_ctx: int | None = Field(None, ge=1, le=2**31 - 1)


    @field_validator("seed")
    @classmethod
    def _random(cls, v: int | None) -> int | None:
        return None if v is not None and v < 0 else v


class FunctionCall(_Lenient):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(_Lenient):
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    #: Older clients name a tool result's function here.
    name: str | None = None


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(v)


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


def _format(v: Any) -> Any:
    if isinstance(v, dict):
        return bounded_schema(v)
    return v


class _Generating(_Lenient):
    model: str = Field(min_length=1)
    stream: bool = True
    options: Options | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high"] | None = None

    @field_validator("format")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        return _format(v)


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)


class GenerateRequest(_Generating):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: Options | None = None
    keep_alive: float | str | None = None


class EmbeddingsRequest(_Lenient):
    """The older ``/api/embeddings``: one ``prompt``, one ``embedding``."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    options: Options | None = None
    keep_alive: float | str | None = None


class ShowRequest(_Lenient):
    model: str | None = None
    #: Older clients send the model as ``name``.
    name: str | None = None
    verbose: bool = False
