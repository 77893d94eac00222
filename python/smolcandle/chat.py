"""Chat on top of the engine: the GGUF's own chat template rendered as transformers'
``apply_chat_template`` renders it, reasoning and tool-call parsing of the streamed answer, and
fitting long conversations into the context.

The events a chat stream yields, in order: at most one :class:`ContextWarning` (old turns were
dropped), then :class:`ReasoningDelta` and :class:`ContentDelta` text pieces and
:class:`ToolCallEvent` calls as they complete, and a final :class:`ChatDone`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import (
    CancelledError,
    ContextLengthError,
    InvalidParameterError,
    SmolcandleError,
)

if TYPE_CHECKING:
    from ._native import Logprob, TokenStream, Usage

log = logging.getLogger(__name__)

# The template used when a GGUF carries none (ChatML, as SmolLM2 and SmolLM3 speak it).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(SmolcandleError, ValueError):
    """The chat template could not be compiled or raised an error while rendering."""


# -- events and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for: ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_message(self) -> dict[str, Any]:
        """The call as it goes back into ``messages`` (OpenAI's shape)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    #: With ``logprobs=N``: the tokens generated since the previous text event, this one's
    #: included (tags and tool calls have no text event of their own).
    logprobs: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class ContentDelta:
    text: str
    logprobs: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall


@dataclass(frozen=True)
class ContextWarning:
    """The conversation did not fit: the oldest ``dropped`` messages were left out."""

    message: str
    dropped: int


@dataclass(frozen=True)
class ChatDone:
    finish_reason: str
    usage: Usage | None


ChatEvent = ReasoningDelta | ContentDelta | ToolCallEvent | ContextWarning | ChatDone


@dataclass
class ChatResult:
    """A whole answer: ``reasoning`` (the text inside ``<think>``), ``content`` (the answer),
    ``tool_calls``, ``finish_reason`` (``stop``, ``length``, ``cancelled`` or ``tool_calls``) and
    ``usage``."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None
    warnings: list[str] = field(default_factory=list)
    #: With ``logprobs=N``: one entry per generated token of the content.
    logprobs: list[Logprob] = field(default_factory=list)

    def add(self, event: ChatEvent) -> None:
        """Takes in one event of a :class:`ChatStream` (text is gathered as it comes; call
        :meth:`finish` after the last)."""
        if isinstance(event, ContentDelta):
            self.content += event.text
            self.logprobs.extend(event.logprobs)
        elif isinstance(event, ReasoningDelta):
            self.reasoning += event.text
        elif isinstance(event, ToolCallEvent):
            self.tool_calls.append(event.call)
        elif isinstance(event, ContextWarning):
            self.warnings.append(event.message)
        elif isinstance(event, ChatDone):
            self.finish_reason, self.usage = event.finish_reason, event.usage

    def finish(self) -> ChatResult:
        """Trims the whitespace around the gathered text."""
        self.content, self.reasoning = self.content.strip(), self.reasoning.strip()
        return self

    def to_message(self) -> dict[str, Any]:
        """The answer as the next turn's ``assistant`` message."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_message() for c in self.tool_calls]
        return msg


# -- template ------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # As transformers does: no HTML escaping, and json.dumps' options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_environment() -> Any:
    """jinja2's immutable sandbox as transformers builds it for chat templates: ``trim_blocks``,
    ``lstrip_blocks``, loop controls, the ``{% generation %}`` block (its body is rendered; the
    block only marks the assistant's text for training), ``tojson`` without HTML escaping and
    with json.dumps' options, ``raise_exception``, a ``dict`` callable, and a ``namespace``
    that refuses underscore-prefixed attributes. ``strftime_now`` is added per template."""
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    class Generation(jinja2.ext.Extension):
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class TemplateDict:
        """``dict(...)`` and ``dict.fromkeys(...)``, without the type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}"
                )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


class ChatTemplate:
    """A chat template compiled as transformers compiles it (:func:`_template_environment`).
    ``now`` fixes the clock ``strftime_now`` reads."""

    def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None, now: Callable[[], datetime] = datetime.now) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._now = now
        import jinja2  # here, not at import: a process that never chats saves 7 MB

        env = _template_environment()
        env.globals["strftime_now"] = lambda fmt: self._now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from e

    @functools.cached_property
    def has_thinking_switch(self) -> bool:
        """Whether ``enable_thinking`` changes what the template renders (SmolLM3's, Qwen3's do;
        SmolLM2's does not)."""
        msgs = [{"role": "user", "content": "hi"}]
        try:
            return self.render(msgs, enable_thinking=True) != self.render(msgs, enable_thinking=False)
        except ChatTemplateError:
            return False

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text, as transformers' ``apply_chat_template(..., tokenize=False)`` gives
        it: messages' ``None`` values are dropped, reasoning is offered under each name templates
        read, ``kwargs`` become template variables (``enable_thinking``, ``xml_tools``…; ``None``
        values are left undefined, so the template's own defaults apply) over the special
        tokens. With ``continue_final_message`` (``True``: its ``content``; or the name of the
        field) the prompt ends inside the last message, for the model to go on with it."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text' keys")
        variables = {**self.special_tokens, **{k: v for k, v in kwargs.items() if v is not None}}
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        final = None
        if continue_final_message:
            chat, final = self._tag_final_message(chat, continue_final_message)
        text = self._render(
            messages=chat,
            tools=list(tools) if tools is not None else None,
            documents=list(documents) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if final is not None:
            text = _cut_at_continue_tag(text, final)
        return text

    def _render(self, **variables: Any) -> str:
        import jinja2

        try:
            return self._template.render(**variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation{_template_line(e)}: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
            # What the template's own expressions raise (``'a' + {}``, ``x[5]``): transformers lets
            # these out unchanged; here they are the template's error too.
            raise ChatTemplateError(f"the chat template failed{_template_line(e)}: {type(e).__name__}: {e}") from e

    def _tag_final_message(self, chat: list[dict[str, Any]], field_name: bool | str) -> tuple[list[dict[str, Any]], str]:
        if not chat:
            raise ChatTemplateError("continue_final_message is set but the conversation is empty")
        name = field_name if isinstance(field_name, str) else "content"
        final = chat[-1].get(name)
        if final is None:
            raise ChatTemplateError(f"continue_final_message is set but the final message has no {name!r} to continue")
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if name in _REASONING_FIELDS else [name]
        if not any(f in self.source for f in fields):
            raise ChatTemplateError(f"continue_final_message is set to {name!r}, which the chat template never reads")
        last = dict(chat[-1])
        if isinstance(final, list):
            parts = [dict(p) if isinstance(p, Mapping) else p for p in final]
            for part in reversed(parts):
                if isinstance(part, dict) and "text" in part:
                    final, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")
            last[name] = parts
        else:
            for f in fields:
                last[f] = last[f] + _CONTINUE_TAG
        return [*chat[:-1], last], final


# transformers marks the end of the message to continue with this text and cuts the prompt there.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _cut_at_continue_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ChatTemplateError("continue_final_message is set but the chat template dropped part of the final message")
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _template_line(e: BaseException) -> str:
    """`` (line N)``: where in the template an error was raised, from the traceback jinja2
    rewrites to point into the template's source."""
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
    if getattr(e, "lineno", None) is not None:
        return f" (line {e.lineno})"
    return f" (line {lines[-1]})" if lines else ""


def _alias_reasoning(message: Mapping[str, Any]) -> dict[str, Any]:
    # transformers exposes an assistant's reasoning under both names templates read.
    msg = dict(message)
    reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks the messages and turns OpenAI-style content parts into plain text."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidParameterError("invalid parameter messages: expected a non-empty list of {'role', 'content'} dicts", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidParameterError(f"invalid parameter messages[{i}]: expected a dict, got {type(m).__name__}", f"messages.{i}")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidParameterError(f"invalid parameter messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}", f"messages.{i}.role")
        content = m.get("content")
        if content is None:
            pass  # dropped when rendered, as transformers drops None values
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidParameterError(f"invalid parameter messages[{i}].content[{j}]: only text parts are supported", f"messages.{i}.content.{j}")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise InvalidParameterError(f"invalid parameter messages[{i}].content: expected a string or a list of text parts", f"messages.{i}.content")
        msg = {**m, "content": content}
        out.append(msg)
    return out


# -- tools for templates that know none ----------------------------------------------------------

TOOLS_PREAMBLE = (
    "### Tools\n\nYou may call one or more functions. Their signatures are inside <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "For each call, return a JSON object with the function name and arguments inside "
    "<tool_call></tool_call>:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def template_knows_tools(source: str) -> bool:
    return "tool" in source


def with_generic_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation in plain messages for a template without tool support, in SmolLM3's
    own format: the tool signatures in the system message, calls as ``<tool_call>`` text in the
    assistant's turn, results as ``<tool_response>`` in a user turn."""
    out = [dict(m) for m in messages]
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = TOOLS_PREAMBLE.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{preamble}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": preamble})
    for m in out:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m.pop("tool_calls"):
                fn = c.get("function", c)
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass
                calls.append(f"{TOOL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}\n{TOOL_CLOSE}")
            m["content"] = "\n".join(filter(None, [m.get("content") or "", *calls]))
        elif m["role"] == "tool":
            m["role"] = "user"
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
    return out


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one ``<tool_call>`` of one of ``tools``
    (or of the one called ``name``), its arguments following the tool's parameter schema."""
    options = []
    for t in tools:
        fn = t.get("function", t)
        if name is not None and fn.get("name") != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn.get("name")}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise InvalidParameterError(f"invalid parameter tool_choice: no tool is called {name!r}", "tool_choice")
    schema = {"anyOf": options, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}}
    return f"start: {json.dumps(TOOL_OPEN + chr(10))} call {json.dumps(chr(10) + TOOL_CLOSE)}\ncall: %json {json.dumps(schema)}\n"


# -- long conversations ----------------------------------------------------------------------


def fit_conversation(
    messages: list[dict[str, Any]],
    count_tokens: Callable[[list[dict[str, Any]]], int],
    budget: int,
    *,
    message_tokens: Callable[[str], int] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Drops the oldest whole turns (a user message and what answers it) until the rendered
    conversation fits ``budget`` tokens, keeping a leading system message. Returns the messages
    kept and how many were dropped; raises :class:`ContextLengthError` when even the newest
    turn alone does not fit.

    ``count_tokens`` renders and counts a whole conversation; ``message_tokens`` counts one
    message's text. The work is linear in the conversation: each message's text is counted
    once, the template's markup is shared out evenly between the messages, and the cut that
    estimate picks is checked by rendering, moving to a later turn by the error seen, a few
    times at most. ``cancel``, set from another thread, stops it with :class:`CancelledError`.
    """
    n = count_tokens(messages)
    if n <= budget:
        return messages, 0
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    starts = [i for i, m in enumerate(body) if m["role"] == "user"][1:]
    own: list[int] = []
    for m in messages:
        if cancel is not None and cancel.is_set():
            raise CancelledError("the request was cancelled while its conversation was fitted to the context")
        own.append(message_tokens(_message_text(m)) if message_tokens is not None else 0)
    markup = max(0, n - sum(own)) / len(messages)
    estimate = [t + markup for t in own]
    head_tokens = sum(estimate[: len(head)])
    after = [0.0] * (len(body) + 1)  # after[i]: estimated tokens of body[i:]
    for i in range(len(body) - 1, -1, -1):
        after[i] = after[i + 1] + estimate[len(head) + i]
    correction = 0.0
    fits: int | None = None  # the earliest cut seen to fit
    checks = 0
    while checks < _FIT_CHECKS:
        if cancel is not None and cancel.is_set():
            raise CancelledError("the request was cancelled while its conversation was fitted to the context")
        if fits is None:
            start = next((s for s in starts if head_tokens + after[s] + correction <= budget), None)
        else:  # the estimate may have been pessimistic: one turn more, while renders are left
            earlier = [s for s in starts if s < fits]
            start = earlier[-1] if earlier else None
        if start is None:
            break
        checks += 1
        real = count_tokens(head + body[start:])
        if real <= budget:
            fits = start
        elif fits is not None:
            break
        else:
            correction = real - head_tokens - after[start]  # what the estimate missed; the next cut is later
    if fits is not None:
        return head + body[fits:], fits
    last = head + body[starts[-1] :] if starts else messages
    needed = count_tokens(last)
    if needed <= budget:
        return last, len(messages) - len(last)
    raise ContextLengthError(
        f"the newest message needs {needed} tokens with the system message, more than the {budget} the context leaves for the prompt"
    )


# Renders of a candidate cut that fit_conversation may check before it keeps only the newest turn.
_FIT_CHECKS = 6


def _message_text(m: Mapping[str, Any]) -> str:
    """The text a message puts in the prompt besides the template's markup."""
    parts = [m.get("content") or "", m.get("reasoning_content") or ""]
    if m.get("tool_calls"):
        parts.append(json.dumps(m["tool_calls"], ensure_ascii=False))
    return "\n".join(p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in parts)


# -- parsing the answer ----------------------------------------------------------------------


class AnswerParser:
    """Splits streamed answer text into reasoning, content and tool calls. Tags may arrive split
    across chunks: a possible tag prefix at the end of the buffer is held back until it resolves."""

    def __init__(self, *, reasoning: bool = False) -> None:
        self.state = "reasoning" if reasoning else "content"
        self._buf = ""
        self._tool = ""  # the JSON of the tool call being read
        self._at_start = {"reasoning": True, "content": True}

    def feed(self, text: str) -> list[ChatEvent]:
        self._buf += text
        events: list[ChatEvent] = []
        while True:
            tags = {"content": (THINK_OPEN, TOOL_OPEN), "reasoning": (THINK_CLOSE,), "tool": (TOOL_CLOSE,)}[self.state]
            hits = [(self._buf.find(t), t) for t in tags if t in self._buf]
            if hits and self.state == "tool" and _inside_json_string(self._tool + self._buf[: min(hits)[0]]):
                # The closing tag is text inside one of the call's JSON strings.
                pos = min(hits)[0] + len(TOOL_CLOSE)
                self._tool += self._buf[:pos]
                self._buf = self._buf[pos:]
                continue
            if hits:
                pos, tag = min(hits)
                self._emit(self._buf[:pos], events)
                self._buf = self._buf[pos + len(tag):]
                self._switch(tag, events)
                continue
            if self.state == "tool":
                return events  # a call is emitted whole, at its closing tag
            keep = _partial_tag_suffix(self._buf, tags)
            self._emit(self._buf[: len(self._buf) - keep], events)
            self._buf = self._buf[len(self._buf) - keep:]
            return events

    def finish(self) -> list[ChatEvent]:
        """Whatever is left when generation ends; an unfinished tool call is returned as text."""
        events: list[ChatEvent] = []
        rest, self._buf = self._buf, ""
        if self.state == "tool":
            log.warning("the answer ended inside an unfinished tool call; returning it as text")
            self.state = "content"
            rest, self._tool = TOOL_OPEN + self._tool + rest, ""
        self._emit(rest, events)
        return events

    def _switch(self, tag: str, events: list[ChatEvent]) -> None:
        if tag == THINK_OPEN:
            self.state = "reasoning"
        elif tag == THINK_CLOSE:
            self.state = "content"
            self._at_start["content"] = True
        elif tag == TOOL_OPEN:
            self.state = "tool"
        else:
            raw, self._tool = self._tool, ""
            self.state = "content"
            call = parse_tool_call(raw)
            if call is None:
                log.warning("a tool call that is not valid JSON was returned as text: %r", raw[:200])
                self._emit(TOOL_OPEN + raw + TOOL_CLOSE, events)
            else:
                events.append(ToolCallEvent(call))

    def _emit(self, text: str, events: list[ChatEvent]) -> None:
        if self.state == "tool":
            self._tool += text
            return
        if self._at_start[self.state]:
            text = text.lstrip()
            if not text:
                return
            self._at_start[self.state] = False
        if text:
            events.append(ReasoningDelta(text) if self.state == "reasoning" else ContentDelta(text))


def _inside_json_string(text: str) -> bool:
    """Whether ``text``, the start of a JSON document, ends inside a string."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def _partial_tag_suffix(buf: str, tags: Sequence[str]) -> int:
    """Length of the longest end of ``buf`` that could begin one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(buf)), best, -1):
            if tag.startswith(buf[-n:]):
                best = n
                break
    return best


def parse_tool_call(raw: str) -> ToolCall | None:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=obj["name"], arguments=args)


