"""The interactive chat in a terminal (``smolcandle chat``): reading multi-line input, slash
commands, and answers streamed with their reasoning dimmed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ._model import Model
from .chat import ChatDone, ContentDelta, ContextWarning, ReasoningDelta, ToolCallEvent
from .errors import SmolcandleError

DIM, RESET, BOLD, YELLOW = "\x1b[2m", "\x1b[0m", "\x1b[1m", "\x1b[33m"


def tty(stream: TextIO) -> bool:
    """Whether to colour what goes to ``stream``: a terminal, and no ``NO_COLOR``."""
    return stream.isatty() and os.environ.get("NO_COLOR") is None


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
    def __init__(self, model: Model, sampling: dict[str, Any], *, hide_reasoning: bool = False, out: TextIO = sys.stdout) -> None:
        self.model = model
        self.sampling = sampling
        self.hide_reasoning = hide_reasoning
        self.out = out
        self.color = tty(out)
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
            stream = self.model.chat(messages, enable_thinking=self.enable_thinking, **self.sampling)
            for ev in stream:
                if isinstance(ev, ReasoningDelta):
                    if self.hide_reasoning:
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