def starts_in_reasoning(prompt: str) -> bool:
    """Whether the prompt leaves the answer inside an open ``<think>`` block."""
    tail = prompt[prompt.rfind("<|im_start|>assistant"):] if "<|im_start|>assistant" in prompt else prompt
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


# -- the stream ------------------------------------------------------------------------------


class ChatStream:
    """Iterator of chat events over one generation; ``cancel()`` stops it."""

    def __init__(self, stream: TokenStream, *, reasoning: bool, warning: ContextWarning | None = None) -> None:
        self._stream = stream
        self._parser = AnswerParser(reasoning=reasoning)
        self._warning = warning
        self._tool_calls = 0
        self.finish_reason: str | None = None
        # The text shown and the tokens generated, to tell which stop string ended it.
        self._shown: list[str] = []
        self._ids: list[int] = []

    def __iter__(self) -> Iterator[ChatEvent]:
        return self._events()

    def _events(self) -> Iterator[ChatEvent]:
        if self._warning is not None:
            yield self._warning
        pending: list[Logprob] = []

        def with_logprobs(ev: ChatEvent) -> ChatEvent:
            if pending and isinstance(ev, ContentDelta | ReasoningDelta):
                ev = dataclasses.replace(ev, logprobs=tuple(pending))
                pending.clear()
            return ev

        for chunk in self._stream:
            pending.extend(chunk.logprobs)
            self._shown.append(chunk.text)
            self._ids.extend(chunk.token_ids)
            for ev in self._parser.feed(chunk.text):
                self._tool_calls += isinstance(ev, ToolCallEvent)
                yield with_logprobs(ev)
        for ev in self._parser.finish():
            yield with_logprobs(ev)
        reason = self._stream.finish_reason or "stop"
        if reason == "stop" and self._tool_calls:
            reason = "tool_calls"
        self.finish_reason = reason
        yield ChatDone(reason, self._stream.usage)

    def cancel(self) -> None:
        self._stream.cancel()

    def stop_string(self, stops: Sequence[str], token_bytes: Callable[[int], bytes]) -> str | None:
        """Which of ``stops`` ended the finished generation (``None``: it ended otherwise). The
        engine never shows a stop string, but its tokens were generated: the text of the tokens
        begins with the text shown, and the stop string follows."""
        if self._stream.finish_reason != "stop" or not stops:
            return None
        shown = "".join(self._shown)
        made = b"".join(token_bytes(i) for i in self._ids).decode("utf-8", "replace")
        rest = made[len(shown) :] if made.startswith(shown) else ""
        return next((s for s in stops if s and rest.startswith(s)), None)

    @property
    def queue_position(self) -> int:
        """The request's place in the engine's queue: 1 for the next to start, 0 once it runs."""
        return self._stream.queue_position

    @property
    def usage(self) -> Usage | None:
        return self._stream.usage

    def collect(self) -> ChatResult:
        """Runs the stream to its end and gathers the answer."""
        result = ChatResult()
        for ev in self:
            result.add(ev)
        return result.finish()
